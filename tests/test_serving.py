"""Serving runs: importers (LLMServingSim folders, vllm bench serve JSON), the archive kind,
replay in the simulation core, calibration by MAPE with a held-out split, the report."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from archive.cli import main as archive_cli
from archive.errors import InputError
from archive.importers.serving import block_hashes
from archive.serving import read_serving
from archive.validate import validate
from calibrate.profile import Profile
from calibrate.serving import (
    METRICS,
    fit_mask,
    fit_serving,
    measured,
    objective,
    replay_for,
    score,
)
from kavier.cli import main as kavier_cli
from kavier.models.library import gpu_library, llm_library
from kavier.models.timing import TimingParams, make_timing

PRO = "vllm-serving-rtxpro6000-llama3.1-8b"
RTX4090 = "vllm-serving-rtx4090-llama3.1-8b"


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _llmservingsim_folder(tmp_path, n=6, device="NVIDIA GeForce RTX 4090"):
    """A run folder in LLMServingSim's format: requests.jsonl, meta.json, timeseries.csv,
    and the workload that was sent (token ids; requests 0 and 1 share a 32-token prefix)."""
    folder = tmp_path / "run"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shared = list(range(1000, 1032))
    prompts = [shared + [int(x) for x in rng.integers(0, 5000, 20 + 7 * i)] for i in range(n)]
    lines, t = [], 100.0
    for i, prompt in enumerate(prompts):
        out = 3 + i
        lines.append({"request_id": f"bench-{i}", "input_toks": len(prompt),
                      "output_toks": out, "arrival_time": 1.7e9 + t, "queued_ts": t,
                      "scheduled_ts": t + 0.01, "first_token_ts": t + 0.05,
                      "last_token_ts": t + 0.05 + 0.02 * (out - 1)})
        t += 0.3
    (folder / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    meta = {"model": "meta-llama/Llama-3.1-8B", "vllm_version": "0.19.0",
            "engine_kwargs": {"tensor_parallel_size": 1, "max_num_seqs": 16,
                              "max_num_batched_tokens": 2048, "dtype": "bfloat16"},
            "kv_cache": {"block_size": 16, "num_gpu_blocks": 2588,
                         "enable_prefix_caching": True}}
    if device:
        meta["hardware"] = {"device_name": device}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "timeseries.csv").write_text(
        "t,prompt_throughput,gen_throughput,running,waiting,kv_cache_pct\n"
        "1.0,300.0,20.0,3,0,1.5\n2.0,100.0,40.0,2,0,0.9\n")
    workload = folder.parent / "workload.jsonl"
    workload.write_text("".join(json.dumps({"input_toks": len(p), "output_toks": 3,
                                            "input_tok_ids": p}) + "\n" for p in prompts))
    return folder, workload, lines


def test_llmservingsim_import_round_trip(tmp_path):
    folder, workload, lines = _llmservingsim_folder(tmp_path)
    dest = tmp_path / "dataset"
    result = run(archive_cli, "import", "llmservingsim", folder, dest, "--workload", workload)
    assert result.exit_code == 0, result.output
    assert validate(dest) == []
    r = read_serving(dest)
    first = lines[0]
    assert r.requests["arrival_s"].iloc[0] == 0.0
    assert r.requests["ttft_s"].iloc[0] == pytest.approx(first["first_token_ts"]
                                                         - first["queued_ts"])
    assert r.requests["tpot_s"].iloc[2] == pytest.approx(0.02)
    assert r.requests["e2e_s"].iloc[1] == pytest.approx(lines[1]["last_token_ts"]
                                                        - lines[1]["queued_ts"])
    assert r.engine["max_num_seqs"] == 16 and r.engine["timestamps"] == "engine"
    assert r.engine["assumed"] == ["enable_chunked_prefill"]
    assert list(r.timeseries["num_requests_running"]) == [3, 2]
    hashes = r.requests["hash_ids"]
    assert hashes.iloc[0][:2].tolist() == hashes.iloc[1][:2].tolist()      # shared 32 tokens
    assert hashes.iloc[0][2] != hashes.iloc[1][2]
    n_in = r.requests["n_input_tokens"]
    assert all(len(h) == -(-n // 16) for h, n in zip(hashes, n_in, strict=True))
    assert min(min(h) for h in hashes) >= 0


def test_llmservingsim_import_bad_input_is_one_line(tmp_path):
    folder, workload, _ = _llmservingsim_folder(tmp_path, device=None)
    result = run(archive_cli, "import", "llmservingsim", folder, tmp_path / "d")
    assert result.exit_code == 2 and "pass --gpu" in result.output
    assert "Traceback" not in result.output
    text = (folder / "requests.jsonl").read_text().splitlines()
    text[2] = text[2].replace('"output_toks": 5', '"output_toks": -5')
    (folder / "requests.jsonl").write_text("\n".join(text) + "\n")
    result = run(archive_cli, "import", "llmservingsim", folder, tmp_path / "d", "--gpu",
                 "RTX-4090")
    assert result.exit_code == 2
    assert "requests.jsonl: line 3: field 'output_toks'" in result.output
    text[2] = text[2].replace('"output_toks": -5', '"output_toks": 1e23')     # past MAX_TOKENS
    (folder / "requests.jsonl").write_text("\n".join(text) + "\n")
    result = run(archive_cli, "import", "llmservingsim", folder, tmp_path / "d", "--gpu",
                 "RTX-4090")
    assert result.exit_code == 2 and "line 3: field 'output_toks'" in result.output
    assert "100,000,000" in result.output
    folder2, workload2, _ = _llmservingsim_folder(tmp_path / "b")
    rows = workload2.read_text().splitlines()
    bad = json.loads(rows[1])
    bad["input_tok_ids"] = bad["input_tok_ids"][:-1]
    rows[1] = json.dumps(bad)
    workload2.write_text("\n".join(rows) + "\n")
    result = run(archive_cli, "import", "llmservingsim", folder2, tmp_path / "e",
                 "--workload", workload2)
    assert result.exit_code == 2 and "line 2: field 'input_tok_ids'" in result.output
    result = run(archive_cli, "import", "azure", folder2 / "meta.json", tmp_path / "f",
                 "--workload", workload2)
    assert result.exit_code == 2 and "--workload" in result.output
    # --gpu names the GPU of a run that does not record it; against a recorded one it had
    # been ignored without a word
    result = run(archive_cli, "import", "llmservingsim", folder2, tmp_path / "g", "--gpu",
                 "A10")
    assert result.exit_code == 2, result.output
    assert "records hardware.device_name 'NVIDIA GeForce RTX 4090'; --gpu 'A10'" in \
        result.output and not (tmp_path / "g").exists()


def test_vllm_bench_import(tmp_path):
    result_json = {"model_id": "meta-llama/Llama-3.1-8B", "request_rate": 4.0,
                   "max_concurrency": None, "input_lens": [100, 200, 50],
                   "output_lens": [4, 3, 0], "ttfts": [0.1, 0.2, 0.0],
                   "itls": [[0.02, 0.03, 0.02], [0.05, 0.04], []],
                   "start_times": [10.0, 10.5, 11.0], "errors": ["", "", "timeout"]}
    (tmp_path / "bench.json").write_text(json.dumps(result_json))
    (tmp_path / "engine.json").write_text(json.dumps({
        "gpu": "NVIDIA H100 80GB HBM3", "max_num_seqs": 256, "max_num_batched_tokens": 8192,
        "version": "0.11.0"}))
    dest = tmp_path / "bench"
    result = run(archive_cli, "import", "vllm-bench", tmp_path / "bench.json", dest,
                 "--engine", tmp_path / "engine.json")
    assert result.exit_code == 0, result.output
    assert "vLLM defaults assumed" in result.output
    assert validate(dest) == []
    r = read_serving(dest)
    assert r.engine["timestamps"] == "client"
    assert r.requests["e2e_s"].iloc[0] == pytest.approx(0.1 + 0.07)
    assert r.requests["tpot_s"].iloc[1] == pytest.approx(0.09 / 2)
    assert r.requests["arrival_s"].tolist() == [0.0, 0.5, 1.0]
    assert r.requests["error"].iloc[2] == "timeout" and np.isnan(r.requests["ttft_s"].iloc[2])
    assert list(r.ok) == [True, True, False]
    assert gpu_library().get(r.engine["gpu"]).name == "H100-SXM"
    missing = run(archive_cli, "import", "vllm-bench", tmp_path / "bench.json", tmp_path / "x")
    assert missing.exit_code == 2 and "--engine" in missing.output
    # a successful request's NaN, inf or negative timing had been imported as a latency
    for key, i, value, message in (
            ("ttfts", 1, float("inf"), "line 2: field 'ttft': a successful request needs a "
                                       "finite TTFT >= 0"),
            ("ttfts", 0, float("nan"), "line 1: field 'ttft'"),
            ("ttfts", 1, -0.1, "line 2: field 'ttft'"),
            ("itls", 0, [0.02, float("inf"), 0.02], "line 1: field 'itl': inter-token gaps "
                                                    "must be finite and non-negative, got inf"),
            ("itls", 1, [0.05, -1.0], "line 2: field 'itl'")):
        bad = json.loads(json.dumps(result_json))
        bad[key][i] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        refused = run(archive_cli, "import", "vllm-bench", tmp_path / "bad.json",
                      tmp_path / "bad", "--engine", tmp_path / "engine.json")
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert not (tmp_path / "bad" / "requests.parquet").exists()


def test_library_resolves_nvidia_smi_and_hugging_face_names():
    assert gpu_library().get("NVIDIA GeForce RTX 4090").name == "RTX-4090"
    assert llm_library().get("meta-llama/Llama-3.1-8B").name == "Llama-3.1-8B"
    with pytest.raises(Exception, match="did you mean RTX-4090"):
        gpu_library().get("RTX 4090")


def test_block_hashes_chain_prefixes():
    a, b = block_hashes(list(range(40))), block_hashes(list(range(32)) + [7] * 8)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes([5] + list(range(1, 32)))[1] != a[1]     # a block names its prefix


def test_kv_memory_efficiency_is_its_own_term():
    llm, gpu = llm_library().get("Llama-3.1-8B"), gpu_library().get("RTX-4090")
    same = make_timing("roofline", llm, gpu, TimingParams(memory_efficiency=0.8))
    explicit = make_timing("roofline", llm, gpu, TimingParams(memory_efficiency=0.8,
                                                              kv_memory_efficiency=0.8))
    slow_kv = make_timing("roofline", llm, gpu, TimingParams(memory_efficiency=0.8,
                                                             kv_memory_efficiency=0.4))
    assert same.decode_s(2000, 50) == explicit.decode_s(2000, 50)
    assert slow_kv.decode_s(2000, 50) > same.decode_s(2000, 50)
    assert slow_kv.floor_s() == same.floor_s()             # weights stream at M_e
    context = np.array([3000.0, 100.0, 900.0])
    run_costs = slow_kv.decode_run(context, 4)
    step = slow_kv.step_costs(np.ones(3), context + 2, 3)
    assert run_costs.duration_s[2] == pytest.approx(step.duration_s, rel=1e-12)


def test_replay_uses_the_runs_engine_and_prefix_cache():
    r4090 = replay_for(read_serving(RTX4090))
    assert r4090.config.num_gpu_blocks == 2588 and r4090.config.max_num_seqs == 256
    predicted, summary, steps = r4090.predict()
    assert len(predicted) == 300 and summary["preemptions"] > 0
    assert summary["prefix_cache"]["hits_tokens"] > 0
    assert steps.column("kv_blocks_used").to_numpy().max() <= 2588
    pro = replay_for(read_serving(PRO))
    assert pro.prefix_content is not None and pro.timing.params.request_overhead_s == 0.0
    tp2 = replay_for(read_serving("vllm-serving-rtxpro6000-qwen3-32b-tp2"))
    assert tp2.config.tensor_parallel_size == tp2.timing.tensor_parallel_size == 2
    moe = replay_for(read_serving("vllm-serving-rtxpro6000-qwen3-30b-a3b"))
    assert moe.config.replicas == 2 and moe.timing.expert_parallel_size == 2


def test_fit_improves_the_fit_requests_and_keeps_bounds():
    run_ = read_serving(PRO)
    replay = replay_for(run_)
    fit = fit_serving(replay, ("compute_efficiency", "kv_memory_efficiency"),
                      max_evaluations=10)
    assert objective(fit.after["fit"]) <= objective(fit.before["fit"])
    assert 0.05 <= fit.params.compute_efficiency <= 0.95
    assert 0.05 <= fit.params.kv_memory_efficiency <= 0.95
    assert fit.params.memory_efficiency == replay.timing.params.memory_efficiency
    mask = fit_mask(run_, 0.5)
    assert 0 < mask.sum() < len(mask)
    arrival = run_.requests["arrival_s"].to_numpy()
    assert arrival[mask].max() < arrival[~mask].min()
    assert fit.after["heldout"]["ttft_s"]["n"] == int((~mask).sum())
    for bad, match in ((("request_overhead_s",), "engine timestamps"),
                       (("nonsense",), "cannot fit")):
        with pytest.raises(Exception, match=match):
            fit_serving(replay, bad, max_evaluations=1)
    with pytest.raises(Exception, match="--split"):
        fit_mask(run_, 1.5)


def test_score_matches_scikit_learn():
    from sklearn.metrics import mean_absolute_percentage_error

    run_ = read_serving(PRO)
    predicted, _, _ = replay_for(run_).predict()
    true = measured(run_)
    s = score(true, predicted, np.ones(len(true), bool))
    for m in METRICS:
        ok = true[m].notna() & (true[m] > 0)
        assert s[m]["mape_pct"] == pytest.approx(100 * mean_absolute_percentage_error(
            true[m][ok], predicted[m][ok]))


def test_calibrate_cli_on_a_serving_run(tmp_path):
    out = tmp_path / "cal"
    result = run(kavier_cli, "calibrate", "--dataset", PRO, "--fit",
                 "compute_efficiency,memory_efficiency", "--max-evaluations", "6",
                 "--predict", RTX4090, "--output-folder", out)
    assert result.exit_code == 0, result.output
    assert "calibrated, held out" in result.output
    assert f"predicting {RTX4090}, all requests" in result.output     # the whole name
    assert "step-phase floor, held out" in result.output
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 300 and set(table["split"]) == {"fit", "heldout"}
    for name in ("cdf.png", "cdf.pdf", "timeseries.png", "timeseries.pdf", "report.md"):
        assert (out / name).stat().st_size > 1000
    scores = json.loads((out / "scores.json").read_text())
    assert scores["fitted"] == ["compute_efficiency", "memory_efficiency"]
    assert scores["phase_floor_heldout"]["ttft_s"]["n"] == (table["split"] == "heldout").sum()
    assert "step-phase floor" in (out / "report.md").read_text()
    expected = scores["expected_over_phases"]          # one draw: the 16-draw rows beside
    assert expected["draws"] == 16 and "held out, mean of 16 phase draws" in result.output
    assert expected["heldout"]["ttft_s"]["n"] == expected["floor"]["ttft_s"]["n"] == (
        table["split"] == "heldout").sum()
    assert "mean of 16 phase draws" in (out / "report.md").read_text()
    measured_tpot = read_serving(PRO).requests
    ok = measured_tpot["n_output_tokens"] > 1
    token_mean = ((measured_tpot["e2e_s"] - measured_tpot["ttft_s"])[ok].sum()
                  / (measured_tpot["n_output_tokens"][ok] - 1).sum())
    assert scores["itl"]["measured_s"]["mean"] == pytest.approx(token_mean)
    assert scores["itl"]["measured_s"]["p50"] is None           # no per-token gaps recorded
    profile = Profile.read(out / "profile.json")
    assert profile.gpu == "RTX-PRO-6000" and profile.llm == "Llama-3.1-8B"
    sim = run(kavier_cli, "simulate", "--trace", PRO, "--profile", out / "profile.json",
              "--output-folder", tmp_path / "sim")
    assert sim.exit_code == 0, sim.output
    rejected = run(kavier_cli, "calibrate", "--dataset", PRO, "--setup-id", "x",
                   "--output-folder", tmp_path / "r")
    assert rejected.exit_code == 2 and "--setup-id has no effect" in rejected.output
    rejected = run(kavier_cli, "calibrate", "--split", "0.3", "--output-folder", tmp_path / "r2")
    assert rejected.exit_code == 2 and "--split has no effect" in rejected.output


def test_shipped_profiles_by_name(tmp_path):
    from calibrate.profile import shipped_profiles

    assert {"a10-llama-3-8b-vllm", "rtx-4090-llama-3.1-8b-vllm-0.19",
            "rtx-pro-6000-llama-3.1-8b-vllm-0.19"} <= set(shipped_profiles())
    for name in shipped_profiles():
        profile = Profile.read(name)
        assert profile.params.compute_efficiency <= 0.95 and profile.mape_pct
    result = run(kavier_cli, "simulate", "--trace", RTX4090, "--profile",
                 "rtx-4090-llama-3.1-8b-vllm-0.19", "--num-gpu-blocks", "2588",
                 "--max-num-batched-tokens", "2048", "--output-folder", tmp_path / "sim")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    measured_median = read_serving(RTX4090).requests["e2e_s"].median()
    assert summary["p50_e2e_s"] == pytest.approx(measured_median, rel=0.1)
    wrong = run(kavier_cli, "simulate", "--trace", RTX4090, "--profile", "rtx-4090",
                "--output-folder", tmp_path / "w")
    assert wrong.exit_code == 2 and "did you mean rtx-4090-llama-3.1-8b-vllm-0.19" in wrong.output


def _shipped_serving_profiles():
    from calibrate.profile import shipped_profiles

    return [name for name in shipped_profiles()
            if any("serving" in d for d in Profile.read(name).datasets)]


@pytest.mark.parametrize("name", _shipped_serving_profiles())
def test_a_shipped_serving_profile_is_current_and_replays_to_its_recorded_scores(name):
    # a change that moves the roofline's predictions must bump TIMING_REVISION and refit
    profile = Profile.read(name)
    assert profile.stale() is None
    run_ = read_serving(profile.datasets[0])
    predicted = replay_for(run_, profile.params).predict()[0]
    held_out = score(measured(run_), predicted, ~fit_mask(run_, 0.5))
    for metric in METRICS:
        assert held_out[metric]["mape_pct"] == pytest.approx(
            profile.mape_pct["heldout"][metric]["mape_pct"], rel=1e-9)


def _engine_file(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"gpu": "NVIDIA A100-SXM4-80GB", "llm": "Llama-3.1-8B",
                                "version": "0.10.1", "max_num_seqs": 64,
                                "max_num_batched_tokens": 4096}))
    return path


def test_inference_perf_import(tmp_path):
    records = [
        {"start_time": 100.0, "end_time": 100.5, "request": "...", "response": "...",
         "info": {"input_tokens": 120, "output_tokens": 3,
                  "output_token_times": [100.2, 100.3, 100.45]}, "error": None},
        {"start_time": 100.4, "end_time": 101.0, "request": "...", "response": None,
         "info": {"input_tokens": 80, "output_tokens": 0, "output_token_times": []},
         "error": {"error_type": "timeout", "error_msg": "read timed out"}},
    ]
    (tmp_path / "per_request_lifecycle_metrics.json").write_text(json.dumps(records))
    dest = tmp_path / "ip"
    result = run(archive_cli, "import", "inference-perf",
                 tmp_path / "per_request_lifecycle_metrics.json", dest, "--engine",
                 _engine_file(tmp_path))
    assert result.exit_code == 0, result.output
    assert validate(dest) == []
    r = read_serving(dest)
    assert r.requests["ttft_s"].iloc[0] == pytest.approx(0.2)
    assert r.requests["e2e_s"].iloc[0] == pytest.approx(0.45)
    assert r.requests["tpot_s"].iloc[0] == pytest.approx(0.125)
    assert r.requests["itl_s"].iloc[0].tolist() == pytest.approx([0.1, 0.15])
    assert r.requests["arrival_s"].tolist() == pytest.approx([0.0, 0.4])
    assert r.requests["error"].iloc[1] == "read timed out"
    assert r.engine["timestamps"] == "client" and r.engine["llm"] == "Llama-3.1-8B"
    (tmp_path / "bad.json").write_text(json.dumps([{"start_time": 1.0}]))
    bad = run(archive_cli, "import", "inference-perf", tmp_path / "bad.json", tmp_path / "b",
              "--engine", _engine_file(tmp_path))
    assert bad.exit_code == 2 and "line 1: field 'info'" in bad.output


def test_guidellm_import(tmp_path):
    def stats(i, start, first, last, n_out):
        return {"request_id": f"r{i}", "prompt_tokens": 64 * (i + 1), "output_tokens": n_out,
                "info": {"timings": {"request_start": start, "first_token_iteration": first,
                                     "last_token_iteration": last, "request_end": last}}}

    report = {"benchmarks": [{"config": {"model": "meta-llama/Llama-3.1-8B"}, "requests": {
        "successful": [stats(0, 50.0, 50.1, 50.9, 9), stats(1, 50.5, 50.8, 51.2, 5)],
        "incomplete": [stats(2, 51.0, None, None, 0)], "errored": []}}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    dest = tmp_path / "g"
    result = run(archive_cli, "import", "guidellm", tmp_path / "report.json", dest,
                 "--engine", _engine_file(tmp_path))
    assert result.exit_code == 0, result.output
    r = read_serving(dest)
    assert validate(dest) == []
    assert r.requests["ttft_s"].tolist()[:2] == pytest.approx([0.1, 0.3])
    assert r.requests["tpot_s"].iloc[0] == pytest.approx(0.1)
    assert r.requests["error"].iloc[2] == "incomplete" and list(r.ok) == [True, True, False]
    report["benchmarks"].append(report["benchmarks"][0])
    (tmp_path / "two.json").write_text(json.dumps(report))
    two = run(archive_cli, "import", "guidellm", tmp_path / "two.json", tmp_path / "t",
              "--engine", _engine_file(tmp_path))
    assert two.exit_code == 2 and "--benchmark" in two.output
    one = run(archive_cli, "import", "guidellm", tmp_path / "two.json", tmp_path / "t",
              "--engine", _engine_file(tmp_path), "--benchmark", "1")
    assert one.exit_code == 0, one.output
    misplaced = run(archive_cli, "import", "inference-perf", tmp_path / "two.json",
                    tmp_path / "m", "--engine", _engine_file(tmp_path), "--benchmark", "1")
    assert misplaced.exit_code == 2 and "--benchmark" in misplaced.output


def test_fit_recovers_parameters_a_client_timed_run_was_made_with():
    """A run simulated with known parameters (front-end overhead 30 ms, compute 0.5) and
    client timestamps: fitting from other starting values finds them again."""
    from archive.serving import ServingRun
    from calibrate.serving import Replay

    base = read_serving(PRO)
    requests = base.requests.iloc[:120].copy()
    engine = {**base.engine, "timestamps": "client"}
    truth = TimingParams(compute_efficiency=0.5, memory_efficiency=0.7,
                         kv_memory_efficiency=0.6, request_overhead_s=0.03)
    made = replay_for(ServingRun(requests, engine, None, 16, "made"), truth)
    predicted, _, _ = made.predict()
    for m in METRICS:
        requests[m] = predicted[m].to_numpy()
    run_ = ServingRun(requests, engine, None, 16, "made")
    replay: Replay = replay_for(run_, truth.with_(compute_efficiency=0.3,
                                                  request_overhead_s=0.005))
    fit = fit_serving(replay, ("compute_efficiency", "request_overhead_s"),
                      max_evaluations=100)
    assert fit.params.request_overhead_s == pytest.approx(0.03, rel=0.03)
    assert fit.params.compute_efficiency == pytest.approx(0.5, rel=0.03)
    assert objective(fit.after["heldout"]) < objective(fit.before["heldout"]) / 10


def _made_replay(truth: TimingParams, start: TimingParams):
    """The first 120 requests of the RTX PRO 6000 run with the latencies a replay with
    ``truth`` gives them, set up for a fit from ``start``."""
    from archive.serving import ServingRun

    base = read_serving(PRO)
    requests = base.requests.iloc[:120].copy()
    predicted, _, _ = replay_for(ServingRun(requests, base.engine, None, 16, "made"),
                                 truth).predict()
    for m in METRICS:
        requests[m] = predicted[m].to_numpy()
    return replay_for(ServingRun(requests, base.engine, None, 16, "made"), start)


def test_fit_recovers_the_tokens_at_half_compute_efficiency():
    """``compute_half_tokens`` (chunk-size-dependent compute efficiency) is identified by a
    run's mix of prefill chunk sizes: a run made with n½ = 48 and C_e = 0.5 gives them back."""
    truth = TimingParams(compute_efficiency=0.5, memory_efficiency=0.7,
                         kv_memory_efficiency=0.6, request_overhead_s=0.0,
                         compute_half_tokens=48.0)
    replay = _made_replay(truth, truth.with_(compute_efficiency=0.35, compute_half_tokens=0.0))
    # (the replay schedules ahead, as the run's vLLM 0.19 did: admissions move by whole steps,
    # so the loss has edges the restarted simplex needs the evaluations to get past)
    fit = fit_serving(replay, ("compute_efficiency", "compute_half_tokens"),
                      max_evaluations=200)
    assert fit.params.compute_half_tokens == pytest.approx(48.0, rel=0.1)
    assert fit.params.compute_efficiency == pytest.approx(0.5, rel=0.05)


