"""The simulation core: one engine, its closed-form path, the KV pool, the timeline, energy."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

import archive
from kavier.cli import main
from kavier.models.power import PowerModel
from kavier.models.timing import RooflineTiming, ThesisTiming, TimingParams
from kavier.sim.config import EngineConfig
from kavier.sim.kvpool import BlockPool
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import CarbonTrace, Sustainability


@pytest.fixture(scope="module")
def azure():
    return archive.read_trace("azure-llm-inference-2023-conv").table.slice(0, 400)


@pytest.fixture(scope="module")
def mooncake():
    return archive.read_trace("mooncake-fast25-conversation")


def linear(gpu):
    return Sustainability(PowerModel.linear_for(gpu))


def run(table, timing, config, block=16, prefix=None, sus=None, path="auto"):
    reqs, steps = [], []
    s = simulate(table, timing, config, block, prefix, sus or linear(timing.gpu), reqs.append,
                 lambda b, p: steps.append(b), path=path)
    return (pa.concat_tables(reqs).to_pandas().sort_values("id").reset_index(drop=True),
            pa.Table.from_batches(steps).to_pandas(), s)


ONE = EngineConfig(max_num_seqs=1, back_to_back=True)


@pytest.mark.parametrize("kv", [True, False])
@pytest.mark.parametrize("timing_cls", [RooflineTiming, ThesisTiming])
def test_one_at_a_time_equals_the_thesis_mode(azure, llama8b, a10, kv, timing_cls):
    timing = timing_cls(llama8b, a10, kv_cache=kv)
    config = EngineConfig(max_num_seqs=1, back_to_back=True, chunked_prefill=False,
                          num_gpu_blocks=10**8)
    r, _, s = run(azure, timing, config)
    n_in, n_out = r["n_input_tokens"].to_numpy(), r["n_output_tokens"].to_numpy()
    prefill, decode = timing.prefill_s(n_in), timing.decode_s(n_in, n_out)
    np.testing.assert_allclose(r["ttft_s"], prefill, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(r["e2e_s"], prefill + decode, rtol=1e-9, atol=1e-8)
    assert r["end_s"].iloc[-1] == pytest.approx((prefill + decode).sum(), rel=1e-9)
    assert s["gpu_hours"] * 3600 == pytest.approx(
        (prefill + decode).sum() - len(r) * timing.params.request_overhead_s, rel=1e-9)


@pytest.mark.parametrize("arrivals,half", [(True, 0.0), (False, 0.0), (True, 300.0)])
@pytest.mark.parametrize("chunk", [8192, 300])
def test_closed_form_and_stepped_paths_give_identical_timelines(azure, llama8b, a10, arrivals,
                                                                half, chunk):
    timing = RooflineTiming(llama8b, a10, TimingParams(prefill_sharpness=1.7,
                                                       compute_half_tokens=half))
    config = EngineConfig(max_num_seqs=1, back_to_back=not arrivals,
                          max_num_batched_tokens=chunk)
    fast = run(azure, timing, config)
    slow = run(azure, timing, config, path="stepped")
    assert fast[2]["engine_path"] == "closed-form" and slow[2]["engine_path"] == "stepped"
    for a, b in ((fast[0], slow[0]), (fast[1], slow[1])):
        assert list(a.columns) == list(b.columns)
        for c in a.columns:
            if a[c].dtype.kind == "f":
                np.testing.assert_allclose(a[c], b[c], rtol=1e-9, atol=1e-9, err_msg=c)
            else:
                assert (a[c].astype(str) == b[c].astype(str)).all(), c
    for key in ("p50_itl_s", "p99_itl_s", "p90_ttft_s", "gpu_hours"):
        assert fast[2][key] == pytest.approx(slow[2][key], rel=1e-3), key


def test_closed_form_and_stepped_agree_with_prefix_blocks(mooncake, llama8b, a10):
    table = mooncake.table.slice(0, 300)
    timing = RooflineTiming(llama8b, a10)
    out = []
    for path in ("auto", "stepped"):
        cache = PrefixCache(PrefixCacheConfig("blocks"), mooncake.content)
        out.append(run(table, timing, EngineConfig(max_num_seqs=1, num_gpu_blocks=400), 512,
                       cache, path=path))
    np.testing.assert_array_equal(out[0][0]["n_cached_tokens"], out[1][0]["n_cached_tokens"])
    np.testing.assert_allclose(out[0][0]["e2e_s"], out[1][0]["e2e_s"], rtol=1e-9)
    assert out[0][2]["prefix_cache"] == out[1][2]["prefix_cache"]
    assert out[0][2]["prefix_cache"]["evictions"] > 0       # the pool limits the cache


def test_kv_pool_never_overflows_and_more_blocks_never_add_preemptions(azure, llama8b, a10):
    timing = RooflineTiming(llama8b, a10)
    preemptions = []
    for blocks in (600, 1200, 3400):
        r, steps, s = run(azure, timing, EngineConfig(num_gpu_blocks=blocks))
        assert steps["kv_blocks_used"].max() <= blocks
        assert s["peak_kv_blocks_used"] <= blocks
        preemptions.append(s["preemptions"])
        # token conservation: prompts (recomputed after preemption) and one decode token per
        # step for every output token after the first
        # every output token once: the first from the prompt's last step (again after each
        # preemption, whose recomputed prompt emits the next token), the rest from decode
        assert steps["decode_tokens"].sum() + len(r) + s["preemptions"] == (
            r["n_output_tokens"].sum())
        assert steps["prefill_tokens"].sum() >= r["n_input_tokens"].sum()
        assert (r["status"] == "finished").all()
    assert preemptions[0] > 0 and preemptions == sorted(preemptions, reverse=True)


def test_prefix_hit_never_increases_a_requests_latency(mooncake, llama8b, a10):
    table = mooncake.table.slice(0, 300)
    timing = RooflineTiming(llama8b, a10)
    cache = PrefixCache(PrefixCacheConfig("blocks"), mooncake.content)
    one = EngineConfig(max_num_seqs=1, back_to_back=True, num_gpu_blocks=400)
    with_cache = run(table, timing, one, 512, cache)[0]
    without = run(table, timing, one, 512)[0]
    service = (with_cache["e2e_s"] - with_cache["queue_s"]).to_numpy()
    base = (without["e2e_s"] - without["queue_s"]).to_numpy()
    assert (service <= base + 1e-12).all() and (service < base).sum() > 10


def test_block_pool_reference_counts_and_lazy_lru_eviction():
    pool = BlockPool(4)
    pool.allocate(2)
    assert pool.register(1) and pool.register(2) and not pool.register(1)
    pool.release(0, [1, 2])                       # both cached, free, findable
    assert pool.free == 4 and pool.match([1, 2, 3], 3) == (2, 2)
    pool.acquire([1])
    pool.allocate(3)                              # 2 plain, then evicts block 2 (LRU)
    assert pool.evictions == 1 and pool.match([1, 2], 2) == (1, 0) and pool.free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_front_end_overhead_is_beside_the_gpu(azure, llama8b, a10):
    t = pa.table({"n_input_tokens": [100] * 20, "n_output_tokens": [50] * 20,
                  "arrival_s": np.zeros(20)})
    slow = RooflineTiming(llama8b, a10, TimingParams(request_overhead_s=0.5))
    fast = RooflineTiming(llama8b, a10, TimingParams(request_overhead_s=0.0))
    a, steps_a, _ = run(t, slow, EngineConfig())
    b, steps_b, _ = run(t, fast, EngineConfig())
    np.testing.assert_allclose(a["ttft_s"] - 0.5, b["ttft_s"], rtol=1e-9)
    assert steps_a["duration_s"].sum() == pytest.approx(steps_b["duration_s"].sum(), rel=1e-9)


def test_request_timeout_aborts_and_frees(azure, llama8b, a10):
    timing = RooflineTiming(llama8b, a10)
    r, steps, s = run(azure, timing, EngineConfig(request_timeout_s=30.0, num_gpu_blocks=800))
    failed = r["status"] == "timeout"
    assert 0 < failed.sum() < len(r) and s["n_failed"] == failed.sum()
    np.testing.assert_allclose(r.loc[failed, "e2e_s"], 30.0)
    assert (r.loc[~failed, "e2e_s"] <= 30.0 + 5.0).all()
    assert s["p99_e2e_s"] <= r.loc[~failed, "e2e_s"].max() * 1.001


def independent_energy_j(steps, sus, replicas, end):
    u = np.minimum(np.maximum(steps["compute_s"], sus.memory_bound_utilization
                              * steps["memory_s"]) / steps["duration_s"], sus.utilization_cap)
    busy = (sus.power.power_w(u) * steps["duration_s"]).sum()
    return busy + sus.power.power_w(0.0) * (replicas * end - steps["duration_s"].sum())


@pytest.mark.parametrize("args", [["--max-num-seqs", "1", "--back-to-back"],
                                  ["--replicas", "2", "--router", "round-robin"]])
@pytest.mark.parametrize("rate", ["0", "0.1"])
def test_energy_agrees_in_summary_fragments_and_timeline(tmp_path, azure, args, rate):
    pq_path = tmp_path / "t.parquet"
    import pyarrow.parquet as pq

    pq.write_table(azure, pq_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(pq_path), "--power-model",
                                       "sqrt", "--steps", "--export-rate", rate,
                                       "--output-folder", str(out), *args])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    steps = pd.read_parquet(out / "steps.parquet")
    frag = pd.read_parquet(out / "fragments.parquet")
    sus = Sustainability(PowerModel("sqrt", 20.0, 150.0))
    gpu_j = s["sustainability"]["energy_gpu_j"]
    assert frag["energy_wh"].sum() * 3600 == pytest.approx(gpu_j, rel=1e-9)
    assert independent_energy_j(steps, sus, s["replicas"], s["timeline_s"]) == pytest.approx(
        gpu_j, rel=1e-9)
    decode = steps["prefill_tokens"] == 0
    assert steps.loc[decode, "mbu"].mean() > steps.loc[decode, "mfu"].mean()
    assert 0 < s["mfu"] < 1 and 0 < s["mbu"] < 1


def test_carbon_and_pue_for_a_batched_run_and_efficiency_reads_it(tmp_path, azure):
    import pyarrow.parquet as pq

    pq.write_table(azure, tmp_path / "t.parquet")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "simulate", "--trace", str(tmp_path / "t.parquet"), "--replicas", "2",
        "--carbon-trace", "NL", "--start", "2022-07-01T00:00Z", "--pue", "1.4",
        "--output-folder", str(out), "--no-opendc"])
    assert result.exit_code == 0, result.output
    e = json.loads((out / "summary.json").read_text())["sustainability"]
    assert e["energy_facility_wh"] == pytest.approx(1.4 * e["energy_gpu_wh"])
    frag = pd.read_parquet(out / "fragments.parquet")
    assert e["co2_g"] > 0 and frag["co2_g"].sum() == pytest.approx(e["co2_g"], rel=1e-9)
    eff = CliRunner().invoke(main, ["efficiency", str(out)])
    assert eff.exit_code == 0, eff.output
    assert "gCO2 per million tokens" in eff.output


def test_co2_integrates_intensity_across_carbon_steps(llama8b, a10):
    table = pd.DataFrame({"timestamp": pd.date_range("2022-07-01", periods=3, freq="15min",
                                                     tz="UTC"),
                          "carbon_intensity": [100.0, 300.0, 300.0]})
    trace = CarbonTrace(table, pd.Timestamp("2022-07-01T00:14:50Z"), "test")
    sus = Sustainability(PowerModel("constant", 20.0, 150.0), trace, pue=1.5)
    t = pa.table({"n_input_tokens": [100], "n_output_tokens": [1000]})
    timing = RooflineTiming(llama8b, a10)
    _, _, s = run(t, timing, ONE, sus=sus)
    end, o = s["timeline_s"], timing.params.request_overhead_s
    expected = 150.0 * 1.5 * (10.0 * 100.0 + (end - 10.0) * 300.0) / 3.6e6
    assert s["sustainability"]["co2_g"] == pytest.approx(expected, rel=1e-9) and end > 10 + o


def test_results_do_not_depend_on_pythonhashseed(tmp_path):
    t = pd.DataFrame({"n_input_tokens": np.arange(60) * 7 + 50, "n_output_tokens": 40,
                      "arrival_s": np.arange(60) * 0.05,
                      "session_id": [f"user-{i % 7}" for i in range(60)]})
    t.to_parquet(tmp_path / "t.parquet")
    outputs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        code = ("from kavier.cli import main; main(['simulate', '--trace', "
                f"'{tmp_path / 't.parquet'}', '--replicas', '3', '--router', "
                f"'prefix-affinity', '--output-folder', '{out}', '--no-fragments', "
                "'--no-opendc'])")
        subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.append(pd.read_parquet(out / "requests.parquet")[["replica", "ttft_s"]])
    assert outputs[0]["replica"].nunique() > 1
    for other in outputs[1:]:
        pd.testing.assert_frame_equal(outputs[0], other)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_closed_form_simulate_of_parquet_or_csv_never_imports_pandas(tmp_path, suffix):
    """pandas' import (0.25-0.3 s) would be a sixth of the whole one-at-a-time command at
    100,000 requests (see ``archive.arrow``); this keeps that path free of it."""
    script = """
