"""Continuous batching: equality with the sequential engine, conservation, monotonicity,
preemption, prefix reuse, routing, capacity."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import archive
from kavier.batching import BatchingConfig, BatchSimulator, arrivals, goodput
from kavier.cache import PrefixCache, PrefixCacheConfig
from kavier.cli import main
from kavier.engine import simulate
from kavier.library import gpu_library, llm_library
from kavier.timing import TimingParams, make_timing


@pytest.fixture(scope="module")
def timing():
    return make_timing("roofline", llm_library().get("Llama-3-8B"),
                       gpu_library().get("A100-80GB"),
                       TimingParams(prefill_sharpness=1.96, token_overhead_s=0.001))


def workload(n=60, seed=0, rate=4.0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"arrival_s": np.cumsum(rng.exponential(1 / rate, n)),
                         "n_input_tokens": rng.integers(1, 3000, n),
                         "n_output_tokens": rng.integers(1, 300, n),
                         "session_id": rng.integers(0, 5, n)})


def test_one_sequence_at_a_time_equals_the_sequential_engine(timing):
    w = workload().drop(columns=["arrival_s"])
    seq = simulate(w, timing, honor_arrivals=False).sort_values("id")
    r, _ = BatchSimulator(timing, BatchingConfig(max_num_seqs=1,
                                                 max_num_batched_tokens=10**6)).run(w)
    assert np.allclose(r["start_s"], seq["start_s"].to_numpy(), rtol=1e-12, atol=1e-9)
    assert np.allclose(r["end_s"], seq["end_s"].to_numpy(), rtol=1e-12, atol=1e-9)
    assert np.allclose(r["ttft_s"] - r["start_s"], seq["prefill_s"].to_numpy(), atol=1e-9)


def test_tokens_are_conserved_and_batches_respect_the_limits(timing):
    w = workload(200, rate=50.0)
    steps = []
    config = BatchingConfig(max_num_seqs=8, max_num_batched_tokens=1024)
    r, s = BatchSimulator(timing, config).run(w, steps=steps)
    log = pd.DataFrame(steps, columns=["replica", "start", "dur", "n", "prefill", "decode",
                                       "blocks"])
    assert log["prefill"].sum() == w["n_input_tokens"].sum()
    assert log["decode"].sum() == (w["n_output_tokens"] - 1).sum()
    assert (log["n"] <= 8).all() and ((log["prefill"] + log["decode"]) <= 1024).all()
    assert np.isfinite(r["end_s"]).all() and (r["ttft_s"] >= r["queue_s"]).all()
    assert s["busy_fraction"][0] == pytest.approx(log["dur"].sum() / s["makespan_s"])
    # Little's law in integral form: requests running, summed over the steps' durations,
    # equals the requests' time from admission to finish (no preemption here)
    assert s["preemptions"] == 0
    assert (log["n"] * log["dur"]).sum() == pytest.approx((r["end_s"] - r["start_s"]).sum(),
                                                          rel=1e-9)
    steps_starts = log["start"].to_numpy()
    assert (np.diff(steps_starts) > 0).all()                  # one replica, one step at a time


def test_more_replicas_never_queue_more_and_a_bigger_pool_never_preempts_more(timing):
    w = workload(300, rate=30.0)
    queue = [BatchSimulator(timing, BatchingConfig(replicas=n)).run(w)[1]["mean_queue_s"]
             for n in (1, 2, 4)]
    assert queue[0] >= queue[1] >= queue[2]
    preempted = [BatchSimulator(timing, BatchingConfig(pool_blocks=p)).run(w)[1]["preemptions"]
                 for p in (400, 800, 100_000)]
    assert preempted[0] >= preempted[1] >= preempted[2] == 0 and preempted[0] > 0
    small = BatchSimulator(timing, BatchingConfig(pool_blocks=400)).run(w)[0]
    assert np.isfinite(small["end_s"]).all()                  # everyone finishes anyway


def test_prefix_reuse_and_affinity_routing(timing):
    w = archive.read_trace("mooncake-fast25-conversation")
    part = w.requests.iloc[:400]
    cache = PrefixCache(PrefixCacheConfig("blocks"), w.content)
    rows = np.arange(len(part))
    simulator = BatchSimulator(timing, BatchingConfig(replicas=2), cache)
    with_cache, _ = simulator.run(part, rows)
    stats = simulator.cache_stats()
    assert stats["reused_tokens"] == with_cache["n_cached_tokens"].sum()
    assert stats["lookups"] == (part["n_input_tokens"] >= 512).sum()     # per-replica caches
    without, _ = BatchSimulator(timing, BatchingConfig(replicas=2)).run(part, rows)
    assert with_cache["n_cached_tokens"].sum() > 0
    assert with_cache["ttft_s"].mean() < without["ttft_s"].mean()
    sessions = workload(100)
    r, _ = BatchSimulator(timing, BatchingConfig(replicas=3, router="prefix-affinity")).run(
        sessions)
    assert r.groupby(sessions["session_id"])["replica"].nunique().max() == 1


def test_arrival_rescaling_goodput_and_errors(timing):
    w = workload(50)
    assert np.allclose(arrivals(w, rate_scale=2.0)["arrival_s"], w["arrival_s"] / 2)
    poisson = arrivals(w, poisson_rate=10.0)["arrival_s"]
    assert poisson.iloc[0] == 0 and 2 < poisson.iloc[-1] < 10
    r, _ = BatchSimulator(timing, BatchingConfig()).run(w)
    assert goodput(r, None, None) == 1.0 and 0 <= goodput(r, 1e-6, None) < 1
    with pytest.raises(ValueError, match="roofline"):
        BatchSimulator(make_timing("thesis", timing.llm, timing.gpu), BatchingConfig())
    with pytest.raises(ValueError, match="pool"):
        BatchSimulator(timing, BatchingConfig(pool_blocks=2)).run(w)


def test_simulate_and_capacity_commands(tmp_path):
    trace = tmp_path / "t.csv"
    workload(120, rate=20.0).rename(columns={"arrival_s": "ts", "n_input_tokens": "num_in_t",
                                             "n_output_tokens": "num_out_t"}).to_csv(
        trace, index=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--timing-model",
                                       "roofline", "--gpu", "A100-80GB", "--replicas", "2",
                                       "--slo-ttft", "1", "--steps", "--output-folder",
                                       str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "batching" and 0 <= summary["goodput"] <= 1
    assert (out / "steps.parquet").exists() and summary["energy_gpu_wh"] > 0
    result = CliRunner().invoke(main, ["capacity", "--trace", str(trace), "--slo-ttft", "0.5",
                                       "--slo-tpot", "0.05"])
    assert result.exit_code == 0, result.output
    n = int(result.output.split("smallest: ")[1].split(" ")[0])
    verdicts = {int(line.split()[0]): "meets" in line for line in result.output.splitlines()
                if "replicas:" in line}
    assert verdicts[n] and (n == 1 or not verdicts[n - 1])


def test_batching_overheads_are_recovered_from_concurrent_measurements(timing):
    from calibrate.batching import concurrent_groups, fit_batching

    truth = make_timing("roofline", timing.llm, timing.gpu,
                        timing.params.with_(batch_step_overhead_s=0.003,
                                            batch_seq_overhead_s=0.0005))
    rows = []
    for c in (2, 4, 8):
        for n_in, n_out in ((64, 128), (512, 64), (2048, 32)):
            sim, _ = BatchSimulator(truth, BatchingConfig()).run(
                pd.DataFrame({"n_input_tokens": [n_in] * c, "n_output_tokens": [n_out] * c}))
            rows += [{"sweep": "decode", "n_input_tokens": n_in, "n_output_tokens": n_out,
                      "n_output_tokens_requested": n_out, "repetition": 0, "concurrency": c,
                      "latency_s": e2e, "error": None} for e2e in sim["e2e_s"]]
    df = pd.DataFrame(rows)
    assert len(concurrent_groups(df)) == 9
    fitted, report = fit_batching(df, timing)
    assert report["mape_after_pct"] < 0.5 < report["mape_before_pct"]
    assert fitted.params.batch_step_overhead_s == pytest.approx(0.003, rel=0.1)
    assert fitted.params.batch_seq_overhead_s == pytest.approx(0.0005, rel=0.2)