def test_fit_recovers_the_prefill_sharpness_and_keeps_it_at_least_one():
    """``prefill_sharpness`` is identified by a run's mixed steps: a run made with p = 1.4
    gives it back from the library's 2.0, and the fit's coordinate never maps below 1 (the
    sum of compute and memory time)."""
    from calibrate.serving import _Space

    truth = TimingParams(compute_efficiency=0.5, memory_efficiency=0.7,
                         kv_memory_efficiency=0.6, request_overhead_s=0.0,
                         prefill_sharpness=1.4)
    replay = _made_replay(truth, truth.with_(prefill_sharpness=None))
    fit = fit_serving(replay, ("prefill_sharpness",), max_evaluations=60)
    assert fit.params.prefill_sharpness == pytest.approx(1.4, rel=0.05)
    space = _Space(("prefill_sharpness",), 0.95)
    assert space.value("prefill_sharpness", -50.0) >= 1.0
    assert space.value("prefill_sharpness", space.coordinate("prefill_sharpness", 2.5)) == (
        pytest.approx(2.5))


def test_max_efficiency_bounds_the_fit_and_is_checked():
    replay = replay_for(read_serving(PRO))
    fit = fit_serving(replay, ("compute_efficiency",), max_efficiency=0.3, max_evaluations=4)
    assert 0.05 <= fit.params.compute_efficiency <= 0.3
    with pytest.raises(Exception, match="--max-efficiency"):
        fit_serving(replay, ("compute_efficiency",), max_efficiency=1.5, max_evaluations=1)
    with pytest.raises(Exception, match="--split"):
        fit_serving(replay, ("compute_efficiency",), split=0.0, max_evaluations=1)


