"""Every option of ``kavier capacity`` changes its table or is rejected with one line, as
``tests/test_simulate_options.py`` checks for ``kavier simulate``: the two share their
engine, trace and model options, and capacity had refused ``--router`` that its
multi-replica candidates use."""

import pytest
from click.testing import CliRunner

from kavier.cli import capacity, main

# one GPU type and TP size keep each run to a few simulations; --workers 1 one process
BASE = ["--gpu", "A10", "--tensor-parallel-sizes", "1", "--slo-ttft", "1", "--workers", "1"]


def outcome(trace, args):
    """The printed table (exit 0) or the failed result."""
    result = CliRunner().invoke(main, ["capacity", "--trace", str(trace), *BASE,
                                       *map(str, args)])
    return result.output if result.exit_code == 0 else result


# option -> (arguments that must change the table, arguments that must be rejected[,
# the reference the change is measured from, when not the baseline])
CASES = {
    "llm": (["--llm", "Mistral-7B"], ["--llm", "Llama-2-13B"]),
    "gpus": (["--gpu", "A100-80GB"], ["--gpu", "Z1"]),
    "profile_path": (["--profile", "{profile}"], ["--profile", "{profile}", "--gpu", "L4"]),
    "timing_model": (["--timing-model", "thesis", "--max-num-seqs", "1", "--back-to-back"],
                     ["--timing-model", "thesis"]),
    "kv_cache": (["--kv-cache", "off"], ["--kv-cache", "off", "--chunked-prefill"]),
    "prefix_cache_policy": (["--prefix-cache-policy", "blocks"], None),
    "prefix_cache_min_tokens": (["--prefix-cache-policy", "prefill",
                                 "--prefix-cache-min-tokens", "600"],
                                ["--prefix-cache-min-tokens", "600"]),
    "max_cached_prompts": (["--prefix-cache-policy", "prefill", "--max-cached-prompts", "1"],
                           ["--max-cached-prompts", "1"], ["--prefix-cache-policy", "prefill"]),
    "cache_scope": (["--prefix-cache-policy", "prefill", "--cache-scope", "session"],
                    ["--cache-scope", "session"]),
    "block_size": (["--block-size", "32", "--gpu-memory-utilization", "0.66"],
                   ["--block-size", "0"], ["--gpu-memory-utilization", "0.66"]),
    "rate_scale": (["--rate-scale", "4"], ["--rate-scale", "4", "--back-to-back"]),
    "poisson_rate": (["--poisson-rate", "20"], ["--poisson-rate", "0"]),
    "seed": (["--poisson-rate", "20", "--seed", "7"], ["--seed", "7"]),
    "slo_ttft": (["--slo-ttft", "0.3", "--gpu", "A100-80GB"], ["--slo-ttft", "-1"],
                 ["--gpu", "A100-80GB"]),
    "slo_tpot": (["--slo-tpot", "0.05"], ["--slo-tpot", "nan"]),
    "llm_library": (["--llm-library", "{llms}", "--llm", "Tiny-1B"], ["--llm-library", "x"]),
    "gpu_library": (["--gpu-library", "{gpus}", "--gpu", "Half-A10"], ["--gpu-library", "x"]),
    "replicas": None,                         # searched: tests/test_capacity.py refuses it
    "tensor_parallel_size": None,             # likewise
    "router": (["--router", "prefix-affinity"], None),   # keyless: tests/test_capacity.py
    "max_num_seqs": (["--max-num-seqs", "2"], ["--max-num-seqs", "0"]),
    "async_scheduling": (["--async-scheduling"],
                         ["--async-scheduling", "--pipeline-parallel-size", "2"]),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "256"], ["--max-num-batched-tokens",
                                                                     "0"]),
    "chunked_prefill": (["--max-num-batched-tokens", "256", "--no-chunked-prefill"], None),
    "num_gpu_blocks": (["--num-gpu-blocks", "300"], ["--num-gpu-blocks", "10"]),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.7"],
                               ["--gpu-memory-utilization", "0.8", "--num-gpu-blocks", "300"]),
    "activation_reserve_gib": (["--activation-reserve-gib", "5"],
                               ["--activation-reserve-gib", "3", "--num-gpu-blocks", "300"]),
    "request_timeout_s": (["--request-timeout", "8"], ["--request-timeout", "0"]),
    "pipeline_parallel_size": (["--pipeline-parallel-size", "2"],
                               ["--pipeline-parallel-size", "33"]),
    "enable_expert_parallel": (["--llm", "Qwen3-30B-A3B", "--gpu", "H100-SXM",
                                "--enable-expert-parallel"], ["--enable-expert-parallel"]),
    "back_to_back": (["--back-to-back"], None),
    "tensor_parallel_sizes": (["--tensor-parallel-sizes", "1,2"],
                              ["--tensor-parallel-sizes", "1,x"]),
    "percentile": (["--percentile", "50"], ["--percentile", "101"]),
    "max_replicas": (["--max-replicas", "2", "--gpu", "A10,A100-80GB"], ["--max-replicas", "0"],
                     ["--gpu", "A10,A100-80GB"]),
    "price_per_gpu_hour": (["--price-per-gpu-hour", "2"], ["--price-per-gpu-hour", "1,2"]),
    "currency": (["--currency", "USD"], None),
    "scheduler": (None, ["--scheduler", "tcp://127.0.0.1:9"]),   # a cluster: not in tests
    "workers": None,                          # how, not what: the table is the same
}


def test_every_capacity_option_has_a_case():
    assert {p.name for p in capacity.params} - {"trace"} == set(CASES)


@pytest.fixture(scope="module")
def baseline(sessions_trace):
    table = outcome(sessions_trace, [])
    assert isinstance(table, str), table.output
    return table


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c])
def test_capacity_option_changes_the_table_or_is_rejected(name, sessions_trace, option_files,
                                                          baseline):
    changes, rejected, *reference = CASES[name]
    if changes is not None:
        got = outcome(sessions_trace, [a.format(**option_files) for a in changes])
        assert isinstance(got, str), got.output
        before = outcome(sessions_trace, reference[0]) if reference else baseline
        assert isinstance(before, str), before.output
        assert got != before, f"{changes} changed nothing"
    if rejected is not None:
        bad = outcome(sessions_trace, [a.format(**option_files) for a in rejected])
        assert not isinstance(bad, str), f"{rejected} was accepted"
        assert bad.exit_code == 2 and "Traceback" not in bad.output
        last = bad.output.strip().splitlines()[-1]      # ours: one line; click's: usage first
        assert last.lower().startswith("error:"), bad.output
