import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

import archive
from archive.datasets import dataset_dir
from archive.importers.a10_surf import table_medians
from calibrate.estimator import TimingRegressor
from calibrate.fit import (
    calibrate,
    check_measurements,
    nominal_size,
    size_medians,
    thesis_scoring,
)
from calibrate.profile import Profile
from kavier.models.timing import ThesisTiming

A10 = "a10-surf-vllm-llama3-8b"


@pytest.fixture(scope="module")
def a10_data():
    return archive.load(A10)


@pytest.fixture(scope="module")
def result(a10_data):
    return calibrate(a10_data, TimingRegressor(attention_efficiency=1.0))


def test_thesis_model_with_thesis_defaults_matches_the_thesis(a10_data, llama8b, a10):
    scores = thesis_scoring(table_medians(dataset_dir(A10)), ThesisTiming(llama8b, a10))
    assert 7.2 <= scores["prefill"] <= 7.8
    assert 3.7 <= scores["decode"] <= 4.3
    raw = thesis_scoring(size_medians(a10_data), ThesisTiming(llama8b, a10))
    assert raw["prefill"] == pytest.approx(scores["prefill"], abs=0.2)


def test_calibrated_held_out_mape_within_five_percent(result):
    for stage in ("prefill", "decode"):
        assert result.scores["heldout"][stage]["per_size_median"] <= 5.0
        assert result.scores["fit"][stage]["per_size_median"] <= (
            result.scores["heldout"][stage]["per_size_median"] + 1e-9)
    assert result.scores["heldout"]["prefill"]["per_size_median"] < (
        result.scores["thesis_defaults"]["prefill"]["per_size_median"])


def test_held_out_prediction_ignores_the_held_out_size(a10_data):
    changed = a10_data.copy()
    rows = (changed["sweep"] == "prefill") & (changed["n_input_tokens"] == 1024)
    changed.loc[rows, "latency_s"] *= 3
    est = TimingRegressor(attention_efficiency=1.0)
    before = calibrate(a10_data, est).points
    after = calibrate(changed, est).points
    held = (before["sweep"] == "prefill") & (before["size"] == 1024)
    assert np.allclose(before.loc[held, "predicted_heldout_s"],
                       after.loc[held, "predicted_heldout_s"])
    assert not np.allclose(before.loc[held, "predicted_fit_s"], after.loc[held, "predicted_fit_s"])


def test_estimator_works_with_sklearn_cross_validation(a10_data):
    df = check_measurements(a10_data, "x")
    X = df[["n_input_tokens", "n_output_tokens"]]
    est = TimingRegressor(timing_model="thesis")
    assert clone(est).get_params() == est.get_params()
    scores = cross_val_score(est, X, df["latency_s"], groups=nominal_size(df),
                             cv=LeaveOneGroupOut(), scoring="neg_mean_absolute_percentage_error")
    assert len(scores) == 11 and np.all(scores < 0) and np.all(scores > -1)


def test_fit_recovers_known_parameters(llama8b, a10):
    truth = TimingRegressor(llm=llama8b, gpu=a10, timing_model="thesis",
                            compute_efficiency=0.4, memory_efficiency=0.5, request_overhead_s=0.05)
    X = np.array([[n, 1] for n in (64, 256, 1024, 4096)] + [[10, m] for m in (50, 500, 5000)],
                 dtype=float)
    y = truth.timing().e2e_s(X[:, 0], X[:, 1])
    fitted = TimingRegressor(llm=llama8b, gpu=a10, timing_model="thesis").fit(X, y)
    assert fitted.params_.compute_efficiency == pytest.approx(0.4, rel=1e-3)
    assert fitted.params_.memory_efficiency == pytest.approx(0.5, rel=1e-3)
    assert fitted.train_mape_ < 1e-4


def test_profile_round_trip_and_bad_profiles(result, tmp_path):
    profile = Profile(gpu="A10", llm="Llama-3-8B", engine="vLLM 0.9.0", timing_model="roofline",
                      params=result.estimator.params_, mape_pct=result.scores)
    path = profile.write(tmp_path / "p.json")
    assert Profile.read(path).params == result.estimator.params_
    path.write_text('{"gpu": "A10"}')
    from archive.errors import InputError
    with pytest.raises(InputError, match="llm"):
        Profile.read(path)


def test_one_stage_sweeps_calibrate_and_fit_is_chosen(a10_data, tmp_path):
    import json

    from click.testing import CliRunner

    from kavier.cli import main

    prefill = a10_data[a10_data["sweep"] == "prefill"]
    only = calibrate(prefill, TimingRegressor(attention_efficiency=1.0))
    assert set(only.scores["heldout"]) == {"prefill"}
    assert only.scores["heldout"]["prefill"]["per_size_median"] < 5.0
    assert set(size_medians(prefill)["size"]) == set(prefill["n_input_tokens"])
    csv = tmp_path / "prefill.csv"
    prefill.to_csv(csv, index=False)
    out = tmp_path / "cal"
    result = CliRunner().invoke(main, ["calibrate", "--dataset", str(csv), "--fit",
                                       "compute_efficiency,prefill_floor_s",
                                       "--output-folder", str(out)])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "profile.json").read_text())["params"]
    assert params["prefill_floor_s"] > 0 and params["memory_efficiency"] == 0.6
    rejected = CliRunner().invoke(main, ["calibrate", "--dataset", str(csv), "--fit",
                                         "kv_memory_efficiency", "--output-folder",
                                         str(tmp_path / "r")])
    assert rejected.exit_code == 2 and "single-request sweeps" in rejected.output


