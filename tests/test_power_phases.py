"""``kavier calibrate-power`` on a tracer dataset: GPU samples aligned with the requests they
were taken during, and memory_bound_utilization fitted to what the GPU was doing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from archive.cards import finish
from archive.schema import GPU_SAMPLES
from calibrate.power_phases import predicted_power
from kavier.cli import main as kavier_cli
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from tracer.client import VLLMClient
from tracer.collect import Setup, SweepPlan, collect

TRUE = PowerModel("linear", 60.0, 300.0)
PHI = 0.3


def _samples(measurements: pd.DataFrame, timing, per_request: int, idle: int) -> pa.Table:
    """GPU samples a GPU with TRUE and PHI would give: ``per_request`` samples tagged with
    each request (1 % noise), ``idle`` untagged ones at P_idle."""
    rng = np.random.default_rng(7)
    power = predicted_power(timing, TRUE, measurements["n_input_tokens"],
                            measurements["n_output_tokens"], PHI)
    tags = np.repeat(np.arange(len(measurements)), per_request)
    watts = np.concatenate([np.full(idle, TRUE.idle_w),
                            power[tags] * rng.normal(1.0, 0.01, tags.size)])
    n = watts.size
    util = np.concatenate([np.zeros(idle), np.full(tags.size, 100.0)])
    columns = {"run_id": ["r"] * n, "timestamp": pd.date_range("2026-01-01", periods=n,
                                                               freq="100ms"),
               "gpu_index": np.zeros(n, np.int32), "utilization_gpu_pct": util,
               "power_w": watts, "power_field": ["power.draw.instant"] * n,
               "request_id": [None] * idle + tags.tolist()}
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
              for f in GPU_SAMPLES]
    return pa.Table.from_arrays(arrays, schema=GPU_SAMPLES)


def test_memory_bound_utilization_is_recovered_from_requests_and_their_samples(
        server, tmp_path, llama8b, a10):
    _, url = server
    out = collect(VLLMClient(url), SweepPlan((64, 512, 2048), (16, 64, 256), repetitions=2,
                                             warmup=0),
                  Setup("loopback", "A10", "Llama-3-8B", "Llama-3-8B"), tmp_path / "ds")
    measurements = pd.read_parquet(out / "measurements.parquet")
    timing = make_timing("roofline", llama8b, a10)
    pq.write_table(_samples(measurements, timing, 3, 40), out / "gpu_samples.parquet")
    meta = json.loads((out / "dataset.json").read_text())
    finish(out, {**meta, "files": [*meta["files"], "gpu_samples.parquet"]})
    result = CliRunner().invoke(kavier_cli, ["calibrate-power", str(out), "--output-folder",
                                             str(tmp_path / "pw")])
    assert result.exit_code == 0, result.output
    phases = json.loads((tmp_path / "pw" / "summary.json").read_text())["power"]["phases"]
    assert phases["memory_bound_utilization"] == pytest.approx(PHI, abs=0.03)
    assert phases["mape_pct"] < 2.0 < phases["mape_default_pct"]
    assert phases["requests"] == len(measurements) and phases["samples"] == 3 * 12
    printed = f"memory_bound_utilization {phases['memory_bound_utilization']:.3f}, P_max "
    assert printed in result.output and phases["max_w"] == pytest.approx(TRUE.max_w, rel=0.02)
    # the profile carries it into kavier simulate
    profile = tmp_path / "pw" / "power_profile.json"
    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n16,200\n")
    sim = CliRunner().invoke(kavier_cli, ["simulate", "--trace", str(trace), "--power-profile",
                                          str(profile), "--output-folder", str(tmp_path / "s")])
    assert sim.exit_code == 0, sim.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["sustainability"]["memory_bound_utilization"] == pytest.approx(
        phases["memory_bound_utilization"])
    broken = json.loads(profile.read_text())
    broken["power"]["memory_bound_utilization"] = "fast"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    sim = CliRunner().invoke(kavier_cli, ["simulate", "--trace", str(trace), "--power-profile",
                                          str(tmp_path / "broken.json"), "--output-folder",
                                          str(tmp_path / "s2")])
    assert sim.exit_code == 2 and "field 'power.memory_bound_utilization'" in sim.output
    bad = CliRunner().invoke(kavier_cli, ["calibrate-power", str(out), "--fields", "x"])
    assert bad.exit_code == 2 and "--fields describes a CSV capture" in bad.output
    # a profile's timing for another GPU or LLM would set these requests' phases against
    # another model's steps: refused, not fitted
    shipped = Path("calibrate/profiles")
    a10 = json.loads((shipped / "a10-llama-3-8b-vllm.json").read_text())
    for name, profile, message in (
            ("4090", json.loads((shipped / "rtx-4090-llama-3.1-8b-vllm-0.19.json")
                                .read_text()), "is for GPU"),
            ("other-llm", {**a10, "llm": "Mistral-7B"},
             "requests are of Llama-3-8B, the profile's timing is for Mistral-7B"),
            ("a10", a10, None)):
        profile_copy = tmp_path / f"{name}.json"
        profile_copy.write_text(json.dumps(profile))
        other = CliRunner().invoke(kavier_cli, ["calibrate-power", str(out), "--profile",
                                                str(profile_copy), "--output-folder",
                                                str(tmp_path / "pw-other")])
        if message is None:
            assert other.exit_code == 0, other.output
        else:
            assert other.exit_code == 2 and message in other.output, other.output


def test_a_serving_runs_samples_are_set_against_its_replayed_steps(tmp_path):
    from datetime import datetime

    from archive.importers.serving import import_tracer_bench
    from archive.serving import read_serving
    from calibrate.power_phases import serving_window_power
    from calibrate.serving import replay_for

    rng = np.random.default_rng(3)
    wall0, n = 1.76e9, 60
    log = tmp_path / "requests.jsonl"
    log.write_text("".join(json.dumps({
        "request_id": str(i), "start_s": 0.2 * i, "send_unix_s": wall0 + 0.2 * i,
        "n_input_tokens": int(rng.integers(128, 3000)), "n_output_tokens": 40,
        "ttft_s": 0.1, "itl_s": [0.03] * 39, "error": None}) + "\n" for i in range(n)))
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"gpu": "A10", "llm": "Llama-3-8B", "max_num_seqs": 8,
                                  "max_num_batched_tokens": 2048, "version": "test"}))
    out = tmp_path / "run"
    import_tracer_bench(log, out, engine)
    steps = replay_for(read_serving(out)).predict()[2].to_pandas()
    end = float((steps["start_s"] + steps["duration_s"]).max())
    t = np.arange(-1.0, end + 1.0, 0.05)          # samples from before to after the run
    watts = serving_window_power(steps, TRUE, PHI, t, 0.05) * rng.normal(1, 0.01, t.size)
    busy = serving_window_power(steps, PowerModel("linear", 0.0, 100.0), 1.0, t, 0.05)
    m = t.size
    columns = {"run_id": ["run"] * m, "timestamp": [datetime.fromtimestamp(wall0 + x)
                                                     for x in t],
               "gpu_index": np.zeros(m, np.int32), "utilization_gpu_pct": np.where(
                   busy > 0, 100.0, 0.0), "power_w": watts,
               "power_field": ["power.draw.instant"] * m}
    pq.write_table(pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(m, f.type)
         for f in GPU_SAMPLES], schema=GPU_SAMPLES), tmp_path / "gpu_samples.parquet")
    import_tracer_bench(log, out, engine, extra_files=(tmp_path / "gpu_samples.parquet",))
    result = CliRunner().invoke(kavier_cli, ["calibrate-power", str(out), "--output-folder",
                                             str(tmp_path / "pw")])
    assert result.exit_code == 0, result.output
    power = json.loads((tmp_path / "pw" / "power_profile.json").read_text())["power"]
    phases = power["phases"]
    assert power["memory_bound_utilization"] == phases["memory_bound_utilization"]
    assert phases["memory_bound_utilization"] == pytest.approx(PHI, abs=0.03)
    assert phases["max_w"] == pytest.approx(TRUE.max_w, rel=0.03)
    assert phases["window_s"] == pytest.approx(0.05) and phases["requests"] == n
    assert phases["mape_pct"] < 2.0 < phases["mape_default_pct"]
    assert "samples aligned with the replayed run" in result.output
    assert power["gpu"] == "A10"                         # from the run's engine section
