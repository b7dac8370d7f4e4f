"""Tensor parallelism and mixture of experts in the timing model, the pool and the engine."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from kavier.models.library import gpu_library, llm_from_hf_config, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import ExpertGroup, TimingParams, make_timing
from kavier.sim.config import EngineConfig, kv_pool_blocks
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability

PARAMS = TimingParams(compute_efficiency=0.6, memory_efficiency=0.8, kv_memory_efficiency=0.7,
                      request_overhead_s=0.0)


def _timing(llm, gpu, tp=1):
    return make_timing("roofline", llm_library().get(llm), gpu_library().get(gpu), PARAMS,
                       tensor_parallel_size=tp)


def test_tp2_shortens_compute_and_memory_bound_passes_and_reports_the_allreduce():
    one, two = _timing("Llama-3.1-8B", "H100-SXM"), _timing("Llama-3.1-8B", "H100-SXM", 2)
    for n in (4096.0, 1.0):                 # compute-bound prefill, weight-bound decode step
        a, b = one.pass_costs(n).duration_s, two.pass_costs(n).duration_s
        assert b < a
        assert b == pytest.approx(a / 2 + two.comm_s(n), rel=0.05)
    # the all-reduce: 2 per layer of n × hidden × 2 bytes over NVLink 4 at 450 GB/s × 0.7
    n = 1000.0
    ring = 2 * 1 / 2 * n * 4096 * 2 / (450e9 * 0.7)
    assert two.comm_s(n) == pytest.approx(2 * 32 * (6e-6 + ring))    # NVLink: 6 µs
    assert one.comm_s(n) == 0.0
    assert two.kv_bytes_per_token == one.kv_bytes_per_token / 2


def test_kv_heads_are_replicated_past_their_count_and_bad_degrees_are_refused():
    llm = llm_library().get("Llama-3.1-70B")             # 8 KV heads
    eight = _timing("Llama-3.1-70B", "H100-SXM", 8)
    assert eight.kv_bytes_per_token == llm.kv_bytes_per_token / 8
    sixteen = dataclasses.replace(llm, n_heads=128)
    t16 = make_timing("roofline", sixteen, gpu_library().get("H100-SXM"), PARAMS,
                      tensor_parallel_size=16)
    assert t16.kv_bytes_per_token == llm.kv_bytes_per_token / 8     # one head per rank
    with pytest.raises(Exception, match="cannot split"):
        _timing("Llama-3.1-8B", "H100-SXM", 3)
    with pytest.raises(Exception, match="thesis"):
        make_timing("thesis", llm, gpu_library().get("H100-SXM"), tensor_parallel_size=2)


def test_a_70b_model_fits_four_80gb_gpus_with_the_pool_vllm_would_size():
    llm, gpu = llm_library().get("Llama-3.1-70B"), gpu_library().get("A100-80GB")
    with pytest.raises(Exception, match="leave no KV block"):
        kv_pool_blocks(llm, gpu, 16)
    blocks = kv_pool_blocks(llm, gpu, 16, 0.9, 0.0, 4)
    per_token = 2 * 80 * 2 * 128 * 2                      # 2 of 8 KV heads per rank
    expected = int((80 * 2**30 * 0.9 - llm.weight_bytes / 4) // (16 * per_token))
    assert blocks == expected and 31_000 < blocks < 33_000


def test_one_expert_moe_equals_the_dense_model():
    dense = llm_library().get("Llama-3.1-8B")
    moe = dataclasses.replace(dense, name="one-expert", n_experts=1, n_experts_per_token=1)
    gpu = gpu_library().get("A100-80GB")
    params = PARAMS.with_(compute_half_tokens=80.0)
    a, b = (make_timing("roofline", m, gpu, params) for m in (dense, moe))
    for n in (1.0, 300.0, 5000.0):
        assert b.pass_costs(n, 100.0).duration_s == pytest.approx(a.pass_costs(n, 100.0)
                                                                  .duration_s, rel=1e-12)
    assert b.decode_s(700, 90) == pytest.approx(a.decode_s(700, 90), rel=1e-12)
    ctx = np.array([100.0, 2000.0, 50.0])
    assert np.allclose(b.decode_run(ctx, 5).duration_s, a.decode_run(ctx, 5).duration_s,
                       rtol=1e-12)


def test_moe_active_flops_and_distinct_expert_traffic_by_hand():
    llm = llm_library().get("Qwen3-30B-A3B")
    expert = 3 * 2048 * 768
    shared = llm.params - 48 * 128 * expert
    assert llm.active_params == llm.params - 48 * 120 * expert
    assert abs(llm.active_params / 1e9 - 3.35) < 0.01                   # model card: 3.3 B
    timing = make_timing("roofline", llm, gpu_library().get("H100-SXM"), PARAMS)
    one = timing.pass_costs(1.0)
    embeddings = 2 * 151936 * 2048
    attention = 4 * 48 * 32 * 128 * 1                                   # one (q, k) pair
    assert one.flops == pytest.approx(2 * (llm.active_params - embeddings)
                                      + 2 * 151936 * 2048 + attention)
    streamed = shared - 151936 * 2048            # the input embedding is gathered, not read
    assert one.bytes == pytest.approx((streamed + 48 * 8 * expert) * 2 + llm.kv_bytes_per_token)
    t = 64.0
    touched = 128 * (1 - (1 - 8 / 128) ** t)
    assert timing.weight_bytes(t) == pytest.approx((streamed + 48 * touched * expert) * 2)
    assert timing.weight_bytes(1e6) == pytest.approx(llm.weight_bytes - 151936 * 2048 * 2)


@pytest.mark.parametrize("ep", [1, 2])
def test_the_gemm_ramp_is_paid_once_per_expert_touched(ep):
    llm = llm_library().get("Qwen3-30B-A3B")
    expert, half = 3 * 2048 * 768, 100.0
    dense_mm = llm.matmul_params - 48 * 8 * expert       # attention projections and router
    gpu = gpu_library().get("RTX-PRO-6000")
    timing = make_timing("roofline", llm, gpu, PARAMS.with_(compute_half_tokens=half),
                         expert_parallel_size=ep)
    rate = gpu.flops_per_s * PARAMS.compute_efficiency
    for t in (1.0, 64.0, 512.0):
        touched = 128 * (1 - (1 - 8 / 128) ** (ep * t)) / ep     # this GPU's experts
        assert timing.pass_compute_s(t) == pytest.approx(
            2 * half * (dense_mm + 48 * touched * expert) / rate, rel=1e-12)
    if ep == 1:       # one token runs the k experts' GEMMs: the dense constant, active weights
        assert timing.pass_compute_s(1.0) == pytest.approx(
            2 * half * llm.matmul_params / rate, rel=1e-12)
    # a 512-token chunk's compute pays the ramp on every expert it touches, not on k of them
    chunk = timing.pass_costs(512.0)
    assert chunk.compute_s == pytest.approx(
        make_timing("roofline", llm, gpu, PARAMS, expert_parallel_size=ep)
        .pass_costs(512.0).compute_s + timing.pass_compute_s(512.0), rel=1e-12)
    assert timing.pass_compute_s(512.0) > 5 * timing.pass_compute_s(1.0)


def test_hf_config_moe_and_refusals():
    mixtral = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "vocab_size": 32000, "intermediate_size": 14336,
               "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
               "tie_word_embeddings": False, "sliding_window": None}
    spec = llm_from_hf_config(mixtral)
    assert spec.n_experts == 8 and spec.params / 1e9 == pytest.approx(46.7, abs=0.05)
    assert spec.active_params / 1e9 == pytest.approx(12.9, abs=0.05)
    for field, value in (("quantization_config", {"bits": 4}), ("kv_lora_rank", 512),
                         ("sliding_window", 4096), ("attention_chunk_size", 8192),
                         ("decoder_sparse_step", 0), ("mlp_only_layers", [32]),
                         ("first_k_dense_replace", 32), ("n_shared_experts", "2")):
        with pytest.raises(Exception, match=f"field '{field}'"):
            llm_from_hf_config({**mixtral, field: value})


# Qwen/Qwen1.5-MoE-A2.7B and deepseek-ai/deepseek-moe-16b-base config.json (shapes only)
QWEN15_MOE = {"num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
              "hidden_size": 2048, "vocab_size": 151936, "intermediate_size": 5632,
              "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
              "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1,
              "mlp_only_layers": [], "hidden_act": "silu", "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": 32768}
DEEPSEEK_MOE = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
                "hidden_size": 2048, "vocab_size": 102400, "intermediate_size": 10944,
                "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
                "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                "hidden_act": "silu", "tie_word_embeddings": False}


QWEN3_235B = {"num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
              "head_dim": 128, "hidden_size": 4096, "vocab_size": 151936,
              "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
              "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
              "sliding_window": None}


def test_hf_config_shared_experts_and_dense_layers_by_hand():
    h, attn = 2048, 2048 * (2 * 16 + 2 * 16) * 128
    qwen = llm_from_hf_config(QWEN15_MOE)
    expert = 3 * h * 1408
    qwen_shared = 3 * h * 5632 + h                      # the shared expert and its gate
    assert qwen.n_dense_layers == 0 and qwen.n_expert_layers == 24
    assert qwen.params == 24 * (attn + 60 * expert + 60 * h + qwen_shared) + 2 * 151936 * h
    assert qwen.params / 1e9 == pytest.approx(14.3, abs=0.05)           # model card
    assert qwen.active_params / 1e9 == pytest.approx(2.7, abs=0.05)     # "2.7B activated"
    deepseek = llm_from_hf_config(DEEPSEEK_MOE)
    assert deepseek.n_experts == 64 and deepseek.n_dense_layers == 1
    dense_mlp, shared = 3 * h * 10944, 2 * expert
    assert deepseek.params == (28 * attn + dense_mlp + 27 * (64 * expert + 64 * h + shared)
                               + 2 * 102400 * h)
    assert deepseek.params / 1e9 == pytest.approx(16.4, abs=0.05)      # model card
    assert deepseek.active_params / 1e9 == pytest.approx(2.8, abs=0.05)
    # only the 27 expert layers route, hold experts apart and exchange tokens
    assert deepseek.active_params == deepseek.params - 27 * 58 * expert
    assert deepseek.resident_weight_bytes(expert_parallel_size=4) == pytest.approx(
        (deepseek.params - 27 * 64 * expert * 3 / 4) * 2)
    timing = make_timing("roofline", deepseek, gpu_library().get("A100-80GB"), PARAMS,
                         expert_parallel_size=2)
    shared_bytes = deepseek.params - 102400 * h - 27 * 64 * expert
    assert timing.weight_bytes(1.0) == pytest.approx(
        (shared_bytes + 27 * 64 * (1 - (1 - 6 / 64) ** 2) / 2 * expert) * 2)
    one_layer = make_timing("roofline", dataclasses.replace(deepseek, n_dense_layers=27),
                            gpu_library().get("A100-80GB"), PARAMS, expert_parallel_size=2)
    assert timing.comm_s(64.0) == pytest.approx(27 * one_layer.comm_s(64.0))
    # a Qwen step of 2 makes every other layer dense
    half = llm_from_hf_config({**QWEN15_MOE, "decoder_sparse_step": 2})
    assert half.n_dense_layers == 12
    assert half.params == (24 * attn + 12 * (60 * expert + 60 * h + qwen_shared)
                           + 12 * 3 * h * 5632 + 2 * 151936 * h)
    for config, name in ((QWEN15_MOE, "Qwen1.5-MoE-A2.7B"), (DEEPSEEK_MOE, "DeepSeekMoE-16B"),
                         (QWEN3_235B, "Qwen3-235B-A22B")):
        entry = llm_library().get(name)                 # the library entry is its config read
        assert dataclasses.replace(llm_from_hf_config(config), name=entry.name,
                                   source=entry.source, aliases=entry.aliases) == entry
    big = llm_library().get("Qwen3-235B-A22B")
    assert big.params / 1e9 == pytest.approx(235, abs=0.5)             # model card
    assert big.active_params / 1e9 == pytest.approx(22, abs=0.5)
    with pytest.raises(Exception, match="field 'n_dense_layers'"):
        dataclasses.replace(llm_library().get("Llama-3.1-8B"), n_dense_layers=2)


def _run(tp, path="auto", gpus=None):
    llm, gpu = llm_library().get("Llama-3.1-8B"), gpu_library().get("A100-80GB")
    timing = make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=tp)
    config = EngineConfig(tensor_parallel_size=tp, max_num_seqs=1 if path != "batched" else 64)
    rng = np.random.default_rng(3)
    table = pa.table({"n_input_tokens": rng.integers(50, 3000, 40),
                      "n_output_tokens": rng.integers(1, 300, 40),
                      "arrival_s": np.cumsum(rng.exponential(0.5, 40))})
    sus = Sustainability(PowerModel.linear_for(gpu), gpus_per_replica=gpus or tp)
    tables, steps = [], []
    summary = simulate(table, timing, config, 16, None, sus, tables.append,
                       lambda b, p: steps.append((b, p)), path="stepped" if path == "stepped"
                       else "auto")
    return summary, pa.Table.from_batches([b for b, _ in steps]), steps


def test_tp_runs_count_every_gpu_and_both_paths_agree():
    one, _, _ = _run(1)
    two, steps, batches = _run(2)
    stepped, steps_stepped, _ = _run(2, "stepped")
    assert two["gpus"] == 2 and one["gpus"] == 1
    assert two["makespan_s"] == pytest.approx(stepped["makespan_s"], rel=1e-9)
    assert steps.column("duration_s").to_numpy().sum() == pytest.approx(
        steps_stepped.column("duration_s").to_numpy().sum(), rel=1e-9)
    busy = steps.column("duration_s").to_numpy().sum()
    assert two["gpu_hours"] == pytest.approx(2 * busy / 3600)
    share = steps.column("comm_s").to_numpy().sum() / busy
    assert two["comm_share"] == pytest.approx(share) and 0 < share < 0.5
    assert one["comm_share"] == 0.0
    energy = sum(float(p["energy_j"].sum()) for _, p in batches)     # two GPUs' power
    single = Sustainability(PowerModel.linear_for(gpu_library().get("A100-80GB")))
    per_gpu = sum(float(single.intervals(b.column("start_s").to_numpy(),
                                         b.column("duration_s").to_numpy(),
                                         b.column("compute_s").to_numpy(),
                                         b.column("memory_s").to_numpy())["energy_j"].sum())
                  for b, _ in batches)
    assert energy == pytest.approx(2 * per_gpu, rel=1e-12)
    batched, _, _ = _run(2, "batched")
    assert batched["comm_share"] > 0
    with pytest.raises(ValueError, match="tensor parallel size differs"):
        _run(2, gpus=1)


def test_expert_parallelism_splits_the_experts_and_adds_their_traffic():
    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    alone = make_timing("roofline", llm, gpu, PARAMS)
    split = make_timing("roofline", llm, gpu, PARAMS, expert_parallel_size=2)
    expert = 3 * 2048 * 768
    shared = llm.params - 48 * 128 * expert
    assert llm.resident_weight_bytes(expert_parallel_size=2) == pytest.approx(
        (shared + 48 * 64 * expert) * 2)
    t = 16.0                                  # a GPU's experts touched by both ranks' tokens
    local = 64 * (1 - (1 - 8 / 128) ** (2 * t))
    streamed = shared - 151936 * 2048             # held, but its lookup gathers rows
    assert split.weight_bytes(t) == pytest.approx((streamed + 48 * local * expert) * 2)
    assert split.weight_bytes(t) < alone.weight_bytes(t)
    size = t * 2048 * 2                       # all-gather + reduce-scatter per layer
    expected = 2 * 48 * (4e-5 + size / (64e9 * 0.25))        # PCIe: 40 µs a hop, 0.25
    assert split.comm_s(t) == pytest.approx(expected) and alone.comm_s(t) == 0.0
    dense_blocks = kv_pool_blocks(llm, gpu, 16)
    assert kv_pool_blocks(llm, gpu, 16, expert_parallel_size=2) > dense_blocks
    with pytest.raises(Exception, match="mixture of experts"):
        make_timing("roofline", llm_library().get("Llama-3.1-8B"), gpu, PARAMS,
                    expert_parallel_size=2)
    config = EngineConfig(replicas=2, enable_expert_parallel=True)
    assert config.expert_parallel_size == 2
    assert EngineConfig(replicas=2, tensor_parallel_size=2,
                        enable_expert_parallel=True).expert_parallel_size == 4


def test_every_rank_of_an_expert_parallel_group_runs_the_experts_on_the_group_tokens():
    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    timing = make_timing("roofline", llm, gpu, PARAMS.with_(compute_half_tokens=50.0),
                         expert_parallel_size=2)
    expert, h = 3 * 2048 * 768, 2048
    new, cached = np.array([2048.0]), np.array([0.0])
    # balanced ranks are the default: the group is twice this batch
    balanced = timing.step_costs(new, cached, 0)
    assert timing.step_costs(new, cached, 0, ExpertGroup(4096.0, 2048.0)) == pytest.approx(
        balanced, rel=1e-12)
    # one rank prefills 2,048 tokens while the other decodes 60: the expert layers of both
    # see 2,108 tokens, half of the routed pairs on each GPU
    group = ExpertGroup(2108.0, 2048.0)
    busy = timing.step_costs(new, cached, 0, group)
    routed = 2 * 48 * 8 * expert                   # FLOPs per token through k experts
    assert balanced.flops - busy.flops == pytest.approx(routed * (2048 - 2108 / 2), rel=1e-12)
    light = timing.step_costs(np.ones(60), np.full(60, 500.0), 60, group)
    alone = timing.step_costs(np.ones(60), np.full(60, 500.0), 60)
    assert light.flops - alone.flops == pytest.approx(routed * (2108 / 2 - 60), rel=1e-12)
    touched = 64 * (1 - (1 - 8 / 128) ** 2108)     # this GPU's experts the group touches
    streamed = llm.params - 151936 * h - 48 * 128 * expert
    assert busy.bytes - light.bytes == pytest.approx(           # the same weights on both
        (2048 - 60 * 501) * timing.kv_bytes_per_token, rel=1e-9)
    assert timing.weight_bytes(1.0, 2108.0) == pytest.approx(
        (streamed + 48 * touched * expert) * 2, rel=1e-12)
    # the all-gather waits for the 2,048 tokens the decoding rank receives, on both ranks
    exchange = 2 * 48 * (4e-5 + 2048 * h * 2 / (64e9 * 0.25))
    assert timing.comm_s(60.0, 2048.0) == pytest.approx(exchange, rel=1e-12)
    assert timing.comm_s(2048.0, 2048.0) == pytest.approx(exchange, rel=1e-12)


def test_experts_that_the_gpus_do_not_divide_load_the_busiest_gpu():
    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    expert = 3 * 2048 * 768
    shared = llm.params - 48 * 128 * expert
    # vLLM's determine_expert_map: 128 experts over 3 GPUs are 43, 43 and 42
    assert llm.expert_split(1, 3) == pytest.approx(128 / 43)
    assert llm.resident_weight_bytes(1, 3) == pytest.approx((shared + 48 * 43 * expert) * 2)
    three = make_timing("roofline", llm, gpu, PARAMS, expert_parallel_size=3)
    routed = 2 * 48 * 8 * expert * 43 / 128          # the busiest GPU's share of the pairs
    assert three._routed_flops_per_token == pytest.approx(routed)
    assert llm.expert_split(1, 2) == 2.0 and llm.expert_split(4, 1) == 4.0


def test_expert_parallelism_within_tensor_parallel_ranks_holds_whole_experts():
    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    expert, h = 3 * 2048 * 768, 2048
    shared = llm.params - 48 * 128 * expert
    # TP = 2 with the experts split (one data-parallel rank): each GPU holds half the shared
    # weights and 64 whole experts, the same bytes as 1/2 of every expert
    for ep in (1, 2):
        assert llm.resident_weight_bytes(2, ep) == pytest.approx(
            (shared / 2 + 48 * 64 * expert) * 2)
    assert llm.resident_weight_bytes(2, 4) == pytest.approx((shared / 2 + 48 * 32 * expert) * 2)
    tp_only = make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=2)
    split = make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=2,
                        expert_parallel_size=2)
    assert split.data_parallel_size == 1
    for n in (1.0, 16.0, 512.0):
        touched = 128 * (1 - (1 - 8 / 128) ** n)   # the tokens are on both GPUs already
        streamed = shared - 151936 * h
        assert split.weight_bytes(n) == pytest.approx(
            (streamed / 2 + 48 * touched / 2 * expert) * 2, rel=1e-12)
        assert split.weight_bytes(n) == pytest.approx(tp_only.weight_bytes(n), rel=1e-12)
        assert split.comm_s(n) == pytest.approx(tp_only.comm_s(n))   # no exchange, all-reduce
    # TP = 2 on two data-parallel ranks: the exchange runs between the two ranks, one hop
    group = make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=2,
                        expert_parallel_size=4)
    assert group.data_parallel_size == 2 and group.ep_link.hops == 1
    exchange = 2 * 48 * (4e-5 + 16 * h * 2 / (64e9 * 0.25))
    assert group.comm_s(16.0) == pytest.approx(tp_only.comm_s(16.0) + exchange, rel=1e-12)
    with pytest.raises(Exception, match="data-parallel ranks of TP GPUs"):
        make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=2,
                    expert_parallel_size=3)


def _random_requests(seed, n, prompts, outputs, span):
    rng = np.random.default_rng(seed)
    return pa.table({"n_input_tokens": rng.integers(*prompts, n),
                     "n_output_tokens": rng.integers(*outputs, n),
                     "arrival_s": np.sort(rng.uniform(0, span, n))})


def _served(table, timing, config):
    """(summary, request record, timeline, timing) of one run."""
    requests, steps = [], []
    summary = simulate(table, timing, config, 16, None,
                       Sustainability(PowerModel.linear_for(timing.gpu),
                                      gpus_per_replica=config.tensor_parallel_size),
                       requests.append, lambda b, _p: steps.append(b))
    return (summary, pa.concat_tables(requests).to_pandas().sort_values("id"),
            pa.Table.from_batches(steps).to_pandas(), timing)


def _moe_steps(table):
    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    config = EngineConfig(replicas=2, enable_expert_parallel=True, router="round-robin")
    return _served(table, make_timing("roofline", llm, gpu, PARAMS,
                                      expert_parallel_size=config.expert_parallel_size), config)


def test_data_parallel_ranks_with_expert_parallelism_step_in_lockstep():
    table = _random_requests(3, 40, (50, 3000), (1, 200), 4)
    summary, requests, steps, timing = _moe_steps(table)
    by_rank = [steps[steps.replica == k].reset_index(drop=True) for k in (0, 1)]
    # every interval of one rank has its twin on the other: same start, same length
    assert len(by_rank[0]) == len(by_rank[1])
    for column in ("start_s", "duration_s"):
        np.testing.assert_allclose(by_rank[0][column], by_rank[1][column], rtol=0, atol=1e-12)
    assert (steps.n_steps == 1).all()                  # no decode runs in lockstep
    # each step lasts the slower rank's own step; the faster one waits at the collectives
    steps["own_s"] = np.maximum(steps.compute_s, steps.memory_s)
    group = steps.groupby("start_s")
    assert (group.duration_s.first() >= group.own_s.max() - 1e-12).all()
    # a rank with nothing to run steps a dummy one-token batch meanwhile
    # (its one token joins the group's: its experts run the other rank's tokens too)
    steps["own_tokens"] = np.where(steps.n_seqs == 0, 1,
                                   steps.prefill_tokens + steps.decode_tokens)
    seen = steps.groupby("start_s").own_tokens.transform("sum")
    dummy = steps[steps.n_seqs == 0]
    assert len(dummy) > 0
    expected = [timing.step_costs(np.ones(1), np.zeros(1), 1,
                                  ExpertGroup(float(t), float(t - 1))).flops
                for t in seen[dummy.index]]
    np.testing.assert_allclose(dummy.flops, expected, rtol=1e-12)
    lone = timing.step_costs(np.ones(1), np.zeros(1), 1)
    assert (dummy.flops > 2 * lone.flops).any()                 # the other rank's tokens
    assert (dummy.duration_s > 1.5 * lone.duration_s).any()    # waiting for the other rank
    assert (dummy.prefill_tokens == 0).all() and (dummy.decode_tokens == 0).all()
    assert summary["gpu_hours"] == pytest.approx(steps.duration_s.sum() / 3600)
    # one request alone: the other rank only runs dummies, and the request is served as by a
    # rank stepping on its own (the dummy step is the shorter one)
    _, alone, alone_steps, _ = _moe_steps(table.slice(0, 1))
    assert (alone_steps[alone_steps.replica == 1].n_seqs == 0).all()
    ranks_alone = alone_steps[alone_steps.replica == 0]
    assert ranks_alone.duration_s.sum() == pytest.approx(alone.e2e_s.iloc[0], rel=1e-9)


def test_the_node_topology_chooses_the_link_of_each_collective():
    from kavier.models.timing import collective_link

    h100, pcie = gpu_library().get("H100-SXM"), gpu_library().get("A100-80GB-PCIe")
    nvlink = collective_link(h100, 8)                 # one HGX node: NVSwitch, one hop
    assert (nvlink.kind, nvlink.gbps, nvlink.hops, nvlink.latency_s) == ("NVLink", 450, 1, 6e-6)
    across = collective_link(h100, 16)                # two nodes: the ring crosses the network
    assert (across.kind, across.gbps, across.hops) == ("network", 50, 1)
    assert collective_link(h100, 32).hops == 3
    ring = collective_link(pcie, 4)                   # no node size known: one PCIe node
    assert (ring.kind, ring.gbps, ring.hops) == ("PCIe", 32, 3)
    llm = llm_library().get("Llama-3.1-70B")
    eight, sixteen = (make_timing("roofline", llm, h100, PARAMS, tensor_parallel_size=tp)
                      for tp in (8, 16))
    n, size = 64.0, 64.0 * llm.hidden_dim * 2
    assert sixteen.comm_s(n) == pytest.approx(
        2 * llm.n_layers * (2e-5 * 1 + 2 * 15 / 16 * size / (50e9 * 0.7)))
    assert sixteen.comm_s(n) > 3 * eight.comm_s(n)    # the network is 9× slower than NVLink
    four = make_timing("roofline", llm, pcie, PARAMS, tensor_parallel_size=4)
    assert four.comm_s(0.0) == pytest.approx(2 * llm.n_layers * 3 * 4e-5)   # latency only
    fitted = make_timing("roofline", llm, pcie, PARAMS.with_(allreduce_latency_s=1e-4),
                         tensor_parallel_size=4)
    assert fitted.comm_s(0.0) == pytest.approx(2 * llm.n_layers * 3 * 1e-4)
    lonely = dataclasses.replace(h100, network_gbps=None)
    with pytest.raises(Exception, match="span nodes of 8.*no network_gbps"):
        make_timing("roofline", llm, lonely, PARAMS, tensor_parallel_size=16)


def _pp_run(table, pp, tp=1, llm="Llama-3.1-8B", gpu="A100-80GB", **engine):
    config = EngineConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, **engine)
    return _served(table, make_timing("roofline", llm_library().get(llm),
                                      gpu_library().get(gpu), PARAMS, tensor_parallel_size=tp,
                                      pipeline_parallel_size=pp), config)


def test_pipeline_stages_pass_one_request_on_with_a_hop_between_them():
    one = pa.table({"n_input_tokens": [1500], "n_output_tokens": [40], "arrival_s": [0.0]})
    s1, r1, _, _ = _pp_run(one, 1)
    s2, r2, steps, timing = _pp_run(one, 2)
    hop_prefill, hop_decode = timing.p2p_s(1500), timing.p2p_s(1)
    assert timing.stage_share == 0.5 and hop_decode > 0
    # each stage does half of every pass (32 layers, 16 a stage): a pass takes as long as on
    # one GPU plus the activations' hop between the stages
    assert r2.ttft_s.iloc[0] == pytest.approx(r1.ttft_s.iloc[0] + hop_prefill, rel=1e-9)
    assert r2.tpot_s.iloc[0] == pytest.approx(r1.tpot_s.iloc[0] + hop_decode, rel=1e-9)
    assert set(steps.replica) == {0, 1} and (steps.n_steps == 1).all()
    first, second = steps[steps.replica == 0], steps[steps.replica == 1]
    np.testing.assert_allclose(second.start_s.to_numpy(), first.start_s.to_numpy()
                               + first.duration_s.to_numpy()
                               + np.array([hop_prefill] + [hop_decode] * (len(first) - 1)))
    assert s2["gpus"] == 2 and s2["replicas"] == 1 and s1["gpus"] == 1
    assert s2["gpu_hours"] == pytest.approx(steps.duration_s.sum() / 3600)
    assert s2["gpu_hours"] == pytest.approx(s1["gpu_hours"], rel=1e-9)    # same work


def test_pipeline_keeps_batches_in_flight_with_bubbles_between_them():
    n = 60
    table = _random_requests(5, n, (100, 6000), (2, 80), 3)
    summary, requests, steps, timing = _pp_run(table, 2, tp=2, llm="Llama-3.1-70B",
                                               max_num_batched_tokens=2048)
    assert summary["n_finished"] == n and summary["gpus"] == 4
    for group in (0, 1):                      # one stage never runs two batches at once
        g = steps[steps.replica == group]
        assert (g.start_s.to_numpy()[1:] >= (g.start_s + g.duration_s).to_numpy()[:-1]
                - 1e-12).all()
    first, second = (steps[steps.replica == k].reset_index(drop=True) for k in (0, 1))
    ends = (first.start_s + first.duration_s).to_numpy()
    # two batches in flight: stage 0 takes the next batch while stage 1 runs the last one
    assert (first.start_s.to_numpy()[1:] < (second.start_s + second.duration_s)
            .to_numpy()[:-1]).any()
    assert (second.start_s.to_numpy() >= ends - 1e-12).all()
    # a prompt longer than the budget has its chunks in consecutive batches at once
    assert (first.prefill_tokens == 2048).sum() >= 2
    idle = summary["timeline_s"] * 2 - (first.duration_s.sum() + second.duration_s.sum())
    assert idle > 0                           # bubbles: stages wait for each other
    # conservation: every request's tokens come out once
    assert requests.n_output_tokens.sum() == int(table.column("n_output_tokens")
                                                 .to_numpy().sum())
    assert (requests.ttft_s > 0).all() and (requests.e2e_s >= requests.ttft_s).all()


def test_pipeline_stages_split_the_weights_and_the_kv_pool_and_refuse_what_is_not_modelled():
    llm, gpu = llm_library().get("Llama-3.1-70B"), gpu_library().get("A100-80GB")
    assert kv_pool_blocks(llm, gpu, 16, pipeline_parallel_size=2,
                          tensor_parallel_size=2) == kv_pool_blocks(llm, gpu, 16,
                                                                    tensor_parallel_size=4)
    three = make_timing("roofline", llm, gpu, PARAMS, pipeline_parallel_size=3)
    assert three.stage_share == 27 / 80       # the largest of 27, 27 and 26 layers
    with pytest.raises(Exception, match="81 pipeline stages"):
        make_timing("roofline", llm, gpu, PARAMS, pipeline_parallel_size=81)
    with pytest.raises(Exception, match="thesis timing model"):
        make_timing("thesis", llm, gpu, pipeline_parallel_size=2)
    with pytest.raises(Exception, match="with expert parallelism is not modelled"):
        EngineConfig(replicas=2, pipeline_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(Exception, match="no network_gbps"):
        make_timing("roofline", llm, dataclasses.replace(gpu, network_gbps=None), PARAMS,
                    tensor_parallel_size=8, pipeline_parallel_size=2)


def test_pipeline_preempts_only_requests_not_in_flight_and_times_out_after_they_return():
    n = 40
    table = _random_requests(11, n, (200, 1500), (50, 300), 1)
    summary, requests, steps, _ = _pp_run(table, 2, num_gpu_blocks=300)
    assert summary["preemptions"] > 0 and summary["n_finished"] == n
    assert steps.kv_blocks_used.max() <= 300
    assert requests.n_output_tokens.sum() == int(table.column("n_output_tokens")
                                                 .to_numpy().sum())
    timed, late, _, _ = _pp_run(table, 2, request_timeout_s=2.0)
    assert 0 < timed["n_failed"] < n
    failed = late[late.status != "ok"]
    assert (failed.e2e_s.isna() | (failed.e2e_s <= 2.0 + 1e-9)).all()


def test_pipeline_preemption_spares_requests_already_in_the_batch_being_scheduled():
    # long prompts chunk across batches in flight; when one of them needs a block, the
    # victim is a request neither in flight nor already given work in this batch (the old
    # choice preempted a batched decode, whose blocks were then allocated twice: a crash)
    n = 30
    table = _random_requests(9, n, (500, 6000), (20, 200), 1)
    summary, requests, steps, _ = _pp_run(table, 2, num_gpu_blocks=800,
                                          max_num_batched_tokens=1024)
    assert summary["preemptions"] > 0 and summary["n_finished"] == n
    assert steps.kv_blocks_used.max() <= 800
    assert requests.n_output_tokens.sum() == int(table.column("n_output_tokens")
                                                 .to_numpy().sum())
    assert (requests.e2e_s >= requests.ttft_s).all()


def test_link_efficiency_defaults_by_kind_of_link_and_a_given_value_overrides_it():
    llm = llm_library().get("Qwen3-32B")
    n, size = 64.0, 64 * 5120 * 2
    for gpu_name, gbps, share in (("RTX-PRO-6000", 64e9, 0.25), ("H100-SXM", 450e9, 0.7)):
        gpu = gpu_library().get(gpu_name)
        default = make_timing("roofline", llm, gpu, PARAMS, tensor_parallel_size=2)
        assert default.tp_link.efficiency == share
        latency = default.tp_link.latency_s * default.tp_link.hops
        assert default.comm_s(n) == pytest.approx(2 * 64 * (latency + size / (gbps * share)))
        given = make_timing("roofline", llm, gpu, PARAMS.with_(link_efficiency=0.5),
                            tensor_parallel_size=2)
        assert given.comm_s(n) == pytest.approx(2 * 64 * (latency + size / (gbps * 0.5)))


def test_a_replica_with_expert_parallelism_holds_its_share_of_the_experts():
    from kavier.export.run import replica_memory_bytes

    llm, gpu = llm_library().get("Qwen3-30B-A3B"), gpu_library().get("RTX-PRO-6000")
    expert = 3 * 2048 * 768
    summary = {"kv_pool_blocks": 1000, "block_size": 16}
    kv = 1000 * 16 * llm.kv_bytes_per_token
    alone = make_timing("roofline", llm, gpu, PARAMS)
    assert replica_memory_bytes(alone, summary) == pytest.approx(llm.weight_bytes + kv)
    split = make_timing("roofline", llm, gpu, PARAMS, expert_parallel_size=2)
    assert replica_memory_bytes(split, summary) == pytest.approx(
        llm.weight_bytes - 48 * 64 * expert * 2 + kv)
