import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.errors import InputError
from kavier.models.library import llm_library
from kavier.models.timing import (
    RooflineTiming,
    ThesisTiming,
    TimingParams,
    default_params,
    make_timing,
    sum_max_linear,
)


def brute_decode(model, n_in, n_out):
    """Step-by-step sum of the roofline decode steps (the closed form must equal this)."""
    llm, p = model.llm, model.params
    flops = model.gpu.flops_per_s * p.compute_efficiency
    attn = model.gpu.flops_per_s * (p.attention_efficiency or p.compute_efficiency)
    by = model.gpu.bytes_per_s * p.memory_efficiency
    total = 0.0
    for k in range(1, n_out):
        c = n_in + k
        if model.kv_cache:
            compute = ((2 * llm.matmul_params + llm.lm_head_flops) / flops
                       + 4 * llm.n_layers * llm.attention_dim * c / attn)
            total += max(compute, (llm.streamed_weight_bytes + llm.kv_bytes_per_token * c) / by)
        else:
            memory = (llm.streamed_weight_bytes + llm.kv_bytes_per_token * c) / by
            total += max(float(model.forward_compute_s(c, 0)), memory)
        total += p.token_overhead_s
    return total


@pytest.mark.parametrize("kv", [True, False])
@pytest.mark.parametrize("n_in,n_out", [(10, 1), (10, 2), (1, 300), (500, 700), (16000, 200)])
def test_roofline_closed_forms_equal_the_step_sum(llama8b, a10, kv, n_in, n_out):
    params = TimingParams(attention_efficiency=0.7, token_overhead_s=1e-3)
    model = RooflineTiming(llama8b, a10, params, kv)
    assert float(model.decode_s(n_in, n_out)) == pytest.approx(brute_decode(model, n_in, n_out),
                                                               rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.floats(-5, 5), st.floats(-1, 1), st.floats(-5, 5), st.floats(-1, 1),
       st.integers(0, 60))
def test_sum_max_linear(g0, g1, h0, h1, m):
    expected = sum(max(g0 + g1 * k, h0 + h1 * k) for k in range(1, m + 1))
    assert float(sum_max_linear(g0, g1, h0, h1, m)) == pytest.approx(expected, abs=1e-9)


def test_thesis_equations_by_hand(llama8b, a10):
    model = ThesisTiming(llama8b, a10)
    tp = 1024 * llama8b.params * 2 / (125e12 * 0.30) + 0.025  # eq. 4.2
    tt = max(2 * llama8b.params / (125e12 * 0.3), 2 * llama8b.params / (600e9 * 0.6))
    assert float(model.prefill_s(1024)) == pytest.approx(tp)
    assert model.time_per_token_s() == pytest.approx(tt)
    assert float(model.decode_s(0, 100)) == pytest.approx(100 * tt)  # eq. 4.3
    off = ThesisTiming(llama8b, a10, kv_cache=False)
    assert float(off.decode_s(0, 100)) == pytest.approx(100 * 101 / 2 * tt)  # eq. 4.4


@pytest.mark.parametrize("cls", [ThesisTiming, RooflineTiming])
def test_kv_off_never_faster_and_times_grow_with_tokens(llama8b, a10, cls):
    n = np.array([1, 16, 256, 4096])
    on, off = cls(llama8b, a10, kv_cache=True), cls(llama8b, a10, kv_cache=False)
    assert np.all(off.decode_s(100, n) >= on.decode_s(100, n))
    assert np.all(np.diff(on.prefill_s(n)) > 0) and np.all(np.diff(on.decode_s(100, n)) >= 0)


def test_roofline_prefill_is_floor_bound_for_short_prompts(llama8b, a10):
    model = RooflineTiming(llama8b, a10)
    floor = ((llama8b.streamed_weight_bytes + 8 * llama8b.kv_bytes_per_token)
             / (a10.bytes_per_s * 0.6))
    assert float(model.prefill_s(8)) == pytest.approx(floor + 0.025)
    soft = RooflineTiming(llama8b, a10, TimingParams(prefill_sharpness=2.0))
    assert float(soft.prefill_s(8)) > float(model.prefill_s(8))


