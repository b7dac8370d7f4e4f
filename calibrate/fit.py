"""Fit a timing profile to archive measurements and score it, in-sample and held out.

How measured latency is split into prefill and decode (the honest way)
----------------------------------------------------------------------
* A request with one output token ends with the prefill pass itself (the first token comes
  out of prefill), so a prefill-sweep request's end-to-end latency is
  ``request overhead + prefill(n_in)``.
* A decode-sweep request's latency is ``request overhead + prefill(short prompt) + one decode
  step per generated token after the first``, counted with the tokens actually generated
  (``n_output_tokens``), never the number requested.

Both are exactly what :meth:`TimingRegressor.predict` computes for ``(n_in, n_out)``. As in
the thesis, the repetitions of each size are summarized by their median before fitting (the
median latency at the median request): robust to the decode sweep's early stops and to
outliers. The objective weights the two sweeps equally, so neither stage dominates.

Scores
------
* per-request MAPE per stage, and
* per-size-median MAPE per stage: the median measured latency of each (sweep, size) against
  the median predicted latency of the same requests,

each on the fit (all data) and held out: leave-one-size-out cross-validation
over nominal sizes; a held-out size, in either sweep, never takes part in the fit that
predicts it).

The thesis's own scoring (:func:`thesis_scoring`) is kept for comparison with Tables 6.5/6.6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.metrics import mean_absolute_percentage_error

from archive.errors import InputError, first_bad, shown
from calibrate.estimator import TimingRegressor

STAGES = ("prefill", "decode")
REQUIRED = ("sweep", "n_input_tokens", "n_output_tokens", "n_output_tokens_requested",
            "latency_s")


def check_measurements(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Validate a measurements table for calibration and keep its usable rows.

    Rows that failed (``error`` set, when the column exists) and rows measured with other
    requests in flight (``concurrency`` > 1) are left out. Raises
    :class:`InputError` naming ``source``, the row (1-based; the file's line for a CSV table,
    ``df.attrs["first_line"]`` being the line of its first row) and the field for missing
    columns, unknown sweeps, non-positive latencies or bad token counts, and when a stage has
    no rows.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing} for calibration", path=source)
    first_line = df.attrs.get("first_line", 1)
    df = df.reset_index(drop=True)
    line = np.arange(len(df)) + first_line            # of each row, before any is left out
    keep = np.ones(len(df), bool)
    if "error" in df.columns:
        keep &= (df["error"].isna() | (df["error"] == "")).to_numpy()
    if "concurrency" in df.columns:          # the timing model is of one request at a time
        keep &= (df["concurrency"].isna() | (df["concurrency"] == 1)).to_numpy()
    df, line = df[keep].reset_index(drop=True), line[keep]
    checks = [
        ("sweep", ~df["sweep"].isin(STAGES), f"must be one of {STAGES}"),
        ("latency_s", ~(pd.to_numeric(df["latency_s"], errors="coerce") > 0),
         "must be a positive number of seconds"),
        ("n_input_tokens", ~(pd.to_numeric(df["n_input_tokens"], errors="coerce") >= 0),
         "must be a non-negative integer"),
        ("n_output_tokens", ~(pd.to_numeric(df["n_output_tokens"], errors="coerce") >= 1),
         "must be an integer >= 1"),
    ]
    for column, bad, what in checks:
        if bad.any():
            i = first_bad(bad)
            raise InputError(f"{what}, got {shown(df[column].iloc[i])}", path=source,
                             row=int(line[i]), field=column)
    if df.empty:
        raise InputError("no successful single-request rows to calibrate with", path=source)
    return df


def present_stages(df: pd.DataFrame) -> tuple[str, ...]:
    """The sweeps (of :data:`STAGES`) that ``df`` has rows of, in order."""
    return tuple(st for st in STAGES if (df["sweep"] == st).any())


def nominal_size(df: pd.DataFrame) -> np.ndarray:
    """The sweep size of each row: prompt tokens (prefill sweep) or requested output tokens
    (decode sweep). Used as the cross-validation group."""
    return np.where(df["sweep"] == "prefill", df["n_input_tokens"],
                    df["n_output_tokens_requested"]).astype(np.int64)


def stage_weights(df: pd.DataFrame) -> np.ndarray:
    """``1 / rows of the row's sweep``: each stage weighs the same in the objective."""
    counts = df["sweep"].map(df["sweep"].value_counts())
    return (1.0 / counts).to_numpy(np.float64)