def test_collective_terms_are_not_fitted_on_a_run_without_collectives():
    replay = replay_for(read_serving(PRO))
    for name in ("allreduce_latency_s", "link_efficiency"):
        with pytest.raises(Exception, match="no collectives"):
            fit_serving(replay, ("compute_efficiency", name), max_evaluations=1)


def test_replays_schedule_ahead_as_the_runs_vllm_did():
    from calibrate.serving import async_scheduling

    assert async_scheduling({"name": "vLLM", "version": "0.19.0"})
    assert not async_scheduling({"name": "vLLM", "version": "0.9.0"})
    assert not async_scheduling({"name": "vLLM", "version": "0.19.0", "async_scheduling": False})
    assert async_scheduling({"name": "vLLM", "version": "0.9.0", "async_scheduling": True})
    assert not async_scheduling({"name": "vLLM", "version": "unknown"})
    assert not async_scheduling({"name": "SGLang", "version": "0.19.0"})
    assert replay_for(read_serving(PRO)).config.async_scheduling       # vLLM 0.19.0


def _run_of(n_in, n_out, arrival):
    from archive.serving import ServingRun

    base = read_serving(PRO)
    requests = base.requests.iloc[:len(arrival)].copy()
    requests["n_input_tokens"], requests["n_output_tokens"] = n_in, n_out
    requests["arrival_s"], requests["hash_ids"] = arrival, None
    engine = {**base.engine, "enable_prefix_caching": False}
    return ServingRun(requests.reset_index(drop=True), engine, None, 16, "made")


