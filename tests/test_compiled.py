"""The compiled stepped loop (kavier.sim.compiled) against the Python engine it compiles."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

import archive
from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import RooflineTiming, TimingParams
from kavier.sim import compiled
from kavier.sim.config import EngineConfig, resolve
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import simulate
from kavier.sim.stats import QuantileSketch
from kavier.sim.sustainability import Sustainability


@pytest.fixture(scope="module")
def azure():
    table = archive.read_trace("azure-llm-inference-2023-conv").table.slice(0, 1500)
    sessions = pa.array([f"user-{i % 37}" for i in range(table.num_rows)])
    return table.append_column("session_id", sessions)


@pytest.fixture(scope="module")
def mooncake():
    return archive.read_trace("mooncake-fast25-conversation")


def run(table, timing, config, path, block=16, prefix=None):
    reqs, steps = [], []
    sus = Sustainability(PowerModel.linear_for(timing.gpu),
                         gpus_per_replica=config.tensor_parallel_size)
    s = simulate(table, timing, config, block, prefix, sus, reqs.append,
                 lambda b, p: steps.append(b), path=path)
    return (pa.concat_tables(reqs).to_pandas(),
            pa.Table.from_batches(steps).to_pandas() if steps else None, s)


A100 = ("Llama-3-8B", "A100-80GB", 1)
CASES = {
    "8 replicas, defaults": (A100, TimingParams(), EngineConfig(replicas=8)),
    "preemptions": (A100, TimingParams(), EngineConfig(num_gpu_blocks=600)),
    "synchronous, no chunking": (A100, TimingParams(), EngineConfig(
        replicas=2, async_scheduling=False, chunked_prefill=False, num_gpu_blocks=500)),
    "timeouts, round-robin": (A100, TimingParams(), EngineConfig(
        replicas=3, router="round-robin", request_timeout_s=4.0, num_gpu_blocks=600)),
    "prefix-affinity sessions, small budget": (A100, TimingParams(
        prefill_sharpness=1.7, compute_half_tokens=200.0, request_overhead_s=0.02,
        batch_step_overhead_s=0.002, batch_seq_overhead_s=1e-4, token_overhead_s=1e-5),
        EngineConfig(replicas=4, router="prefix-affinity", max_num_batched_tokens=512,
                     max_num_seqs=16)),
    "front end past the timeout": (A100, TimingParams(request_overhead_s=0.5), EngineConfig(
        replicas=2, request_timeout_s=0.4)),
    "TP=2": (("Qwen3-32B", "RTX-PRO-6000", 2), TimingParams(), EngineConfig(
        tensor_parallel_size=2, max_num_seqs=64)),
    "mixture of experts": (("Qwen3-30B-A3B", "RTX-PRO-6000", 1), TimingParams(),
                           EngineConfig(replicas=2, num_gpu_blocks=2000)),
    "data-parallel ranks with expert parallelism, in lockstep": (
        ("Qwen3-30B-A3B", "RTX-PRO-6000", 1), TimingParams(batch_step_overhead_s=0.001,
                                                           compute_half_tokens=100.0),
        EngineConfig(replicas=2, enable_expert_parallel=True, num_gpu_blocks=1500,
                     max_num_seqs=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_and_python_engines_give_identical_runs(azure, case):
    (llm, gpu, tp), params, config = CASES[case]
    timing = RooflineTiming(llm_library().get(llm), gpu_library().get(gpu), params,
                            tensor_parallel_size=tp,
                            expert_parallel_size=config.expert_parallel_size)
    python = run(azure, timing, config, "stepped")
    fast = run(azure, timing, config, "auto")
    assert python[2]["engine_path"] == "stepped" and fast[2]["engine_path"] == "compiled"
    assert python[0].equals(fast[0])
    assert (python[1] is fast[1] is None) or python[1].equals(fast[1])
    assert {k: v for k, v in python[2].items() if k != "engine_path"} == {
        k: v for k, v in fast[2].items() if k != "engine_path"}
    if case in ("preemptions", "data-parallel ranks with expert parallelism, in lockstep"):
        assert python[2]["preemptions"] > 100
    if "lockstep" in case:                       # idle ranks ran dummy batches
        assert (python[1]["n_seqs"] == 0).any()
    if case.startswith("timeouts"):
        assert 0 < (python[0]["status"] == "timeout").sum() < len(python[0])
    if case.startswith("front end"):                  # every request gives up in the front end
        assert (python[0]["status"] == "timeout").all() and fast[1] is None
        assert fast[2]["queue_first_tenth_s"] is None


@pytest.mark.parametrize("replicas,block,blocks,router", [
    (1, 16, None, "least-outstanding"),
    (2, 16, 9000, "round-robin"),
    (3, 512, 300, "prefix-affinity")])
def test_compiled_prefix_cache_gives_identical_runs(mooncake, replicas, block, blocks, router):
    """The ``blocks`` prefix cache in one pool: hits, LRU evictions, preemptions that find
    their blocks again, first-block affinity."""
    timing = RooflineTiming(llm_library().get("Llama-3-8B"), gpu_library().get("A100-80GB"))
    config = EngineConfig(replicas=replicas, num_gpu_blocks=blocks, router=router)
    out = [run(mooncake.table.slice(0, 1200), timing, config, path, block,
               PrefixCache(PrefixCacheConfig("blocks"), mooncake.content))
           for path in ("stepped", "auto")]
    assert [o[2]["engine_path"] for o in out] == ["stepped", "compiled"]
    assert out[0][0].equals(out[1][0]) and out[0][1].equals(out[1][1])
    assert {k: v for k, v in out[0][2].items() if k != "engine_path"} == {
        k: v for k, v in out[1][2].items() if k != "engine_path"}
    cache = out[1][2]["prefix_cache"]
    assert cache["hits_tokens"] > 0 and out[1][0]["n_cached_tokens"].sum() > 0
    if blocks is not None:
        assert cache["evictions"] > 0 and out[1][2]["preemptions"] > 0


def test_compiled_path_is_refused_where_it_does_not_apply(azure):
    timing = RooflineTiming(llm_library().get("Llama-3-8B"), gpu_library().get("A100-80GB"))
    assert compiled.applies(timing, resolve(EngineConfig(), True), None)
    exact = PrefixCache(PrefixCacheConfig("prefill", min_tokens=512),
                        archive.read_trace("mooncake-fast25-conversation").content)
    assert compiled.applies(timing, EngineConfig(replicas=2, enable_expert_parallel=True),
                            None)
    for config, prefix in ((EngineConfig(back_to_back=True, max_num_seqs=4), None),
                           (EngineConfig(pipeline_parallel_size=2), None),
                           (EngineConfig(), exact)):
        assert not compiled.applies(timing, config, prefix)
    with pytest.raises(ValueError, match="compiled engine does not run"):
        run(azure, timing, EngineConfig(back_to_back=True, max_num_seqs=4), "compiled")
    off = RooflineTiming(timing.llm, timing.gpu, kv_cache=False)
    assert not compiled.applies(off, resolve(EngineConfig(), False), None)
    out = run(azure.slice(0, 50), off, EngineConfig(), "auto")
    assert out[2]["engine_path"] == "stepped"


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(3)
    for n in [0, 1, 7, 8, 9, 127, 128, 129, 300, 1000, 4097, 100_003]:
        a = rng.random(n + 5) * 10.0 ** rng.uniform(-6, 6, n + 5)
        assert compiled._pairwise(a, 5, n) == float(a[5:].sum())
        assert compiled._pairwise(a, 0, n) == float(a[:n].sum())


@pytest.mark.parametrize("kv", [True, False])
def test_decode_run_work_sums_the_run(kv):
    timing = RooflineTiming(llm_library().get("Qwen3-30B-A3B"),
                            gpu_library().get("RTX-PRO-6000"), TimingParams(
                                compute_half_tokens=50.0), kv_cache=kv)
    context = np.array([100, 2_000, 37, 900])
    run = timing.decode_run(context, 300)
    work = timing.decode_run_work(context, 120)
    np.testing.assert_allclose(work, [float(a[:120].sum()) for a in run[1:]], rtol=1e-12)


def test_binned_counts_merge_into_the_sketch():
    rng = np.random.default_rng(4)
    values = rng.lognormal(-4, 1, 5000)
    direct, merged = QuantileSketch(), QuantileSketch()
    direct.add(values)
    lo, hi, log_gamma, n_bins = merged.bins
    index = np.ceil(np.log(np.clip(values, lo, hi) / lo) / log_gamma).astype(int)
    merged.add_counts(np.bincount(index, minlength=n_bins), 0, values.min(), values.max())
    for q in (50, 90, 99):
        assert merged.quantile(q) == direct.quantile(q)
    with pytest.raises(ValueError, match="bins"):
        merged.add_counts(np.zeros(3, np.int64), 0, 0.0, 1.0)


def test_moe_with_one_expert_runs_compiled_like_the_dense_model(azure):
    dense = llm_library().get("Llama-3-8B")
    one = dataclasses.replace(dense, name="one-expert", n_experts=1, n_experts_per_token=1)
    gpu = gpu_library().get("A100-80GB")
    out = [run(azure.slice(0, 300), RooflineTiming(m, gpu), EngineConfig(replicas=2), "auto")
           for m in (dense, one)]
    assert out[0][2]["engine_path"] == out[1][2]["engine_path"] == "compiled"
    np.testing.assert_allclose(out[0][0]["e2e_s"], out[1][0]["e2e_s"], rtol=1e-12)


@pytest.mark.parametrize("lockstep", [False, True])
def test_compiled_loop_resumes_when_its_timeline_buffer_fills(azure, monkeypatch, lockstep):
    """The loop returns every INTERVALS rows and carries on: with a buffer of 7 rows the run
    hands its timeline out in many batches and still equals the Python engine's."""
    llm = llm_library().get("Qwen3-30B-A3B" if lockstep else "Llama-3-8B")
    config = EngineConfig(replicas=2, enable_expert_parallel=lockstep, num_gpu_blocks=3000)
    timing = RooflineTiming(llm, gpu_library().get("RTX-PRO-6000"),
                            expert_parallel_size=config.expert_parallel_size)
    table = azure.slice(0, 200)
    python = run(table, timing, config, "stepped")
    monkeypatch.setattr(compiled, "INTERVALS", 7)
    batches = []
    sus = Sustainability(PowerModel.linear_for(timing.gpu))
    reqs = []
    simulate(table, timing, config, 16, None, sus, reqs.append,
             lambda b, p: batches.append(b))
    assert len(batches) > 50 and max(b.num_rows for b in batches) <= 7
    assert pa.concat_tables(reqs).to_pandas().equals(python[0])
    assert pa.Table.from_batches(batches).to_pandas().equals(python[1])
