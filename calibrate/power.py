"""Fit the power models of thesis Table 4.1 to real ``nvidia-smi`` samples.

Each model's ``P_idle``, ``P_max`` and shape parameter (``r`` of MSE, ``α`` of the asymptotic
models) are fitted to the samples' ``(utilization.gpu, power.draw)`` pairs by minimizing the
mean absolute percentage error (MAPE) with Nelder-Mead, and scored on held-out data:
``folds`` contiguous blocks of the capture in turn (neighbouring samples 100 ms apart are
nearly identical, so shuffled folds would leak). Models are ranked by held-out MAPE.

Utilization is often a poor predictor of GPU power: ``utilization.gpu`` is the share of time
*any* kernel runs, so a memory-bound decode at "100 %" draws far less than a compute-bound
prefill at "100 %". The fit reports the power spread among samples at >= 95 % utilization and
warns when it is wide; it also fits the best model with the SM clock as a second input,
``P = P_idle + (P_max − P_idle) · shape(u) · (f / f_max)^γ``, and reports what that buys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.metrics import mean_absolute_percentage_error

from archive.errors import InputError
from kavier.models.power import DEFAULT_SHAPE, POWER_MODELS, SHAPES, PowerModel

WIDE_SPREAD = 0.25
"""Warn when the 1–99 % power range at full utilization exceeds this share of its median."""
SHAPE_MARGIN_PCT = 0.05
"""Points of held-out MAPE a model with a shape parameter (MSE, asymptotic) must gain over the
shapeless ones to rank above them: a parameter that buys nothing measurable is not kept (on
samples that are either idle or busy every model fits alike, and the ranking would otherwise
turn on noise in the last digits)."""


def mape_pct(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Mean absolute percentage error, % (the fit's objective; equal to scikit-learn's for
    positive observations, which :func:`score_pct` reports)."""
    return float(np.mean(np.abs(predicted - observed) / observed) * 100.0)


def score_pct(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Reported MAPE, %: scikit-learn's ``mean_absolute_percentage_error``."""
    return 100.0 * float(mean_absolute_percentage_error(observed, predicted))


def _unpack(name: str, x: np.ndarray, clock: bool):
    idle = abs(x[0])
    top = idle + abs(x[1])
    shape = float(np.exp(x[2])) if name in DEFAULT_SHAPE else None
    gamma = x[-1] if clock else 0.0
    return idle, top, shape, gamma


def _predict(name, x, u, f_ratio, clock):
    idle, top, shape, gamma = _unpack(name, x, clock)
    if name == "constant":
        return np.full(u.shape, top) * (f_ratio**gamma if clock else 1.0)
    scale = f_ratio**gamma if clock else 1.0
    return idle + (top - idle) * SHAPES[name](u, shape) * scale


def _fit(name, u, power, f_ratio, clock=False):
    idle0 = float(np.percentile(power, 5))
    x0 = [idle0, max(float(np.percentile(power, 95)) - idle0, 1.0)]
    if name in DEFAULT_SHAPE:
        x0.append(np.log(DEFAULT_SHAPE[name]))
    else:
        x0.append(0.0)
    if clock:
        x0.append(1.0)
    best = None
    for start in (np.array(x0), np.array(x0) * np.r_[1.2, 0.8, 1.0, np.ones(len(x0) - 3)]):
        res = minimize(lambda x: mape_pct(_predict(name, x, u, f_ratio, clock), power), start,
                       method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6,
                                                      "maxiter": 4000})
        best = res if best is None or res.fun < best.fun else best
    return best.x


@dataclass(frozen=True)
class PowerCalibration:
    """Result of :func:`calibrate_power`.

    Attributes
    ----------
    ranking : DataFrame
        One row per model: ``model``, ``idle_w``, ``max_w``, ``shape``, ``mape_fit_pct``,
        ``mape_heldout_pct``, sorted by held-out MAPE.
    best : PowerModel
        The winner, refitted on all samples.
    full_utilization : dict
        Samples at >= 95 % utilization: count and 1 / 50 / 99 % power, W.
    clock : dict or None
        The winner with SM clock as a second input: ``gamma``, fit and held-out MAPE.
    warnings : list of str
    """

    ranking: pd.DataFrame
    best: PowerModel
    full_utilization: dict
    clock: dict | None
    warnings: list


