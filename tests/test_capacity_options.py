"""Every option of ``kavier capacity`` changes its table or is rejected with one line, as
``tests/test_simulate_options.py`` checks for ``kavier simulate``: the two share their
engine, trace and model options, and capacity had refused ``--router`` that its
multi-replica candidates use."""

import pytest
from click.testing import CliRunner
from option_cases import SHARED_CASES, check_case

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
    **SHARED_CASES,
    "gpus": (["--gpu", "A100-80GB"], ["--gpu", "Z1"]),
    "profile_path": (["--profile", "{profile}"], ["--profile", "{profile}", "--gpu", "L4"]),
    "timing_model": (["--timing-model", "thesis", "--max-num-seqs", "1", "--back-to-back"],
                     ["--timing-model", "thesis"]),
    "max_cached_prompts": (["--prefix-cache-policy", "prefill", "--max-cached-prompts", "1"],
                           ["--max-cached-prompts", "1"], ["--prefix-cache-policy", "prefill"]),
    "block_size": (["--block-size", "32", "--gpu-memory-utilization", "0.66"],
                   ["--block-size", "0"], ["--gpu-memory-utilization", "0.66"]),
    "slo_ttft": (["--slo-ttft", "0.3", "--gpu", "A100-80GB"], ["--slo-ttft", "-1"],
                 ["--gpu", "A100-80GB"]),
    "slo_tpot": (["--slo-tpot", "0.05"], ["--slo-tpot", "nan"]),
    "replicas": None,                         # searched: tests/test_capacity.py refuses it
    "tensor_parallel_size": None,             # likewise
    "router": (["--router", "prefix-affinity"], None),   # keyless: tests/test_capacity.py
    "async_scheduling": (["--async-scheduling"],
                         ["--async-scheduling", "--pipeline-parallel-size", "2"]),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "256"], ["--max-num-batched-tokens",
                                                                     "0"]),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.7"],
                               ["--gpu-memory-utilization", "0.8", "--num-gpu-blocks", "300"]),
    "activation_reserve_gib": (["--activation-reserve-gib", "5"],
                               ["--activation-reserve-gib", "3", "--num-gpu-blocks", "300"]),
    "request_timeout_s": (["--request-timeout", "8"], ["--request-timeout", "0"]),
    "enable_expert_parallel": (["--llm", "Qwen3-30B-A3B", "--gpu", "H100-SXM",
                                "--enable-expert-parallel"], ["--enable-expert-parallel"]),
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
    before = outcome(sessions_trace, reference[0]) if reference else baseline
    assert isinstance(before, str), before.output
    check_case(lambda args: outcome(sessions_trace, args), option_files, changes, rejected,
               before)