def test_step_phase_floor_is_zero_on_an_idle_engine_and_not_under_load():
    """:func:`phase_floor`: requests reaching an idle engine start at once, so moving them by
    less than a step changes nothing; requests reaching an engine that is stepping wait for
    a step boundary, whose phase moves their TTFT by up to a step."""
    from calibrate.serving import phase_floor

    n = 40
    idle = replay_for(_run_of(np.full(n, 200), np.full(n, 4), np.arange(n) * 2.0))
    pred, _, steps = idle.predict()
    floor = phase_floor(idle, pred, steps, np.ones(n, bool))
    assert floor["ttft_s"]["n"] == n
    assert all(floor[m]["mape_pct"] == pytest.approx(0.0, abs=1e-9) for m in METRICS)
    # one long answer keeps the engine stepping; the short requests join it mid-step
    n_out = np.full(n, 4)
    n_out[0] = 4000
    busy = replay_for(_run_of(np.full(n, 200), n_out, np.r_[0.0, 0.5 + np.arange(n - 1)]))
    pred, _, steps = busy.predict()
    late = np.arange(n) > 0
    floor = phase_floor(busy, pred, steps, late)
    assert floor["ttft_s"]["mape_pct"] > 5.0
    assert floor["tpot_s"]["mape_pct"] < 1.0      # the steps themselves are alike
    assert phase_floor(busy, pred, None, late) is None