import sys
from kavier.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("pandas imported:", "pandas" in sys.modules)
"""
    trace = archive.dataset_dir("azure-llm-inference-2023-conv") / "workload.parquet"
    if suffix == ".csv":
        csv = tmp_path / "trace.csv"
        columns = ["arrival_s", "n_input_tokens", "n_output_tokens"]
        pd.read_parquet(trace, columns=columns).to_csv(csv, index=False)
        trace = csv
    out = subprocess.run([sys.executable, "-c", script, "simulate", "--trace", str(trace),
                          "--max-num-seqs", "1", "--export-rate", "1", "--output-folder",
                          str(tmp_path / "sim")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("pandas imported: False"), out.stdout + out.stderr
    assert pd.read_parquet(tmp_path / "sim" / "requests.parquet").shape[0] == 19_366


@pytest.mark.parametrize("timing_cls", [RooflineTiming, ThesisTiming])
def test_exact_match_hits_save_prefill_and_full_hits_skip_the_gpu(llama8b, a10, timing_cls):
    from archive.traces import PromptContent

    prompt = np.arange(600)
    rows = [prompt, prompt, np.arange(1000, 1600)]
    content = PromptContent("tokens", np.array([0, 600, 1200, 1800]), np.concatenate(rows))
    t = pa.table({"n_input_tokens": [600, 600, 600], "n_output_tokens": [50, 50, 50]})
    timing = timing_cls(llama8b, a10)
    o = timing.params.request_overhead_s
    base = run(t, timing, ONE)[0]
    for policy in ("prefill", "full"):
        cache = PrefixCache(PrefixCacheConfig(policy, 256), content)
        r, _, s = run(t, timing, ONE, prefix=cache)
        assert list(r["n_cached_tokens"]) == [0, 599, 0]
        assert s["prefix_cache"]["hit_rate_tokens"] == pytest.approx(599 / 1800)
        if policy == "prefill":         # the hit computes only its last prompt token
            assert r["ttft_s"][1] == pytest.approx(o + float(timing.prefill_gpu_s(1, 599)))
            assert r["ttft_s"][1] < base["ttft_s"][1] and r["e2e_s"][1] < base["e2e_s"][1]
        else:                           # answered from the cache: no GPU work
            assert r["ttft_s"][1] == pytest.approx(o) and r["e2e_s"][1] == pytest.approx(o)
        assert r["e2e_s"][0] == pytest.approx(base["e2e_s"][0])


def test_littles_law_on_the_gpu_timeline(azure, llama8b, a10):
    """Time-averaged running sequences from the timeline = arrival rate × mean residence
    (scheduled to end) from the request record: exactly under light load, and the timeline
    never counts more than the records allow under heavy load (budget or preemption can leave
    a running request out of a step)."""
    rng = np.random.default_rng(3)
    light = pa.table({"n_input_tokens": rng.integers(100, 500, 60),
                      "n_output_tokens": rng.integers(20, 200, 60),
                      "arrival_s": np.cumsum(rng.exponential(0.5, 60))})
    timing = RooflineTiming(llama8b, a10)
    for table, exact in ((light, True), (azure, False)):
        r, steps, s = run(table, timing, EngineConfig(replicas=2, router="round-robin"))
        window = s["timeline_s"]
        in_steps = float((steps["n_seqs"] * steps["duration_s"]).sum()) / window
        residence = float((r["end_s"] - r["scheduled_s"]).sum()) / window
        if exact:
            assert in_steps == pytest.approx(residence, rel=1e-9)
        else:
            assert in_steps <= residence * (1 + 1e-9) and in_steps > 0.5 * residence


def test_backlog_is_flagged_when_arrivals_outpace_service(azure, llama8b, a10):
    timing = RooflineTiming(llama8b, a10)
    rng = np.random.default_rng(5)
    light = pa.table({"n_input_tokens": rng.integers(100, 500, 80),
                      "n_output_tokens": rng.integers(20, 100, 80),
                      "arrival_s": np.cumsum(rng.exponential(1.0, 80))})
    assert not run(light, timing, EngineConfig())[2]["backlog"]
    heavy = light.set_column(2, "arrival_s", pa.array(np.linspace(0, 1, 80)))
    s = run(heavy.set_column(1, "n_output_tokens", pa.array(np.full(80, 2000))), timing,
            EngineConfig(max_num_seqs=4))[2]
    assert s["backlog"] and s["queue_last_tenth_s"] > 10 * s["queue_first_tenth_s"]
    assert not run(heavy, timing, ONE)[2]["backlog"]            # back to back: no arrivals


def test_tpot_definition_and_billing_on_provisioned_time(tmp_path, azure):
    """TPOT = (E2E − TTFT) / (n_out − 1), and `kavier efficiency` bills replicas × the whole
    timeline (provisioned GPU time), not the busy time."""
    import pyarrow.parquet as pq

    from kavier.analysis.efficiency import read_run, report

    pq.write_table(azure, tmp_path / "t.parquet")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(tmp_path / "t.parquet"),
                                       "--gpu", "A100-80GB", "--replicas", "3",
                                       "--output-folder", str(out), "--no-fragments",
                                       "--no-opendc"])
    assert result.exit_code == 0, result.output
    r = pd.read_parquet(out / "requests.parquet")
    many = r["n_output_tokens"] > 1
    np.testing.assert_allclose(r.loc[many, "tpot_s"], (r.loc[many, "e2e_s"] - r.loc[many, "ttft_s"])
                               / (r.loc[many, "n_output_tokens"] - 1), rtol=1e-9)
    assert r.loc[~many, "tpot_s"].isna().all()
    s = json.loads((out / "summary.json").read_text())
    cost = report(read_run(out), price_per_gpu_hour=2.0)["cost"]
    assert cost == pytest.approx(2.0 * 3 * s["timeline_s"] / 3600)
    assert cost > 2.0 * s["gpu_hours"]              # idle replicas are paid for too


def test_offered_load_one_at_a_time_is_the_service_time_per_second_of_arrivals(azure, llama8b,
                                                                                  a10):
    timing = RooflineTiming(llama8b, a10)
    config = EngineConfig(max_num_seqs=1, chunked_prefill=False)
    r, _, s = run(azure, timing, config)
    span = r["arrival_s"].max() - r["arrival_s"].min()
    # one at a time, the GPU is busy exactly for the requests' service times
    assert s["service_demand_s"] == pytest.approx(s["gpu_hours"] * 3600.0, rel=1e-9)
    assert s["offered_load"] == pytest.approx(s["service_demand_s"] / span, rel=1e-12)
    assert not s["offered_load_batched"]
    _, _, two = run(azure, timing, EngineConfig(max_num_seqs=1, chunked_prefill=False,
                                                replicas=2))
    assert two["offered_load"] == pytest.approx(s["offered_load"] / 2, rel=1e-12)
    _, _, closed = run(azure, timing, ONE)
    assert closed["offered_load"] is None           # back to back: no arrival process


def test_offered_load_under_batching_bounds_the_busy_time_and_predicts_the_backlog(llama8b,
                                                                                     a10):
    table = archive.read_trace("azure-llm-inference-2023-conv").table.slice(0, 3000)
    timing = RooflineTiming(llama8b, a10)
    _, _, one = run(table, timing, EngineConfig())
    assert one["offered_load_batched"] and 1 <= one["offered_load_decode_batch"] <= 256
    # a lower bound on the GPU time the work needs: a saturated replica is busy longer
    assert one["offered_load"] > 1 and one["backlog"]
    assert one["service_demand_s"] <= one["gpu_hours"] * 3600.0
    replicas = int(np.ceil(one["offered_load"] / 0.7))
    _, _, enough = run(table, timing, EngineConfig(replicas=replicas))
    assert enough["offered_load"] == pytest.approx(one["offered_load"] / replicas, rel=1e-12)
    assert enough["offered_load"] < 0.7 and not enough["backlog"]


@pytest.mark.parametrize("engine", [["--max-num-seqs", "1"], ["--kv-cache", "off",
                                                               "--no-chunked-prefill"]])
def test_memory_is_bounded_by_the_trace_not_by_one_answers_length(tmp_path, engine):
    """A 20-million-token answer: the closed-form path's ITLs and the stepped engine's decode
    runs are computed in bounded pieces (unbounded, 1.7 GB of arrays for this one request)."""
    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n5,20000000\n")
    # the peak RSS of this process image (VmHWM; ru_maxrss would carry pytest's own peak
    # over from before the exec)
    code = ("import sys\nfrom kavier.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e\n"
            "print(next(int(x.split()[1]) for x in open('/proc/self/status')"
            " if x.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code, "simulate", "--trace", str(trace),
                          "--output-folder", str(tmp_path / "o"), "--num-gpu-blocks",
                          "2000000", "--no-fragments", "--no-opendc", *engine],
                         capture_output=True, text=True, timeout=300, check=True)
    assert "ITL p50" in out.stdout
    peak_mib = int(out.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 400, peak_mib         # 144 and 212 MiB measured; unbounded 1.7 GB


def test_async_scheduling_admits_an_arrival_one_step_later(llama8b, a10):
    timing = RooflineTiming(llama8b, a10, TimingParams(request_overhead_s=0.0))
    first = float(timing.step_costs(np.array([2000]), np.zeros(1), 0).duration_s)
    table = pa.table({"n_input_tokens": [2000, 300], "n_output_tokens": [50, 20],
                      "arrival_s": [0.0, first / 2]})      # B arrives during A's prefill
    sync, sync_steps, _ = run(table, timing, EngineConfig())
    ahead, ahead_steps, _ = run(table, timing, EngineConfig(async_scheduling=True))
    # A reached an idle engine: scheduled at once either way
    assert ahead.ttft_s[0] == pytest.approx(sync.ttft_s[0], rel=1e-12)
    # B missed the scheduling of the step after A's prefill: it joins one step later, after
    # one decode step of A alone
    lone_decode = float(timing.decode_run(np.array([2000.0]), 1).duration_s[0])
    assert ahead.scheduled_s[1] == pytest.approx(sync.scheduled_s[1] + lone_decode, rel=1e-9)
    # (its prefill step then batches A one token further on: microseconds more)
    assert ahead.ttft_s[1] == pytest.approx(sync.ttft_s[1] + lone_decode, rel=1e-6)
    assert ahead.ttft_s[1] > sync.ttft_s[1] + lone_decode
    assert sync.scheduled_s[1] == pytest.approx(first, rel=1e-12)
    # running requests lose nothing: every step is back to back
    for steps in (sync_steps, ahead_steps):
        ends = (steps.start_s + steps.duration_s).to_numpy()
        np.testing.assert_allclose(steps.start_s.to_numpy()[1:], ends[:-1], rtol=1e-12)
    with pytest.raises(Exception, match="async scheduling with pipeline parallelism"):
        EngineConfig(async_scheduling=True, pipeline_parallel_size=2)