def test_one_size_holds_nothing_out_and_says_so(a10_data):
    import warnings

    sizes = nominal_size(a10_data)
    one = a10_data[sizes == 64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no NaN from an empty fold
        result = calibrate(one, TimingRegressor(attention_efficiency=1.0))
    assert all(v == {"per_request": None, "per_size_median": None}
               for v in result.scores["heldout"].values())
    assert result.points["predicted_heldout_s"].isna().all()
    assert result.scores["fit"]["prefill"]["per_request"] >= 0


def test_estimator_contract_and_mape_equal_scikit_learns(llama8b, a10):
    from sklearn.exceptions import NotFittedError
    from sklearn.metrics import mean_absolute_percentage_error

    from calibrate.estimator import weighted_mape

    rng = np.random.default_rng(0)
    y, p, w = rng.uniform(0.1, 5, 50), rng.uniform(0.1, 5, 50), rng.uniform(0, 2, 50)
    assert weighted_mape(y, p, w) == pytest.approx(mean_absolute_percentage_error(y, p,
                                                                                 sample_weight=w))
    est = TimingRegressor(llm=llama8b, gpu=a10, timing_model="thesis")
    X = np.array([[64.0, 1.0], [10.0, 100.0], [512.0, 1.0]])
    with pytest.raises(NotFittedError):
        est.predict(X)
    for bad_X, bad_y in ((np.array([[np.nan, 1.0]] * 3), [1.0, 1.0, 1.0]),
                         (np.array([[-5.0, 1.0]] * 3), [1.0, 1.0, 1.0]),
                         (X, [1.0, 2.0]), (X, [1.0, -2.0, 1.0]), (X[:, :1], [1.0] * 3)):
        with pytest.raises(ValueError):
            clone(est).fit(bad_X, bad_y)
    fitted = clone(est).fit(X, [0.1, 4.0, 0.2])
    assert fitted.n_features_in_ == 2 and fitted.predict(X).shape == (3,)


FIXED_FEATURE_CHECKS = (
    "check_dict_unchanged", "check_dont_overwrite_parameters", "check_dtype_object",
    "check_estimators_dtypes", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_fit2d_1sample", "check_fit2d_predict1d",
    "check_fit_score_takes_y", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_n_features_in_after_fitting",
    "check_pipeline_consistency", "check_regressor_data_not_an_array", "check_regressors_int",
    "check_regressors_no_decision_function", "check_regressors_train",
    "check_sample_weight_equivalence_on_dense_data", "check_sample_weights_list",
    "check_supervised_y_2d")
"""scikit-learn checks that feed 3-30 random features: the timing model has exactly two
(n_input_tokens, n_output_tokens), so these fail by design, and only these."""


def _fixed_feature_failures(estimator):
    return dict.fromkeys(FIXED_FEATURE_CHECKS, "two fixed features: n_input_tokens, "
                                               "n_output_tokens")


@parametrize_with_checks([TimingRegressor(timing_model="thesis")],
                         expected_failed_checks=_fixed_feature_failures)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_the_expected_failures_fail_for_the_two_features_only():
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(TimingRegressor(timing_model="thesis"), on_fail=None)
    failed = [r for r in results if r["status"] == "failed"]
    assert {r["check_name"] for r in failed} == set(FIXED_FEATURE_CHECKS)
    for r in failed:
        assert "feature(s)" in str(r["exception"]) or r["check_name"] == "check_fit2d_1sample"


def test_the_sweeps_weigh_equally_in_the_fit(a10_data):
    """Calibration gives each sweep the same total weight, however many sizes it has: a fit
    that weighted per point would let the sweep with more sizes dominate."""
    seen = []

    class Recording(TimingRegressor):
        def fit(self, X, y, sample_weight=None):
            seen.append((np.asarray(X)[:, 1] > 1, np.asarray(sample_weight)))
            return super().fit(X, y, sample_weight)

    from calibrate.fit import stage_weights

    # 3 prefill points against 9 decode points: each sweep still weighs one half
    frame = pd.DataFrame({"sweep": ["prefill"] * 3 + ["decode"] * 9})
    w = stage_weights(frame)
    assert w[:3].sum() == pytest.approx(w[3:].sum()) == pytest.approx(1.0)
    calibrate(a10_data, Recording(timing_model="thesis"))
    assert len(seen) == 1 + 9            # the full fit and every leave-one-size-out fold
    for decode, w in seen:
        assert w[decode].sum() == pytest.approx(w[~decode].sum(), rel=1e-12)


def test_a_profile_fitted_against_an_older_roofline_says_so(result, tmp_path):
    import json

    from archive.errors import InputError
    from kavier.models.timing import TIMING_REVISION

    profile = Profile(gpu="A10", llm="Llama-3-8B", engine="vLLM 0.9.0", timing_model="roofline",
                      params=result.estimator.params_)
    path = profile.write(tmp_path / "p.json")
    assert Profile.read(path).timing_revision == TIMING_REVISION and profile.stale() is None
    written = json.loads(path.read_text())
    del written["timing_revision"]                     # a file from before profiles recorded it
    path.write_text(json.dumps(written))
    old = Profile.read(path)
    assert old.timing_revision == 1 and "refit it" in old.stale()
    assert Profile(gpu="A10", llm="Llama-3-8B", engine="", timing_model="thesis",
                   params=result.estimator.params_, timing_revision=1).stale() is None
    written["timing_revision"] = "2"
    path.write_text(json.dumps(written))
    with pytest.raises(InputError, match="timing_revision"):
        Profile.read(path)