def test_step_phase_floor_scores_the_held_out_requests_as_their_row_does():
    from calibrate.serving import calibrate_serving

    half = calibrate_serving(PRO, ("compute_efficiency",), 0.5, max_evaluations=2)
    assert half.floor["ttft_s"]["n"] == half.fit.after["heldout"]["ttft_s"]["n"] > 0
    whole = calibrate_serving(PRO, ("compute_efficiency",), 1.0, max_evaluations=2)
    assert whole.floor["ttft_s"]["n"] == whole.fit.after["heldout"]["ttft_s"]["n"] == 0


def test_phase_draws_average_latencies_over_arrival_phases():
    """:meth:`Replay.expected`: on an idle engine the phase within a step changes nothing,
    so the mean over draws is the replay itself; behind a busy engine each draw moves the
    short requests' TTFT by up to a step and the mean lies within the draws' range."""
    from dataclasses import replace

    from calibrate.serving import calibrate_serving

    n = 40
    idle = replay_for(_run_of(np.full(n, 200), np.full(n, 4), np.arange(n) * 2.0))
    one, _, _ = idle.predict()
    mean, _, _ = replace(idle, phase_draws=6).predict()
    for m in METRICS:
        np.testing.assert_allclose(mean[m], one[m], rtol=1e-9, atol=1e-12)
    n_out = np.full(n, 4)
    n_out[0] = 4000
    busy = replay_for(_run_of(np.full(n, 200), n_out, np.r_[0.0, 0.5 + np.arange(n - 1)]))
    single, _, steps = busy.predict()
    averaged, summary, steps_too = replace(busy, phase_draws=6).predict()
    again, _, _ = replace(busy, phase_draws=6).predict()
    pd.testing.assert_frame_equal(averaged, again)            # fixed seeds: deterministic
    assert steps_too.num_rows == steps.num_rows               # the timeline is the replay's
    moved = np.abs(averaged.ttft_s - single.ttft_s).to_numpy()[1:]
    step_s = float(np.median(steps.column("duration_s").to_numpy()))
    assert moved.max() > 0.01 * step_s and moved.max() < 1.5 * step_s
    pd.testing.assert_series_equal(averaged.end_s, single.end_s)   # the record's times stay
    with pytest.raises(InputError, match="at least 1"):
        calibrate_serving(PRO, ("compute_efficiency",), phase_draws=0)


