"""Every option of ``kavier calibrate`` on single-request sweeps changes the profile or is
rejected with one line (the serving-run options: tests/test_serving.py). The roofline's
--attention-efficiency had been dropped silently under --timing-model thesis."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from option_cases import check_case

import archive
from kavier.cli import calibrate, main


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The bundled A10 sweeps, plus a second setup 30 % slower (for --setup-id)."""
    table = pd.read_parquet(archive.dataset_dir("a10-surf-vllm-llama3-8b")
                            / "measurements.parquet")
    other = table.assign(setup_id="slower", latency_s=table.latency_s * 1.3,
                         ttft_s=table.ttft_s * 1.3, decode_s=table.decode_s * 1.3)
    path = tmp_path_factory.mktemp("sweeps") / "two-setups.parquet"
    pd.concat([table, other]).to_parquet(path)
    return path


def outcome(tmp_path, sweeps, args):
    """The profile's parameters and MAPEs (exit 0) or the failed result."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["calibrate", "--dataset", str(sweeps),
                                       "--output-folder", str(out), *map(str, args)])
    if result.exit_code != 0:
        return result
    profile = json.loads((out / "profile.json").read_text())
    return {k: profile[k] for k in ("gpu", "llm", "timing_model", "params", "mape_pct")}


# option -> (arguments that must change the profile, arguments that must be rejected)
CASES = {
    "dataset": (None, ["--dataset", "nope.parquet"]),     # every case reads another file
    "setup_id": (["--setup-id", "slower"], ["--setup-id", "none-such"]),
    "llm": (["--llm", "Llama-3.1-8B"], ["--llm", "Z-1B"]),
    "gpu": (["--gpu", "A100-80GB"], ["--gpu", "Z1"]),
    "timing_model": (["--timing-model", "thesis"], None),
    "attention_efficiency": (["--attention-efficiency", "0.5"],
                             ["--attention-efficiency", "0.5", "--timing-model", "thesis"]),
    "output_folder": None,                    # where the profile is written (every case)
    "llm_library": (["--llm-library", "{llms}", "--llm", "Tiny-1B"], ["--llm-library", "x"]),
    "gpu_library": (["--gpu-library", "{gpus}", "--gpu", "Half-A10"], ["--gpu-library", "x"]),
    "fit": (["--fit", "compute_efficiency"], ["--fit", "nope"]),
    "split": (None, ["--split", "0.5"]),                  # serving runs only
    "max_efficiency": (None, ["--max-efficiency", "0.9"]),
    "max_evaluations": (None, ["--max-evaluations", "10"]),
    "predict": (None, ["--predict", "vllm-serving-rtx4090-llama3.1-8b"]),
    "phase_draws": (None, ["--phase-draws", "4"]),
}


def test_every_calibrate_option_has_a_case():
    assert {p.name for p in calibrate.params} == set(CASES)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, sweeps):
    got = outcome(tmp_path_factory.mktemp("base"), sweeps, [])
    assert isinstance(got, dict), got.output
    return got


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c])
def test_calibrate_option_changes_the_profile_or_is_rejected(name, tmp_path, sweeps,
                                                             option_files, baseline):
    changes, rejected = CASES[name]
    check_case(lambda args: outcome(tmp_path, sweeps, args), option_files, changes, rejected,
               baseline)
