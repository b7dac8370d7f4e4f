"""Power models, energy, CO2, efficiency metrics and power calibration."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from archive.carbon import read_carbon
from archive.errors import InputError
from archive.smi import read_capture
from calibrate.power import calibrate_power
from kavier.analysis.efficiency import RunTotals, ratios, report
from kavier.cli import main
from kavier.models.power import POWER_MODELS, PowerModel

CAPTURE = Path(__file__).parent / "data" / "nvidia-smi-h100-loop100ms.csv"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name,u,expected", [
    ("linear", 0.5, 85.0), ("sqrt", 0.25, 85.0), ("square", 0.5, 52.5),
    ("cubic", 0.5, 20 + 130 / 8), ("mse", 1.0, 150.0), ("constant", 0.0, 150.0),
    ("mse", 0.5, 20 + 130 * (1 - 0.5**1.4)),
    ("asymptotic", 0.3, 20 + 65 * (1.3 - np.exp(-1))),
    ("asymptotic_dvfs", 0.5, 20 + 65 * (1.125 - np.exp(-0.125 / 0.3))),
])
def test_power_models_match_table_4_1(name, u, expected):
    assert PowerModel(name, 20.0, 150.0).power_w(u) == pytest.approx(expected)


@pytest.mark.parametrize("name", [m for m in POWER_MODELS if m != "constant"])
def test_power_is_idle_at_zero_and_never_decreases(name):
    model = PowerModel(name, 20.0, 150.0)
    watts = model.power_w(np.linspace(0, 1, 101))
    assert watts[0] == pytest.approx(20.0) and (np.diff(watts) >= -1e-12).all()
    assert watts[-1] <= 150.0 + 1e-9


def test_power_model_errors():
    for args in (("nope", 1, 2), ("linear", 200, 100), ("mse", 1, 2, -1.0)):
        with pytest.raises(InputError):
            PowerModel(*args)


def carbon_table(values, step="15min"):
    return pd.DataFrame({"timestamp": pd.date_range("2022-07-01", periods=len(values),
                                                    freq=step, tz="UTC"),
                         "carbon_intensity": values})


def test_carbon_traces_are_read_and_checked(tmp_path):
    nl = read_carbon("NL")
    assert len(nl) == 34944 and str(nl["timestamp"].dt.tz) == "UTC"
    bad = carbon_table([100.0, -1.25])
    bad.to_csv(tmp_path / "c.csv", index=False)
    # the value as the user wrote it, not numpy's repr (np.float64(-1.25))
    with pytest.raises(InputError, match=r"line 3: field 'carbon_intensity'.*got -1\.25$"):
        read_carbon(tmp_path / "c.csv")
    carbon_table([100.0, float("inf")]).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(InputError, match=r"line 3: field 'carbon_intensity': expected a "
                                         r"finite"):
        read_carbon(tmp_path / "e.csv")
    carbon_table([1.0, 2.0]).iloc[::-1].to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(InputError, match="timestamps must increase"):
        read_carbon(tmp_path / "d.csv")
    with pytest.raises(InputError, match="countries: BE, DE, FR, NL"):
        read_carbon("XX")


def totals(busy_s, tokens=1_000_000, energy_j=3.6e6, co2_g=500.0):
    return RunTotals("t", tokens // 2, tokens - tokens // 2, busy_s / 4, busy_s * 3 / 4,
                     busy_s, energy_j, co2_g)


def test_efficiency_metrics_by_hand():
    r = report(totals(3600.0), price_per_gpu_hour=2.0)
    assert r["cost"] == pytest.approx(2.0)
    assert r["financial_efficiency"] == pytest.approx(2.0 * 3600 / 1e6)     # eq. 4.8
    assert r["energy_efficiency_wh_s_per_token"] == pytest.approx(1000.0 * 3600 / 1e6)
    assert r["co2_efficiency_g_s_per_token"] == pytest.approx(500.0 * 3600 / 1e6)
    assert r["cost_per_mtok"] == pytest.approx(2.0)
    assert r["energy_wh_per_mtok"] == pytest.approx(1000.0)    # 3.6 MJ is 1 kWh, not 3.6 MWh
    assert r["tokens_per_j"] == pytest.approx(1e6 / 3.6e6)
    assert report(totals(3600.0, energy_j=None, co2_g=None))["tokens_per_j"] is None


def test_efficiency_ratio_and_where_the_thesis_simplification_holds():
    a, b = report(totals(7200.0)), report(totals(3600.0))
    # same price and tokens: eq. 4.9's closing form ΔT1² / ΔT2² agrees with E1 / E2
    assert ratios(a, b)["financial_efficiency"] == pytest.approx((7200 / 3600) ** 2)
    c = report(totals(3600.0, tokens=2_000_000))
    assert ratios(a, c)["financial_efficiency"] != pytest.approx((7200 / 3600) ** 2)


def test_efficiency_command_with_two_runs_and_opendc_power(tmp_path):
    runs = []
    for gpu in ("A10", "A100-80GB"):
        out = tmp_path / gpu
        assert cli("simulate", "--trace", "azure-llm-inference-2023-conv", "--gpu", gpu,
                   "--back-to-back", "--no-fragments", "--no-opendc",
                   "--output-folder", out).exit_code == 0
        runs.append(out)
    result = cli("efficiency", *runs)
    assert result.exit_code == 0, result.output
    assert "eq. 4.8" in result.output and "ratio" in result.output
    power = tmp_path / "powerSource.parquet"
    pd.DataFrame({"timestamp": [0, 1], "power_draw": [100.0, 100.0],
                  "energy_usage": [1.8e6, 1.8e6], "carbon_intensity": [100.0, 100.0],
                  "carbon_emission": [50.0, 50.0]}).to_parquet(power)
    result = cli("efficiency", runs[0], "--opendc-power", power)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("Wh per million"))
    tokens = 22_361_870 + 4_088_665
    assert float(line.split()[-1]) == pytest.approx(1000.0 / tokens * 1e6, abs=0.01)
    bad = cli("efficiency", tmp_path / "nothing")
    assert bad.exit_code == 2 and "summary.json" in bad.output
    # an A10 and an A100 hour do not cost the same: one price per run
    priced = cli("efficiency", *runs, "--price-per-gpu-hour", "0.8,3.0")
    assert priced.exit_code == 0, priced.output
    costs = next(x for x in priced.output.splitlines() if x.startswith("cost (EUR)")).split()
    one = next(x for x in result.output.splitlines() if x.startswith("cost (EUR)")).split()
    assert float(costs[2]) == pytest.approx(float(one[2]) * 0.8 / 1.2, rel=1e-3)
    for price, message in (("nan", "positive finite numbers"), ("inf", "positive finite"),
                           ("1,2,3", "3 prices for 2 runs")):
        refused = cli("efficiency", *runs, "--price-per-gpu-hour", price)
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_power_calibration_recovers_known_parameters():
    rng = np.random.default_rng(3)
    u = rng.uniform(0, 100, 600)
    truth = PowerModel("sqrt", 60.0, 300.0)
    samples = pd.DataFrame({"utilization_gpu_pct": u,
                            "power_w": truth.power_w(u / 100) * rng.normal(1, 0.01, u.size)})
    result = calibrate_power(samples)
    assert result.best.name == "sqrt"
    assert result.best.idle_w == pytest.approx(60.0, rel=0.03)
    assert result.best.max_w == pytest.approx(300.0, rel=0.03)
    assert result.ranking["mape_heldout_pct"].iloc[0] < 2.0


def test_calibrate_power_on_the_real_h100_capture(tmp_path):
    out = tmp_path / "power"
    result = cli("calibrate-power", CAPTURE, "--gpu", "H100-SXM", "--output-folder", out)
    assert result.exit_code == 0, result.output
    assert "poor predictor" in result.output        # at 100 %: decode ~400 W, prefill ~700 W
    profile = json.loads((out / "power_profile.json").read_text())["power"]
    assert len(profile["ranking"]) == len(POWER_MODELS)
    assert profile["mape_pct"]["heldout"] < 20
    assert profile["samples"] == len(read_capture(CAPTURE))
    model = profile["model"]
    sim = tmp_path / "sim"
    assert cli("simulate", "--trace", "azure-llm-inference-2023-conv", "--gpu", "H100-SXM",
               "--power-profile", out / "power_profile.json", "--no-fragments",
               "--output-folder", sim).exit_code == 0
    energy = json.loads((sim / "summary.json").read_text())["sustainability"]
    assert energy["power_model"] == model
    assert model["idle_w"] <= energy["mean_power_w"] <= model["max_w"]
    assert (out / "power_fit.png").stat().st_size > 10_000


def test_calibrate_power_refuses_a_profile_of_another_gpu(tmp_path):
    # the H100 capture's power section had been written into an A10 timing profile without
    # a word when --gpu named the H100 (and recorded no GPU without --gpu)
    a10 = tmp_path / "a10.json"
    a10.write_text(Path("calibrate/profiles/a10-llama-3-8b-vllm.json").read_text())
    before = a10.read_text()
    refused = cli("calibrate-power", CAPTURE, "--gpu", "H100-SXM", "--profile", a10,
                  "--output-folder", tmp_path / "p1")
    assert refused.exit_code == 2, refused.output
    assert f"{a10} is for GPU A10, --gpu for H100-SXM" in refused.output
    assert a10.read_text() == before and not (tmp_path / "p1").exists()
    named = cli("calibrate-power", CAPTURE, "--gpu", "NVIDIA A10", "--profile", a10,
                "--output-folder", tmp_path / "p2")      # nvidia-smi's name of the same GPU
    assert named.exit_code == 0, named.output
    assert json.loads(a10.read_text())["power"]["gpu"] == "NVIDIA A10"
    unnamed = cli("calibrate-power", CAPTURE, "--profile", a10, "--output-folder",
                  tmp_path / "p3")
    assert unnamed.exit_code == 0, unnamed.output
    assert json.loads(a10.read_text())["power"]["gpu"] == "A10"      # the profile's