def test_phase_draws_bring_the_moe_runs_held_out_ttft_toward_its_floor(tmp_path):
    """On the bundled Qwen3-30B-A3B run, whose TTFTs are two or three steps, the shipped
    profile's per-request TTFT error falls with the mean over phase draws, and the floor of
    that prediction is scored against single draws."""
    from dataclasses import replace

    from calibrate.serving import phase_floor

    name = "vllm-serving-rtxpro6000-qwen3-30b-a3b"
    run_ = read_serving(name)
    from calibrate.profile import profile_path

    params = Profile.read(profile_path("rtx-pro-6000-qwen3-30b-a3b-dp2-ep-vllm-0.19")).params
    truth, held = measured(run_), ~fit_mask(run_, 0.5)
    base = replay_for(run_, params)
    one = score(truth, base.predict()[0], held)["ttft_s"]["mape_pct"]
    replay = replace(base, phase_draws=8)
    predicted, _, steps = replay.predict()
    eight = score(truth, predicted, held)["ttft_s"]["mape_pct"]
    floor = phase_floor(replay, predicted, steps, held)["ttft_s"]["mape_pct"]
    assert eight < 0.8 * one
    assert 0.5 * floor < eight < 1.5 * floor
    rejected = run(kavier_cli, "calibrate", "--phase-draws", "4", "--output-folder", tmp_path)
    assert rejected.exit_code == 2 and "--phase-draws has no effect" in rejected.output
    done = run(kavier_cli, "calibrate", "--dataset", name, "--fit", "link_efficiency",
               "--max-evaluations", "2", "--phase-draws", "3", "--output-folder",
               tmp_path / "cal")
    assert done.exit_code == 0, done.output
    assert "2 replays of 3 arrival-phase draws each" in done.output
    scores = json.loads((tmp_path / "cal" / "scores.json").read_text())
    assert scores["phase_draws"] == 3 and scores["expected_over_phases"] is None
    assert "3 arrival-phase draws" in Profile.read(tmp_path / "cal" / "profile.json").cv


