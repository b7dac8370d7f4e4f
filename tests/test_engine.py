import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kavier.engine import simulate, start_times
from kavier.timing import ThesisTiming


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1, max_size=40))
def test_start_times_equal_the_fifo_recursion(pairs):
    arrivals = np.sort(np.array([a for a, _ in pairs]))
    service = np.array([s for _, s in pairs])
    free, expected = 0.0, []
    for a, s in zip(arrivals, service, strict=True):
        start = max(a, free)
        expected.append(start)
        free = start + s
    assert np.allclose(start_times(arrivals, service), expected)


def test_back_to_back_and_with_arrivals(llama8b, a10):
    timing = ThesisTiming(llama8b, a10)
    w = pd.DataFrame({"arrival_s": [0.0, 0.0, 100.0], "n_input_tokens": [100, 200, 300],
                      "n_output_tokens": [10, 20, 30]})
    timed = simulate(w, timing)
    service = timed["prefill_s"] + timed["decode_s"]
    assert timed["queue_s"].iloc[0] == 0 and np.isclose(timed["queue_s"].iloc[1], service[0])
    assert timed["queue_s"].iloc[2] == 0 and timed["start_s"].iloc[2] == 100.0
    assert np.allclose(timed["ttft_s"], timed["queue_s"] + timed["prefill_s"])
    batch = simulate(w, timing, honor_arrivals=False)
    assert (batch["queue_s"] == 0).all()
    assert np.allclose(batch["start_s"].iloc[1:], np.cumsum(service)[:-1])


def chat_workload(lengths, repeats):
    """Prompts that reuse earlier prompts' prefixes: request i repeats prompt repeats[i]."""
    from archive.traces import PromptContent, Workload

    base = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(lengths)]
    prompts = [base[j % len(base)] + [7] * (i % 3) for i, j in enumerate(repeats)]
    sizes = [len(p) for p in prompts]
    content = PromptContent("tokens", np.concatenate(([0], np.cumsum(sizes))).astype(np.int64),
                            np.concatenate([np.asarray(p, np.int64) for p in prompts]))
    requests = pd.DataFrame({"n_input_tokens": sizes, "n_output_tokens": 20,
                             "session_id": np.arange(len(sizes)) % 2})
    return Workload.from_frame(requests, content, "test")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(16, 300), min_size=1, max_size=6),
       st.lists(st.integers(0, 5), min_size=1, max_size=30),
       st.sampled_from(["prefill", "full", "blocks"]), st.sampled_from(["thesis", "roofline"]))
def test_a_cache_hit_never_increases_latency(lengths, repeats, policy, model):
    from kavier.cache import PrefixCache, PrefixCacheConfig
    from kavier.library import gpu_library, llm_library
    from kavier.timing import make_timing

    w = chat_workload(lengths, repeats)
    timing = make_timing(model, llm_library().get("Llama-3-8B"), gpu_library().get("A10"))
    plain = simulate(w, timing, honor_arrivals=False)
    cache = PrefixCache(PrefixCacheConfig(policy, min_tokens=16, block_size=16), w.content)
    cached = simulate(w, timing, honor_arrivals=False, cache=cache)
    assert (cached["prefill_s"] <= plain["prefill_s"] + 1e-12).all()
    assert (cached["e2e_s"] <= plain["e2e_s"] + 1e-9).all()
    assert np.allclose(cached["prefill_saved_s"], plain["prefill_s"] - cached["prefill_s"])
    assert cached["cache_hit"].sum() == cache.hits
    if len(set(repeats)) < len(repeats):
        assert cache.hits > 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8000), st.integers(1, 3000)), min_size=1,
                max_size=20), st.sampled_from(["thesis", "roofline"]))
def test_kv_off_decode_is_never_faster(sizes, model):
    from kavier.library import gpu_library, llm_library
    from kavier.timing import make_timing

    llm, gpu = llm_library().get("Llama-3-8B"), gpu_library().get("A100-80GB")
    n_in = np.array([a for a, _ in sizes])
    n_out = np.array([b for _, b in sizes])
    on = make_timing(model, llm, gpu, kv_cache=True).decode_s(n_in, n_out)
    off = make_timing(model, llm, gpu, kv_cache=False).decode_s(n_in, n_out)
    assert (off >= on - 1e-12).all()


def test_chunks_give_the_same_timeline_as_one_pass(llama8b, a10):
    from kavier.engine import Simulator, run

    rng = np.random.default_rng(1)
    w = pd.DataFrame({"arrival_s": np.sort(rng.uniform(0, 300, 500)),
                      "n_input_tokens": rng.integers(1, 4000, 500),
                      "n_output_tokens": rng.integers(1, 500, 500)})
    timing = ThesisTiming(llama8b, a10)
    whole = simulate(w, timing)
    sim = Simulator(timing)
    parts = pa.concat_tables(list(run(w, sim, chunk_size=37))).to_pandas()
    assert np.allclose(parts["start_s"], whole["start_s"])
    s = sim.summary()
    assert s["n_requests"] == 500
    assert np.isclose(s["gpu_hours"], (whole["prefill_s"] + whole["decode_s"]).sum() / 3600)
    for q in (50, 90, 99):
        exact = np.percentile(whole["ttft_s"], q, method="inverted_cdf")
        assert s[f"p{q}_ttft_s"] == pytest.approx(exact, rel=2e-4)


def test_service_order_and_back_to_back_ids(llama8b, a10):
    w = pd.DataFrame({"arrival_s": [5.0, 1.0, 3.0], "n_input_tokens": [10, 20, 30],
                      "n_output_tokens": [2, 2, 2]})
    out = simulate(w, ThesisTiming(llama8b, a10))
    assert out["id"].tolist() == [1, 2, 0]       # served by arrival; id is the trace row
    assert (np.diff(out["start_s"]) > 0).all()


def test_kv_not_fitting_is_flagged(llama8b, a10):
    w = pd.DataFrame({"n_input_tokens": [1000, 200_000], "n_output_tokens": [10, 10]})
    out = simulate(w, ThesisTiming(llama8b, a10))
    assert out["kv_fits"].tolist() == [True, False]
    assert out["kv_cache_peak_bytes"].tolist() == [1010 * 131072, 200_010 * 131072]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e5)), min_size=1, max_size=300),
       st.floats(0, 100))
def test_quantile_sketch_matches_nearest_rank(values, q):
    from kavier.stats import QuantileSketch

    sketch = QuantileSketch()
    half = len(values) // 2
    sketch.add(np.array(values[:half]))
    sketch.add(np.array(values[half:] + [np.nan]))
    exact = np.percentile(values, q, method="inverted_cdf")
    assert sketch.count == len(values)
    assert sketch.quantile(q) == pytest.approx(exact, rel=2e-4, abs=1e-12)
