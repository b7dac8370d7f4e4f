"""The Kavier timing model as a scikit-learn regressor, fitted by minimising MAPE.

``X`` has two columns, ``n_input_tokens`` and ``n_output_tokens`` (a DataFrame with those
names or an array of shape ``(n_requests, 2)``); ``y`` is the measured end-to-end latency in
seconds. ``predict`` returns the model's end-to-end latency ``prefill_s + decode_s``. Because it
follows the estimator API (hyperparameters in ``__init__``, fitted attributes ending in ``_``),
``cross_val_score(TimingRegressor(), X, y, groups=..., cv=LeaveOneGroupOut(),
scoring="neg_mean_absolute_percentage_error")`` works on archive data.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_array, check_consistent_length, column_or_1d
from sklearn.utils.validation import check_is_fitted, check_non_negative

from kavier.models.library import GPUSpec, LLMSpec, gpu_library, llm_library
from kavier.models.timing import TimingParams, make_timing

DEFAULT_FIT_PARAMS = {
    "thesis": ("compute_efficiency", "memory_efficiency", "request_overhead_s"),
    "roofline": ("compute_efficiency", "memory_efficiency", "request_overhead_s",
                 "prefill_sharpness"),
}
"""Parameters fitted by default per timing model. ``token_overhead_s`` is left out: on
single-request sweeps it is indistinguishable from memory efficiency (both are a constant per
decode step), so fitting both is ill-posed; add it when you have data that separates them."""

FITTABLE = {
    "thesis": ("compute_efficiency", "memory_efficiency", "request_overhead_s"),
    "roofline": ("compute_efficiency", "memory_efficiency", "request_overhead_s",
                 "token_overhead_s", "prefill_floor_s", "attention_efficiency",
                 "prefill_sharpness", "compute_half_tokens"),
}
"""What single-request sweeps can fit per timing model (``kv_memory_efficiency`` and the
batch overheads need requests in flight together: a serving run)."""

_LOG_MAX = 20.0
"""Largest log-coordinate the fit explores: no timing parameter (seconds, tokens, sharpness
or an efficiency) is near ``e^20 ≈ 4.9e8``, and the simplex's wild steps past it overflowed
``exp`` into infinite parameters (a RuntimeWarning, then an infinite loss)."""
_EFFICIENCIES = ("compute_efficiency", "attention_efficiency", "memory_efficiency")
FEATURES = ("n_input_tokens", "n_output_tokens")
"""The two features, in order."""


def _features(X) -> tuple[np.ndarray, np.ndarray]:
    """``(n_in, n_out)`` from ``X``, checked with scikit-learn's validation: two columns
    (``n_input_tokens``, ``n_output_tokens`` by name in a DataFrame), finite, non-negative.

    Raises
    ------
    ValueError
        For another shape, NaN or infinite values, or negative token counts.
    """
    if hasattr(X, "columns"):
        named = [c for c in FEATURES if c in X.columns]
        if named:
            if len(named) < len(FEATURES):
                raise ValueError(f"X lacks column {set(FEATURES).difference(named).pop()!r}")
            X = X[list(FEATURES)]
        elif list(X.columns) != list(range(X.shape[1])):  # unnamed: a frame of an array
            raise ValueError(f"X must have columns {FEATURES}, got {list(X.columns)[:5]}")
    arr = check_array(X, dtype=np.float64, ensure_all_finite=True)
    check_non_negative(arr, "TimingRegressor")
    if arr.shape[1] != 2:
        raise ValueError(f"X must have 2 features {FEATURES}, got {arr.shape[1]} feature(s)")
    return arr[:, 0], arr[:, 1]


def _weights(sample_weight, n: int) -> np.ndarray | None:
    """``sample_weight`` as finite, non-negative floats of length ``n``, not all zero.

    Raises
    ------
    ValueError
    """
    if sample_weight is None:
        return None
    w = column_or_1d(np.asarray(sample_weight, dtype=np.float64))
    check_consistent_length(w, np.empty(n))
    if not np.all(np.isfinite(w) & (w >= 0)):
        raise ValueError("sample weights must be finite and non-negative")
    if not np.any(w > 0):
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return w


def weighted_mape(y_true, y_pred, sample_weight=None) -> float:
    """Mean absolute percentage error as a fraction, weighted: ``Σ w|p − y|/y / Σ w``
    (thesis eq. 2.26 with weights). This is the fit's objective, evaluated hundreds of
    thousands of times: it equals scikit-learn's ``mean_absolute_percentage_error`` for
    positive ``y_true`` (a test checks it) at 1/40 of its cost per call; every reported score
    uses scikit-learn's."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    w = np.ones_like(y_true) if sample_weight is None else np.asarray(sample_weight, float)
    return float(np.sum(w * np.abs(y_pred - y_true) / y_true) / np.sum(w))