def test_a_fit_that_keeps_its_start_records_the_links_own_values(tmp_path):
    """With no better point than the start, a fitted collective term the defaults leave to
    the link (None) is written as the value the model used, the link's own, instead of None
    (which had stopped the report with a TypeError)."""
    name = "vllm-serving-rtxpro6000-qwen3-32b-tp2"
    done = run(kavier_cli, "calibrate", "--dataset", name, "--fit",
               "link_efficiency,allreduce_latency_s", "--max-evaluations", "1",
               "--output-folder", tmp_path)
    assert done.exit_code == 0, done.output
    profile = Profile.read(tmp_path / "profile.json")
    link = replay_for(read_serving(name)).timing.tp_link
    assert profile.params.link_efficiency == link.efficiency == 0.25
    assert profile.params.allreduce_latency_s == link.latency_s
    scores = json.loads((tmp_path / "scores.json").read_text())
    for m in METRICS:      # the same model as the start: the same scores
        assert scores["after"]["heldout"][m]["mape_pct"] == pytest.approx(
            scores["before"]["heldout"][m]["mape_pct"])


def test_validate_and_read_check_a_serving_runs_engine_settings(tmp_path):
    """``archive validate`` lists every bad engine setting (it had said "valid" to a NaN
    max_num_seqs a run recorded), and reading the run stops at the first, naming it."""
    import shutil

    from archive.datasets import dataset_dir

    folder = tmp_path / "run"
    shutil.copytree(dataset_dir(PRO), folder)
    card = folder / "dataset.json"
    meta = json.loads(card.read_text())
    meta["engine"].update(max_num_seqs=float("nan"), gpu_memory_utilization=2.0,
                          enable_chunked_prefill="yes")
    del meta["engine"]["block_size"]
    card.write_text(json.dumps(meta))
    problems = validate(folder)
    assert "dataset.json: engine.block_size: missing in the engine section" in problems
    assert "dataset.json: engine.max_num_seqs: must be an integer >= 1, got nan" in problems
    assert ("dataset.json: engine.gpu_memory_utilization: must be a number in (0, 1], got 2.0"
            in problems)
    assert any("engine.enable_chunked_prefill: must be true, false or null" in p
               for p in problems)
    with pytest.raises(InputError, match="field 'engine.block_size': missing"):
        read_serving(folder)
    assert validate(dataset_dir(PRO)) == []
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "requests.parquet")
    ttft = table.column("ttft_s").to_pylist()
    ttft[3] = float("inf")                         # NaN was flagged; inf passed ">= 0"
    index = table.schema.get_field_index("ttft_s")
    pq.write_table(table.set_column(index, table.schema.field(index),
                                    pa.array(ttft, pa.float64())), folder / "requests.parquet")
    assert any("infinite ttft_s (and no error) (rows 4)" in p for p in validate(folder))