def _mape_pct(measured, predicted) -> float:
    return 100.0 * float(mean_absolute_percentage_error(measured, predicted))


def size_medians(df: pd.DataFrame) -> pd.DataFrame:
    """Per (sweep, size): median latency and the median request ``(n_in, n_out)``, the way
    Tables 6.5/6.6 summarize a sweep. With both sweeps only the sizes they share are kept
    (64…16384 on the A10 data: the nine rows of each table); with one, all its sizes."""
    frame = df.assign(size=nominal_size(df))
    med = (frame.groupby(["sweep", "size"])
           .agg(median_latency_s=("latency_s", "median"),
                median_n_input_tokens=("n_input_tokens", "median"),
                median_n_output_tokens=("n_output_tokens", "median"))
           .reset_index())
    if len(present_stages(df)) < 2:
        return med
    common = set(med.loc[med["sweep"] == "prefill", "size"]) & set(
        med.loc[med["sweep"] == "decode", "size"])
    return med[med["size"].isin(common)].reset_index(drop=True)


def _median_points(med: pd.DataFrame) -> pd.DataFrame:
    return med[["median_n_input_tokens", "median_n_output_tokens"]].set_axis(
        ["n_input_tokens", "n_output_tokens"], axis=1).astype(np.float64)


def stage_scores(df: pd.DataFrame, predicted: np.ndarray, med: pd.DataFrame,
                 med_predicted: np.ndarray) -> dict:
    """Per-stage MAPE in percent: ``{stage: {"per_request": .., "per_size_median": ..}}``.

    ``predicted`` is per row of ``df``; ``med_predicted`` per row of ``med``
    (:func:`size_medians`), the prediction at each size's median request.
    """
    scores = {}
    for stage in present_stages(df):
        rows, at = (df["sweep"] == stage).to_numpy(), (med["sweep"] == stage).to_numpy()
        scores[stage] = {
            "per_request": _mape_pct(df["latency_s"].to_numpy(float)[rows], predicted[rows]),
            "per_size_median": _mape_pct(med["median_latency_s"].to_numpy(float)[at],
                                         med_predicted[at]),
        }
    return scores


def thesis_scoring(med: pd.DataFrame, timing) -> dict:
    """MAPE in percent per stage, scored the thesis's way (section 6.4, Figure 6.2).

    The prefill sweep is simulated as ``n_in = size`` with no decode, the decode sweep as
    ``n_out = median generated tokens`` with no prompt, each against the per-size median
    latency. ``med`` has the layout of :func:`size_medians`; pass the published medians
    (:func:`archive.importers.a10_surf.table_medians`) to score against Tables 6.5/6.6. With
    the thesis model and its defaults that gives 7.64 % and 4.11 % (the thesis reports 7.39 %
    and 4.00 % with m_p = 8.0e9 instead of Llama-3-8B's 8.03e9 parameters).
    """
    out = {}
    for stage in present_stages(med):
        m = med[med["sweep"] == stage]
        if stage == "prefill":
            pred = timing.e2e_s(m["size"].to_numpy(float), 0.0)
        else:
            pred = timing.e2e_s(0.0, m["median_n_output_tokens"].to_numpy(float))
        out[stage] = _mape_pct(m["median_latency_s"], pred)
    return out


@dataclass
class CalibrationResult:
    """Everything a calibration run produced.

    Attributes
    ----------
    estimator : TimingRegressor
        Fitted on all rows.
    points : DataFrame
        Per request: sweep, size, tokens, measured latency, in-sample, held-out and
        thesis-default predictions (seconds).
    medians : DataFrame
        Per (sweep, size): :func:`size_medians` plus the same three predictions at the
        median request.
    scores : dict
        ``{"fit": stage_scores, "heldout": stage_scores, "thesis_defaults": stage_scores,
        "thesis_defaults_thesis_scoring": {stage: mape}}``, all in percent.
    """

    estimator: TimingRegressor
    points: pd.DataFrame
    medians: pd.DataFrame
    scores: dict


