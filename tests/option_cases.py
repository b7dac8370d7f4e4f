"""What ``kavier simulate`` and ``kavier capacity`` share in their every-option tests: the
cases of the options both take with the same effect, and the check of one case (with
``kavier calibrate``'s)."""

from click.testing import Result

# option -> (arguments that must change the result, arguments that must be rejected)
SHARED_CASES = {
    "llm": (["--llm", "Mistral-7B"], ["--llm", "Llama-2-13B"]),
    "kv_cache": (["--kv-cache", "off"], ["--kv-cache", "off", "--chunked-prefill"]),
    "kv_cache_dtype": (["--kv-cache-dtype", "fp8"], ["--kv-cache-dtype", "fp8", "--kv-cache",
                                                     "off"]),
    "prefix_cache_policy": (["--prefix-cache-policy", "blocks"], None),
    "prefix_cache_min_tokens": (["--prefix-cache-policy", "prefill",
                                 "--prefix-cache-min-tokens", "600"],
                                ["--prefix-cache-min-tokens", "600"]),
    "cache_scope": (["--prefix-cache-policy", "prefill", "--cache-scope", "session"],
                    ["--cache-scope", "session"]),
    "rate_scale": (["--rate-scale", "4"], ["--rate-scale", "4", "--back-to-back"]),
    "poisson_rate": (["--poisson-rate", "20"], ["--poisson-rate", "0"]),
    "seed": (["--poisson-rate", "20", "--seed", "7"], ["--seed", "7"]),
    "llm_library": (["--llm-library", "{llms}", "--llm", "Tiny-1B"], ["--llm-library", "x"]),
    "gpu_library": (["--gpu-library", "{gpus}", "--gpu", "Half-A10"], ["--gpu-library", "x"]),
    "max_num_seqs": (["--max-num-seqs", "2"], ["--max-num-seqs", "0"]),
    "chunked_prefill": (["--max-num-batched-tokens", "256", "--no-chunked-prefill"], None),
    "num_gpu_blocks": (["--num-gpu-blocks", "300"], ["--num-gpu-blocks", "10"]),
    "pipeline_parallel_size": (["--pipeline-parallel-size", "2"],      # 32 layers: 33 stages
                               ["--pipeline-parallel-size", "33"]),
    "back_to_back": (["--back-to-back"], None),
}


def check_case(outcome, files: dict, changes, rejected, before) -> None:
    """One every-option case: ``outcome(args)`` → what a run gave (anything but click's
    :class:`~click.testing.Result`, which it returns for a failed run). With ``changes`` the
    run must succeed and differ from ``before``; with ``rejected`` it must fail in one line.
    ``{name}`` in an argument is the path ``files[name]``."""
    if changes is not None:
        got = outcome([a.format(**files) for a in changes])
        assert not isinstance(got, Result), got.output
        assert got != before, f"{changes} changed nothing"
    if rejected is not None:
        bad = outcome([a.format(**files) for a in rejected])
        assert isinstance(bad, Result), f"{rejected} was accepted"
        assert_rejected_in_one_line(bad)


def assert_rejected_in_one_line(result) -> None:
    """``result`` (click's) failed with exit 2 and a last line ``error: …``: ours is one line;
    click's own usage errors print the usage first."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.lower().startswith("error:"), result.output