class TimingRegressor(RegressorMixin, BaseEstimator):
    """Timing model (thesis or roofline) with MAPE-fitted hyperparameters.

    Parameters
    ----------
    llm, gpu : str or spec
        Library names (``"Llama-3-8B"``, ``"A10"``) or :class:`~kavier.models.library.LLMSpec` /
        :class:`~kavier.models.library.GPUSpec` objects.
    timing_model : {"roofline", "thesis"}
    kv_cache : bool
    compute_efficiency, memory_efficiency, request_overhead_s, token_overhead_s,
    prefill_floor_s, attention_efficiency, prefill_sharpness, compute_half_tokens :
        Starting values (and the values used for the parameters not fitted); see
        :class:`kavier.models.timing.TimingParams`.
    fit_params : tuple of str, optional
        Which parameters ``fit`` optimises; default :data:`DEFAULT_FIT_PARAMS`.

    Attributes
    ----------
    params_ : TimingParams
        Fitted parameters.
    train_mape_ : float
        Weighted MAPE (fraction) on the training data at the optimum.
    """

    def __init__(self, llm="Llama-3-8B", gpu="A10", timing_model="roofline", kv_cache=True,
                 compute_efficiency=0.30, memory_efficiency=0.60, request_overhead_s=0.025,
                 token_overhead_s=0.0, prefill_floor_s=None, attention_efficiency=None,
                 prefill_sharpness=None, compute_half_tokens=0.0, fit_params=None):
        self.llm = llm
        self.gpu = gpu
        self.timing_model = timing_model
        self.kv_cache = kv_cache
        self.compute_efficiency = compute_efficiency
        self.memory_efficiency = memory_efficiency
        self.request_overhead_s = request_overhead_s
        self.token_overhead_s = token_overhead_s
        self.prefill_floor_s = prefill_floor_s
        self.attention_efficiency = attention_efficiency
        self.prefill_sharpness = prefill_sharpness
        self.compute_half_tokens = compute_half_tokens
        self.fit_params = fit_params

    def _specs(self) -> tuple[LLMSpec, GPUSpec]:
        llm = llm_library().get(self.llm) if isinstance(self.llm, str) else self.llm
        gpu = gpu_library().get(self.gpu) if isinstance(self.gpu, str) else self.gpu
        return llm, gpu

    def initial_params(self) -> TimingParams:
        """The ``__init__`` values as :class:`TimingParams`."""
        return TimingParams(
            compute_efficiency=self.compute_efficiency, memory_efficiency=self.memory_efficiency,
            request_overhead_s=self.request_overhead_s, token_overhead_s=self.token_overhead_s,
            prefill_floor_s=self.prefill_floor_s, attention_efficiency=self.attention_efficiency,
            prefill_sharpness=self.prefill_sharpness,
            compute_half_tokens=self.compute_half_tokens)

    def timing(self, params: TimingParams | None = None):
        """The timing model with ``params`` (default: fitted, else initial)."""
        llm, gpu = self._specs()
        params = params or getattr(self, "params_", None) or self.initial_params()
        return make_timing(self.timing_model, llm, gpu, params, self.kv_cache)

    def __sklearn_tags__(self):
        """Token counts and latencies are non-negative and positive: scikit-learn's checks
        generate data accordingly."""
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.target_tags.positive_only = True
        return tags

    def predict(self, X) -> np.ndarray:
        """End-to-end latency per request, s; shape ``(n_requests,)``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before ``fit`` (the initial parameters are :meth:`timing` with no argument).
        ValueError
            For an ``X`` :func:`_features` rejects.
        """
        check_is_fitted(self, "params_")
        n_in, n_out = _features(X)
        return self.timing().e2e_s(n_in, n_out)

    def fit(self, X, y, sample_weight=None) -> TimingRegressor:
        """Fit the chosen parameters by minimising (weighted) MAPE with Nelder–Mead.

        Parameters are optimised in log space (so they stay positive); efficiencies above 1
        are rejected. The search restarts once from its own optimum to escape simplex
        collapse.
        """
        if y is None:
            raise ValueError("TimingRegressor requires y to be passed, but the target y is None")
        y = column_or_1d(check_array(y, ensure_2d=False, dtype=np.float64,   # no complex
                                     ensure_all_finite=False), warn=True)
        sample_weight = _weights(sample_weight, y.size)
        n_in, n_out = _features(X)
        check_consistent_length(n_in, y)
        if not np.all(np.isfinite(y) & (y > 0)):
            raise ValueError("y must be finite, positive latencies in seconds")
        self.n_features_in_ = 2
        names = tuple(self.fit_params or DEFAULT_FIT_PARAMS[self.timing_model])
        start = self.initial_params()
        if "prefill_floor_s" in names and start.prefill_floor_s is None:
            start = start.with_(prefill_floor_s=float(self.timing(start).floor_s()))
        if "attention_efficiency" in names and start.attention_efficiency is None:
            start = start.with_(attention_efficiency=start.compute_efficiency)
        if "prefill_sharpness" in names and start.prefill_sharpness is None:
            start = start.with_(prefill_sharpness=4.0)
        if "token_overhead_s" in names and start.token_overhead_s <= 0:
            start = start.with_(token_overhead_s=1e-4)
        if "compute_half_tokens" in names and start.compute_half_tokens <= 0:
            start = start.with_(compute_half_tokens=100.0)
        llm, gpu = self._specs()

        def params_at(x):
            return start.with_(**dict(zip(names, np.exp(x).tolist(), strict=True)))

        def objective(x):
            if np.any(x > _LOG_MAX):     # e^20: 5e8 s or tokens; beyond, exp overflows
                return 1e6
            p = params_at(x)
            if any(getattr(p, e) > 1.0 for e in _EFFICIENCIES if e in names) or (
                    "prefill_sharpness" in names and p.prefill_sharpness < 1.0):
                return 1e6
            model = make_timing(self.timing_model, llm, gpu, p, self.kv_cache)
            return weighted_mape(y, model.e2e_s(n_in, n_out), sample_weight)

        x = np.log([getattr(start, n) for n in names])
        for _ in range(2):
            result = minimize(objective, x, method="Nelder-Mead",
                              options={"maxiter": 4000, "xatol": 1e-7, "fatol": 1e-10})
            x = result.x
        self.params_ = params_at(x)
        self.train_mape_ = float(result.fun)
        self.n_iter_ = int(result.nit)
        return self
