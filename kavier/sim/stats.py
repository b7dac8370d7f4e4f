"""Streaming quantiles in bounded memory, for run summaries of any length.

A run of 97 million requests cannot keep every latency to take percentiles at the end without
gigabytes of memory; this keeps a histogram over logarithmically spaced bins instead (the idea
of DDSketch, Masson et al., VLDB 2019), so memory is fixed (about 1.3 MB per metric) and every
quantile is within ``rel_error`` of the exact order statistic.
"""

from __future__ import annotations

import math

import numpy as np

QUANTILES = (50, 90, 99)
"""Percentiles that run summaries report."""


class QuantileSketch:
    """Histogram of non-negative values over log-spaced bins.

    Quantiles follow the nearest-rank definition (numpy's ``method="inverted_cdf"``): the
    ``q``-th percentile is the smallest value ``x`` with at least ``q`` % of the values
    ``<= x``. Zeros are counted exactly; positive values between ``lo`` and ``hi`` seconds are
    reported within a relative error ``rel_error``; values outside are clipped to the range.
    NaNs are skipped.

    Parameters
    ----------
    rel_error : float
        Bound on the relative error of a reported quantile (default 1e-4).
    lo, hi : float
        Range of positive values resolved, in the values' unit.
    """

    def __init__(self, rel_error: float = 1e-4, lo: float = 1e-7, hi: float = 1e9) -> None:
        self._log_gamma = math.log1p(2.0 * rel_error)
        self._lo, self._hi = lo, hi
        self._counts = np.zeros(math.ceil(math.log(hi / lo) / self._log_gamma) + 1, np.int64)
        self._zeros = 0
        self._min, self._max = math.inf, -math.inf
        self._pending: list[tuple[np.ndarray, int]] = []
        self._pending_size = 0

    @property
    def count(self) -> int:
        """Number of values added (NaNs excluded)."""
        self._flush()
        return self._zeros + int(self._counts.sum())

    def add(self, values: np.ndarray, weight: int = 1) -> None:
        """Add an array of values, each ``weight`` times (negative values count as zeros).

        Small additions are buffered and binned together, so that many calls with a few
        values each stay cheap."""
        values = np.asarray(values, np.float64).ravel()
        values = values[~np.isnan(values)]
        if not values.size or weight < 1:
            return
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        self._pending.append((values, weight))
        self._pending_size += values.size
        if self._pending_size >= 65_536:
            self._flush()

    def add_weighted(self, values: np.ndarray, weights: np.ndarray) -> None:
        """Add ``values[i]`` ``weights[i]`` times each (integer weights >= 0; NaNs skipped)."""
        values = np.asarray(values, np.float64).ravel()
        weights = np.asarray(weights, np.int64).ravel()
        keep = ~np.isnan(values) & (weights > 0)
        values, weights = values[keep], weights[keep]
        if not values.size:
            return
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        positive = values > 0
        self._zeros += int(weights[~positive].sum())
        index = np.ceil(np.log(np.clip(values[positive], self._lo, self._hi) / self._lo)
                        / self._log_gamma).astype(np.int64)
        self._counts += np.bincount(index, weights[positive],
                                    minlength=self._counts.size).astype(np.int64)

    @property
    def bins(self) -> tuple[float, float, float, int]:
        """``(lo, hi, log γ, number of bins)``: value ``v`` in ``[lo, hi]`` falls in bin
        ``ceil(log(v / lo) / log γ)`` (for code that bins values itself, then
        :meth:`add_counts`)."""
        return self._lo, self._hi, self._log_gamma, self._counts.size

    def add_counts(self, counts: np.ndarray, zeros: int, vmin: float, vmax: float) -> None:
        """Add values binned elsewhere as :attr:`bins` says: ``counts`` per bin, ``zeros``
        values <= 0, and the smallest and largest value (ignored when nothing was added)."""
        if counts.shape != self._counts.shape:
            raise ValueError(f"{counts.size} bins, expected {self._counts.size}")
        if int(counts.sum()) + zeros == 0:
            return
        self._counts += counts
        self._zeros += zeros
        self._min, self._max = min(self._min, vmin), max(self._max, vmax)

    def _flush(self) -> None:
        for weight in {w for _, w in self._pending}:
            values = np.concatenate([v for v, w in self._pending if w == weight])
            positive = values[values > 0]
            self._zeros += (values.size - positive.size) * weight
            index = np.ceil(np.log(np.clip(positive, self._lo, self._hi) / self._lo)
                            / self._log_gamma).astype(np.int64)
            self._counts += np.bincount(index, minlength=self._counts.size) * weight
        self._pending, self._pending_size = [], 0

    def quantile(self, q: float) -> float | None:
        """The ``q``-th percentile (``0 <= q <= 100``); None when empty."""
        n = self.count                      # flushes pending values
        if n == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * n))
        if rank <= self._zeros:
            return 0.0
        b = int(np.searchsorted(np.cumsum(self._counts), rank - self._zeros))
        middle = self._lo * math.exp((b - 0.5) * self._log_gamma)
        return float(min(max(middle, self._min), self._max))

    def percentiles(self, name: str) -> dict[str, float | None]:
        """``{"p50_<name>": …, "p90_<name>": …, "p99_<name>": …}`` (:data:`QUANTILES`)."""
        return {f"p{q}_{name}": self.quantile(q) for q in QUANTILES}