def test_a_serving_run_of_a_model_and_gpu_outside_the_library_calibrates_with_extra_entries(
        tmp_path, option_files):
    # calibrate had refused --llm-library and --gpu-library for serving runs, so a run of a
    # model or GPU the bundled library lacks could not be calibrated at all
    from archive.importers.serving import import_tracer_bench

    rng = np.random.default_rng(4)
    log = tmp_path / "requests.jsonl"
    log.write_text("".join(json.dumps({
        "request_id": str(i), "start_s": 0.3 * i, "n_input_tokens": int(rng.integers(64, 900)),
        "n_output_tokens": 20, "ttft_s": 0.05, "itl_s": [0.012] * 19, "error": None}) + "\n"
        for i in range(40)))
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"gpu": "Half-A10", "llm": "Tiny-1B", "max_num_seqs": 8,
                                  "max_num_batched_tokens": 2048, "version": "0.11.0"}))
    run = tmp_path / "run"
    import_tracer_bench(log, run, engine)
    args = ["calibrate", "--dataset", str(run), "--fit", "compute_efficiency,memory_efficiency",
            "--max-evaluations", "30", "--output-folder", str(tmp_path / "cal")]
    unknown = CliRunner().invoke(kavier_cli, args)
    assert unknown.exit_code == 2 and "unknown llm 'Tiny-1B'" in unknown.output
    result = CliRunner().invoke(kavier_cli, [*args, "--llm-library", str(option_files["llms"]),
                                             "--gpu-library", str(option_files["gpus"])])
    assert result.exit_code == 0, result.output
    profile = Profile.read(tmp_path / "cal" / "profile.json")
    assert (profile.llm, profile.gpu) == ("Tiny-1B", "Half-A10")
    assert profile.mape_pct["heldout"]["ttft_s"]["mape_pct"] < \
        profile.mape_pct["defaults_heldout"]["ttft_s"]["mape_pct"]


@pytest.mark.parametrize("setting, value", [("kv_cache_dtype", "nvfp4"),
                                            ("quantization", "fp8"), ("dtype", "float32")])
def test_a_run_with_an_engine_setting_the_simulator_does_not_model_is_refused(
        tmp_path, setting, value):
    # the import had dropped kv_cache_dtype and quantization, so a run with an FP8 KV cache
    # or FP8 weights was replayed as a 16-bit engine: silently another engine
    folder, _, _ = _llmservingsim_folder(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["engine_kwargs"].update({setting: value, "pipeline_parallel_size": 1,
                                  "async_scheduling": False})
    (folder / "meta.json").write_text(json.dumps(meta))
    dest = tmp_path / "dataset"
    assert run(archive_cli, "import", "llmservingsim", folder, dest).exit_code == 0
    engine = read_serving(dest).engine
    assert engine[setting] == value and engine["pipeline_parallel_size"] == 1
    assert engine["async_scheduling"] is False            # recorded, not the version's default
    result = run(kavier_cli, "calibrate", "--dataset", dest, "--output-folder", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert f"field 'engine.{setting}': {setting} '{value}'" in result.output
    assert "is not modelled" in result.output and not (tmp_path / "c").exists()


def test_a_run_with_an_fp8_kv_cache_is_replayed_with_one_byte_per_element(tmp_path):
    # vLLM's --kv-cache-dtype fp8 halves the KV bytes attention reads; the replay follows it
    folder, _, _ = _llmservingsim_folder(tmp_path, n=12)
    runs = {}
    for dtype in ("auto", "fp8"):
        meta = json.loads((folder / "meta.json").read_text())
        meta["engine_kwargs"]["kv_cache_dtype"] = dtype
        (folder / "meta.json").write_text(json.dumps(meta))
        dest = tmp_path / dtype
        assert run(archive_cli, "import", "llmservingsim", folder, dest).exit_code == 0
        runs[dtype] = replay_for(read_serving(dest))
    auto, fp8 = runs["auto"].timing, runs["fp8"].timing
    assert fp8.kv_bytes_per_token == pytest.approx(auto.kv_bytes_per_token / 2)
    assert fp8.llm.params == auto.llm.params            # the weights are the same
    context = np.array([4000.0])
    assert fp8.decode_run(context, 1).duration_s[0] < auto.decode_run(context, 1).duration_s[0]