def test_library_default_combines_a_mixed_steps_compute_and_memory_as_a_2_norm(llama8b, a10):
    """Without a profile a step with a prefill chunk costs ``(compute² + memory²)^½`` (the
    A10 sweep fits p = 1.96, the MoE serving run 2.02); a pure decode step keeps the hard
    maximum, and an explicit ``None`` restores it for mixed steps too."""
    params = default_params("roofline", a10)
    assert params.prefill_sharpness == 2.0
    model = RooflineTiming(llama8b, a10, params)
    n, c = np.array([512.0, 1.0, 1.0]), np.array([0.0, 300.0, 900.0])
    mixed = model.step_costs(n, c, n_decoding=2)
    assert mixed.duration_s == pytest.approx(np.hypot(mixed.compute_s, mixed.memory_s))
    decode = model.step_costs(n[1:], c[1:], n_decoding=2)
    assert decode.duration_s == pytest.approx(max(decode.compute_s, decode.memory_s))
    hard = RooflineTiming(llama8b, a10, params.with_(prefill_sharpness=None))
    hard_mixed = hard.step_costs(n, c, n_decoding=2)
    assert hard_mixed.duration_s == pytest.approx(max(mixed.compute_s, mixed.memory_s))
    assert hard_mixed.duration_s < mixed.duration_s


def test_compute_half_tokens_slows_short_passes_as_a_saturating_efficiency(llama8b, a10):
    base = RooflineTiming(llama8b, a10, TimingParams(compute_efficiency=0.7))
    half = RooflineTiming(llama8b, a10, TimingParams(compute_efficiency=0.7,
                                                     compute_half_tokens=256.0))
    n = np.array([64.0, 256.0, 4096.0])
    matmul = 2.0 * llama8b.matmul_params * n
    rate = a10.flops_per_s * 0.7
    extra = half.pass_costs(n).compute_s - base.pass_costs(n).compute_s
    # the weight matmuls run at C_e · n / (n + n½): n½ = n halves their rate
    np.testing.assert_allclose(extra, matmul / rate * 256.0 / n, rtol=1e-12)
    assert extra[1] == pytest.approx(matmul[1] / rate)              # at n = n½: twice as long
    assert (half.pass_costs(n).flops == base.pass_costs(n).flops).all()   # FLOPs are FLOPs
    steps = half.decode_run(np.array([100.0, 200.0]), 3)
    assert steps.compute_s == pytest.approx(base.decode_run(np.array([100.0, 200.0]), 3)
                                            .compute_s + 2 * llama8b.matmul_params * 256 / rate)
    np.testing.assert_allclose(half.decode_s([500.0], [40.0]),
                               half.decode_costs([500.0], [40.0]).duration_s, rtol=1e-12)
    itl, _ = half.inter_token_latencies([500], [40])
    assert itl.sum() == pytest.approx(float(half.decode_s([500.0], [40.0])[0]), rel=1e-9)
    with pytest.raises(InputError, match="compute_half_tokens needs --timing-model roofline"):
        make_timing("thesis", llama8b, a10, TimingParams(compute_half_tokens=10.0))


def test_a_pass_streams_every_weight_but_an_untied_input_embedding(llama8b, a10):
    granite = llm_library().get("Granite-20B")                # tied: the LM head reads it all
    assert granite.streamed_weight_bytes == granite.weight_bytes
    table = llama8b.vocab_size * llama8b.hidden_dim * 2       # untied: its lookup gathers rows
    assert llama8b.streamed_weight_bytes == pytest.approx(llama8b.weight_bytes - table)
    decode = RooflineTiming(llama8b, a10).step_costs(np.array([1.0]), np.array([99.0]), 1)
    assert decode.bytes == pytest.approx(llama8b.weight_bytes - table
                                         + 100 * llama8b.kv_bytes_per_token)
    thesis = ThesisTiming(llama8b, a10)                       # eq. 4.6 as written: all of them
    assert thesis.time_per_token_s() == pytest.approx(llama8b.weight_bytes / (600e9 * 0.6))
