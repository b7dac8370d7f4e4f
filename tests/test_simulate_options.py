"""Every option of ``kavier simulate`` changes the result or is rejected with one line."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from option_cases import SHARED_CASES, check_case

from kavier.cli import main, simulate

IGNORED_KEYS = {"created", "profile", "trace", "engine", "rows_written", "params",
                "start_time", "export_rate_s", "kv_cache"}


def outcome(tmp_path, trace, args):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--output-folder",
                                       str(out), *map(str, args)])
    if result.exit_code != 0:
        return result
    summary = json.loads((out / "summary.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    frag = (pd.read_parquet(out / "fragments.parquet") if (out / "fragments.parquet").exists()
            else None)
    tasks = (pd.read_parquet(out / "opendc" / "tasks.parquet")
             if (out / "opendc" / "tasks.parquet").exists() else None)
    return {"summary": {k: v for k, v in summary.items() if k not in IGNORED_KEYS},
            "files": files, "fragment_rows": None if frag is None else len(frag),
            "tasks": None if tasks is None else tasks.to_dict("list")}


# option -> (arguments that must change the result, arguments that must be rejected)
CASES = {
    **SHARED_CASES,
    "gpu": (["--gpu", "A100-80GB"], ["--gpu", "Z1"]),
    "profile_path": (["--profile", "{profile}"], ["--profile", "nope.json"]),
    "timing_model": (["--timing-model", "thesis", "--max-num-seqs", "1"],
                     ["--timing-model", "thesis"]),
    "max_cached_prompts": (["--prefix-cache-policy", "prefill", "--max-cached-prompts", "1"],
                           ["--max-cached-prompts", "1"]),
    "block_size": (["--block-size", "32"], ["--block-size", "0"]),
    "slo_ttft": (["--slo-ttft", "0.5"], ["--slo-ttft", "-1"]),
    "slo_tpot": (["--slo-tpot", "0.02"], None),
    "replicas": (["--replicas", "3"], ["--replicas", "0"]),
    "router": (["--replicas", "3", "--router", "round-robin"], ["--router", "round-robin"]),
    "async_scheduling": (["--async-scheduling", "--poisson-rate", "20"],
                         ["--async-scheduling", "--pipeline-parallel-size", "2"]),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "256"], None),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.8"],
                               ["--gpu-memory-utilization", "0.8", "--num-gpu-blocks", "300"]),
    "activation_reserve_gib": (["--activation-reserve-gib", "3"],
                               ["--activation-reserve-gib", "3", "--num-gpu-blocks", "300"]),
    "request_timeout_s": (["--request-timeout", "1"], ["--request-timeout", "0"]),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], ["--tensor-parallel-size", "3"]),
    "enable_expert_parallel": (["--llm", "Qwen3-30B-A3B", "--gpu", "H100-SXM", "--replicas",
                                "2", "--enable-expert-parallel"], ["--enable-expert-parallel"]),
    "output_folder": None,                   # where everything is written (every case)
    "export_rate": (["--export-rate", "1"], ["--export-rate", "1", "--no-fragments"]),
    "fragments": (["--no-fragments"], None),
    "opendc": (["--no-opendc"], None),
    "force": None,        # needs a run past the row limit: tests/test_cli.py's row-guard test
    "write_steps": (["--steps"], None),
    "start_time": (["--start-time", "2022-07-01T00:00"], ["--start-time", "noon"]),
    "power_model": (["--power-model", "sqrt"], None),
    "idle_power_w": (["--idle-power-w", "40"], ["--idle-power-w", "400"]),
    "max_power_w": (["--max-power-w", "300"], None),
    "power_shape": (["--power-model", "mse", "--power-shape", "1.8"], ["--power-shape", "2"]),
    "power_profile": (["--power-profile", "{power}"], ["--power-profile", "nope.json"]),
    "carbon_trace": (["--carbon-trace", "NL"], ["--carbon-trace", "XX"]),
    "pue": (["--pue", "1.3"], ["--pue", "0.9"]),
    "utilization_cap": (["--utilization-cap", "0.5"], ["--utilization-cap", "0"]),
    "memory_bound_utilization": (["--memory-bound-utilization", "0.2"],
                                 ["--memory-bound-utilization", "2"]),
}


def test_every_option_has_a_case():
    assert {p.name for p in simulate.params} - {"trace"} == set(CASES)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, sessions_trace):
    return outcome(tmp_path_factory.mktemp("base"), sessions_trace, [])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c])
def test_option_changes_the_result_or_is_rejected(name, tmp_path, sessions_trace,
                                                  option_files, baseline):
    changes, rejected = CASES[name]
    check_case(lambda args: outcome(tmp_path, sessions_trace, args), option_files, changes,
               rejected, baseline)


def test_cli_defaults_are_the_config_defaults():
    """Options whose defaults also live in a config dataclass agree with it (the dataclass
    is the home; the CLI builds the engine options from EngineConfig and is checked here for
    the rest)."""
    from dataclasses import fields

    from kavier.export.run import ExportOptions
    from kavier.sim.config import EngineConfig
    from kavier.sim.prefix import PrefixCacheConfig
    from kavier.sim.sustainability import Sustainability

    params = {p.name: p for p in simulate.params}
    engine = {f.name: f.default for f in fields(EngineConfig)}
    for name, default in engine.items():
        assert params[name].default == default, name
        assert params[name].help.startswith(
            EngineConfig.__dataclass_fields__[name].metadata["help"][:30]), name
    pairs = [("export_rate", ExportOptions, "export_rate_s"), ("fragments", ExportOptions,
             "fragments"), ("opendc", ExportOptions, "opendc"),
             ("write_steps", ExportOptions, "steps"), ("pue", Sustainability, "pue"),
             ("utilization_cap", Sustainability, "utilization_cap"),
             ("cache_scope", PrefixCacheConfig, "scope"),
             ("prefix_cache_policy", PrefixCacheConfig, "policy")]
    for option, cls, field in pairs:
        assert params[option].default == cls.__dataclass_fields__[field].default, option
    # φ defaults to the power profile's fit, else Sustainability's
    from kavier.sim.sustainability import MEMORY_BOUND_UTILIZATION

    assert params["memory_bound_utilization"].default is None
    assert Sustainability.__dataclass_fields__["memory_bound_utilization"].default == \
        MEMORY_BOUND_UTILIZATION
    assert PrefixCacheConfig().min_tokens == 256 and "[256]" in params[
        "prefix_cache_min_tokens"].help


def test_requests_asking_for_zero_tokens_are_served_with_one_and_counted(tmp_path):
    # vLLM rejects an empty prompt and max_tokens 0; a trace may still hold such rows
    # (BurstGPT logs failures with 0 response tokens): each is served as one token, and
    # the summary and a warning say how many, instead of a silent change
    trace = tmp_path / "zeros.csv"
    pd.DataFrame({"n_input_tokens": [0, 40, 30, 0], "n_output_tokens": [5, 0, 3, 0],
                  "arrival_s": [0.0, 0.1, 0.2, 0.3]}).to_csv(trace, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--output-folder",
                                       str(out), "--no-fragments", "--no-opendc"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_token_requests"] == {"n_input_tokens": 2, "n_output_tokens": 2}
    records = pd.read_parquet(out / "requests.parquet").sort_values("id")
    assert records.n_input_tokens.tolist() == [1, 40, 30, 1]
    assert records.n_output_tokens.tolist() == [5, 1, 3, 1]
    assert summary["n_output_tokens"] == 10 and (records.status == "finished").all()
    assert ("2 requests with an empty prompt and 2 requests with 0 output tokens served with "
            "one token each") in result.stderr
    clean = tmp_path / "clean.csv"
    pd.DataFrame({"n_input_tokens": [4], "n_output_tokens": [2]}).to_csv(clean, index=False)
    quiet = CliRunner().invoke(main, ["simulate", "--trace", str(clean), "--output-folder",
                                      str(tmp_path / "o2"), "--no-fragments", "--no-opendc"])
    assert quiet.exit_code == 0 and "served with one token" not in quiet.stderr


@pytest.mark.parametrize("option", ["--rate-scale", "--poisson-rate", "--slo-ttft",
                                    "--request-timeout", "--pue", "--max-power-w",
                                    "--gpu-memory-utilization"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_number_option_refuses_nan_and_infinity(sessions_trace, tmp_path, option, value):
    # NaN passes every range comparison, so a plain range check let it through and the run
    # wrote NaN arrivals or SLOs; infinity made energies infinite
    result = CliRunner().invoke(main, ["simulate", "--trace", str(sessions_trace),
                                       "--output-folder", str(tmp_path / "o"), option, value])
    assert result.exit_code == 2, result.output
    assert (f"'{value}' is not a finite number" in result.output   # or above a bounded range
            or f"{value} is not in the range" in result.output)
    assert not (tmp_path / "o" / "summary.json").exists()