def calibrate(df: pd.DataFrame, estimator: TimingRegressor, source: str = "measurements",
              reference_medians: pd.DataFrame | None = None) -> CalibrationResult:
    """Fit ``estimator`` to a measurements table and score it (see module docstring).

    The fit uses the per-size median requests (:func:`size_medians`), one point per
    (sweep, size), each sweep weighing the same. Held-out predictions come from
    leave-one-size-out cross-validation: for each size, a clone of ``estimator`` is fitted on
    the other sizes' medians only and predicts that size's median request and every one of its
    requests. ``reference_medians`` (published per-size medians) are what the thesis-way
    score of the thesis defaults uses; by default the data's own. Requests of sizes that only
    one sweep has (the decode sweep's 16 and 32 on the
    A10 data) never take part in any fit; their held-out prediction is the full fit's. With
    a single size there is nothing to hold out: the held-out predictions are NaN and the
    held-out scores None (reported as not available, never as a number).
    """
    df = check_measurements(df, source)
    X = df[["n_input_tokens", "n_output_tokens"]].astype(np.float64)
    y = df["latency_s"].to_numpy(np.float64)
    groups = nominal_size(df)
    med = size_medians(df)
    if med["sweep"].nunique() < len(present_stages(df)):
        raise InputError("the prefill and decode sweeps share no size; with both sweeps "
                         "calibration fits per-size medians of the sizes they share",
                         path=source)
    cross_validated = med["size"].nunique() >= 2   # leave-one-size-out needs two sizes
    med_X, med_y = _median_points(med), med["median_latency_s"].to_numpy(np.float64)
    med_w = stage_weights(med)
    fitted = clone(estimator).fit(med_X, med_y, sample_weight=med_w)
    heldout = fitted.predict(X) if cross_validated else np.full(len(y), np.nan)
    med_heldout = np.full(len(med_y), np.nan)
    for size in med["size"].unique() if cross_validated else ():
        train = (med["size"] != size).to_numpy()
        fold = clone(estimator).fit(med_X[train], med_y[train], sample_weight=med_w[train])
        med_heldout[~train] = fold.predict(med_X[~train])
        rows = groups == size
        heldout[rows] = fold.predict(X[rows])
    defaults = TimingRegressor(llm=estimator.llm, gpu=estimator.gpu, timing_model="thesis",
                               kv_cache=estimator.kv_cache)
    def thesis(points: pd.DataFrame) -> np.ndarray:      # the thesis defaults, unfitted
        return defaults.timing().e2e_s(points["n_input_tokens"].to_numpy(np.float64),
                                       points["n_output_tokens"].to_numpy(np.float64))

    thesis_pred = thesis(X)
    points = pd.DataFrame({
        "sweep": df["sweep"].to_numpy(), "size": groups,
        "n_input_tokens": df["n_input_tokens"].to_numpy(), "n_output_tokens":
        df["n_output_tokens"].to_numpy(), "measured_s": y, "predicted_fit_s": fitted.predict(X),
        "predicted_heldout_s": heldout, "predicted_thesis_defaults_s": thesis_pred,
    })
    medians = med.assign(predicted_fit_s=fitted.predict(med_X), predicted_heldout_s=med_heldout,
                         predicted_thesis_defaults_s=thesis(med_X))
    scores = {
        "fit": stage_scores(df, points["predicted_fit_s"].to_numpy(), med,
                            medians["predicted_fit_s"].to_numpy()),
        "heldout": (stage_scores(df, heldout, med, med_heldout) if cross_validated else
                    {st: {"per_request": None, "per_size_median": None}
                     for st in present_stages(df)}),
        "thesis_defaults": stage_scores(df, thesis_pred, med,
                                        medians["predicted_thesis_defaults_s"].to_numpy()),
        "thesis_defaults_thesis_scoring": thesis_scoring(
            med if reference_medians is None else reference_medians, defaults.timing()),
    }
    return CalibrationResult(fitted, points, medians, scores)