def _folds(n: int, k: int):
    edges = np.linspace(0, n, k + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        test = np.zeros(n, bool)
        test[lo:hi] = True
        yield ~test, test


def _heldout(name, u, power, f_ratio, folds, clock=False) -> float:
    """MAPE (%) of every sample predicted by the fit of the other folds."""
    predicted = np.empty_like(power)
    for train, test in _folds(u.size, folds):
        x = _fit(name, u[train], power[train], f_ratio[train], clock)
        predicted[test] = _predict(name, x, u[test], f_ratio[test], clock)
    return score_pct(predicted, power)


def calibrate_power(samples: pd.DataFrame, folds: int = 5,
                    models: tuple[str, ...] = POWER_MODELS) -> PowerCalibration:
    """Fit and rank power models on GPU samples.

    Parameters
    ----------
    samples : DataFrame
        ``utilization_gpu_pct`` (0–100) and ``power_w`` (W), optionally ``clock_sm_mhz``, as
        from :func:`archive.smi.read_capture`.
    folds : int
        Contiguous cross-validation blocks.

    Raises
    ------
    InputError
        Missing columns, fewer than ``10 × folds`` samples, or non-positive power.
    """
    for column in ("utilization_gpu_pct", "power_w"):
        if column not in samples.columns:
            raise InputError(f"samples lack column {column!r} (query utilization.gpu and "
                             "power.draw)", field=column)
    if len(samples) < 10 * folds:
        raise InputError(f"need at least {10 * folds} samples, got {len(samples)}")
    u = np.clip(samples["utilization_gpu_pct"].to_numpy(np.float64) / 100.0, 0.0, 1.0)
    power = samples["power_w"].to_numpy(np.float64)
    if (power <= 0).any():
        raise InputError("power.draw must be > 0 W in every sample", field="power.draw")
    has_clock = ("clock_sm_mhz" in samples.columns            # queried, and read every time
                 and bool(samples["clock_sm_mhz"].notna().all())
                 and float(samples["clock_sm_mhz"].max()) > 0)
    f_ratio = (samples["clock_sm_mhz"].to_numpy(np.float64) / samples["clock_sm_mhz"].max()
               if has_clock else np.ones_like(u))
    rows = []
    for name in models:
        x = _fit(name, u, power, f_ratio)
        idle, top, shape, _ = _unpack(name, x, False)
        rows.append({"model": name, "idle_w": idle, "max_w": top, "shape": shape,
                     "mape_fit_pct": score_pct(_predict(name, x, u, f_ratio, False), power),
                     "mape_heldout_pct": _heldout(name, u, power, f_ratio, folds)})
    ranking = pd.DataFrame(rows)
    key = ranking["mape_heldout_pct"] + np.where(ranking["shape"].notna(), SHAPE_MARGIN_PCT, 0.0)
    ranking = ranking.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)
    top_row = ranking.iloc[0]
    best = PowerModel(top_row["model"], float(top_row["idle_w"]), float(top_row["max_w"]),
                      None if pd.isna(top_row["shape"]) else float(top_row["shape"]))
    full = power[u >= 0.95]
    spread = {"samples": int(full.size)}
    if full.size:
        spread.update({f"p{q}_w": float(np.percentile(full, q)) for q in (1, 50, 99)})
    warnings = []
    if full.size and (spread["p99_w"] - spread["p1_w"]) > WIDE_SPREAD * spread["p50_w"]:
        warnings.append(f"utilization is a poor predictor here: at >= 95 % utilization power "
                        f"spans {spread['p1_w']:.0f}–{spread['p99_w']:.0f} W (1–99 %), "
                        f"median {spread['p50_w']:.0f} W")
    if top_row["mape_heldout_pct"] > 15:
        warnings.append(f"the best model misses by {top_row['mape_heldout_pct']:.1f} % "
                        "(held out)")
    clock = None
    if has_clock:
        x = _fit(best.name, u, power, f_ratio, clock=True)
        clock = {"model": best.name, "gamma": float(x[-1]),
                 "clock_max_mhz": float(samples["clock_sm_mhz"].max()),
                 "mape_fit_pct": score_pct(_predict(best.name, x, u, f_ratio, True), power),
                 "mape_heldout_pct": _heldout(best.name, u, power, f_ratio, folds, True)}
    return PowerCalibration(ranking, best, spread, clock, warnings)
