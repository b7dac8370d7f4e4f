"""Fragments: each GPU's utilization, power and KV-cache bytes over time, from the timeline.

Two forms, chosen by the export rate ``T_i`` (thesis 4.3.3):

* ``T_i > 0``: one row per replica every ``T_i`` seconds from time 0 to the end of the run (the
  last row shortened), idle time included;
* ``T_i = 0``: run-length rows, one per timeline interval and per idle gap, the form OpenDC
  consumes natively.

A row carries the *time average* over its interval of the utilization the power model sees
(:func:`kavier.sim.timeline.power_utilization`), its mean power and its energy — exact
integrals of the piecewise-constant power, so the rows' energy adds up to the summary's at every
export rate — its CO2 (exact, also across carbon-trace steps), and the KV-cache bytes held at the
row's end. Where the thesis samples the utilization of each *request* (Listing 4.3's 50 %
warm-up and cool-down), the rows here describe the *GPU*, which is what OpenDC simulates and
what a batched run has.

Rows are produced as each replica's intervals arrive (:class:`FragmentBuilder`), so memory does
not grow with the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from archive.arrow import from_numpy

FRAGMENT_SCHEMA = pa.schema([
    pa.field("replica", pa.int64(), nullable=False),
    pa.field("time_s", pa.float64(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("gpu_utilization", pa.float64(), nullable=False),
    pa.field("kv_cache_bytes", pa.int64(), nullable=False),
    pa.field("power_w", pa.float64(), nullable=False),
    pa.field("energy_wh", pa.float64(), nullable=False),
])
"""``fragments.parquet``: ``time_s`` is the start of the row in simulated seconds,
``gpu_utilization`` the row's mean utilization (a fraction in [0, 1]), ``power_w`` its mean GPU
power, ``energy_wh`` its GPU (IT) energy."""
CO2_FIELD = pa.field("co2_g", pa.float64(), nullable=False)

FRAGMENT_PARQUET_OPTIONS = {
    "use_dictionary": False,
    "column_encoding": {"time_s": "BYTE_STREAM_SPLIT", "co2_g": "BYTE_STREAM_SPLIT",
                        "kv_cache_bytes": "DELTA_BINARY_PACKED"},
    "compression": "lz4",
    "write_statistics": ["replica", "time_s"],
    "write_batch_size": 65_536,
}
"""Writer options: byte-stream split for the DOUBLE columns that change from row to row (on
an INT64 column it needs parquet-mr 1.14, newer than OpenDC's and Spark 3.5's 1.13 reader, so
``kv_cache_bytes`` is delta-encoded instead), plain encoding and LZ4 for the rest, statistics
on the columns one filters by, 65,536-value write batches (chosen by an earlier writer
benchmark on the 18.3 M-row Marconi-shaped export: 0.30 s and 18.7 MB against 1.24 s and
126.6 MB with pyarrow's defaults; that benchmark had byte-stream split on ``kv_cache_bytes``
too)."""


def fragment_schema(with_co2: bool) -> pa.Schema:
    """:data:`FRAGMENT_SCHEMA`, plus ``co2_g`` with a carbon trace."""
    return pa.schema(list(FRAGMENT_SCHEMA) + ([CO2_FIELD] if with_co2 else []))


MAX_ROWS = 524_288
"""Fragment rows produced at once at most (bounds memory whatever the run's length)."""


class FragmentBuilder:
    """Turns one replica's timeline, batch by batch, into fragment rows.

    Parameters
    ----------
    replica : int
    export_rate_s : float
        ``T_i`` > 0, or 0 for run-length rows.
    sustainability : Sustainability
        For the idle power and the carbon trace.
    co2 : bool
        Whether rows carry ``co2_g`` when there is a carbon trace (the OpenDC export, which
        has no CO2 column, does without it).
    """

    def __init__(self, replica: int, export_rate_s: float, sustainability,
                 co2: bool = True) -> None:
        if export_rate_s < 0:
            raise ValueError(f"export rate must be >= 0 seconds, got {export_rate_s}")
        self.replica, self.rate, self.sus = replica, export_rate_s, sustainability
        self.carbon = sustainability.carbon is not None and co2
        self.t = 0.0                       # end of the timeline seen so far
        self.cum = np.zeros(3)             # utilization-s, J, gCO2 at ``t``
        self.emitted = 0                   # grid rows written (T_i > 0)
        self.cum_emitted = np.zeros(3)     # cumulative values at the last grid point
        self.kv_last = 0

    def add(self, start, duration, utilization, power_w, kv_bytes) -> Iterator[dict]:
        """Intervals of this replica (time-ordered, after the previous ones); yields the
        rows they complete, in pieces of at most :data:`MAX_ROWS` (columns of
        :func:`fragment_schema`). Consume it before the next call."""
        return self._rows(*self._segments(start, duration, utilization, power_w, kv_bytes))

    def finish(self, end_s: float) -> Iterator[dict]:
        """Idle to ``end_s`` (the end of the run) and the last, possibly shorter, row."""
        one = np.ones(1)
        if end_s > self.t:
            segments = self._segments(np.array([end_s]), 0 * one, 0 * one, 0 * one,
                                      np.zeros(1, np.int64))
        else:
            segments = self._segments(*(np.zeros(0),) * 4, np.zeros(0, np.int64))
        return self._rows(*segments, final=True)

    def _segments(self, start, duration, utilization, power_w, kv_bytes):
        """Idle gaps and intervals as contiguous segments from ``self.t``."""
        n = start.size
        seg_start = np.empty(2 * n)
        seg_start[0::2] = np.concatenate(([self.t], start[:-1] + duration[:-1]))
        seg_start[1::2] = start
        seg_len = np.empty(2 * n)
        seg_len[0::2] = start - seg_start[0::2]
        seg_len[1::2] = duration
        util = np.zeros(2 * n)
        util[1::2] = utilization
        power = np.full(2 * n, self.sus.idle_w())
        power[1::2] = power_w
        kv = np.zeros(2 * n, np.int64)
        kv[1::2] = kv_bytes
        keep = seg_len > 0
        return seg_start[keep], seg_len[keep], util[keep], power[keep], kv[keep]

    def _co2(self, power, t0, t1):
        if not self.carbon:
            return np.zeros(np.shape(t0))
        return self.sus.co2_g(power, t0, t1)

    def _rows(self, s0, length, util, power, kv, final: bool = False) -> Iterator[dict]:
        totals = [util * length, power * length, self._co2(power, s0, s0 + length)]
        if self.rate == 0:
            rows = (self._table(s0[w], length[w], [x[w] for x in totals], kv[w])
                    for w in _windows(s0.size))
        else:
            rows = self._grid(s0, length, util, power, kv, totals, final)
        yield from rows
        if s0.size:
            self.t = float(s0[-1] + length[-1])
            self.cum = self.cum + np.array([float(x.sum()) for x in totals])
            self.kv_last = int(kv[-1])

    def _grid(self, s0, length, util, power, kv, totals, final) -> Iterator[dict]:
        """Rows of the regular grid that end within the segments (all of them at the end)."""
        rate = self.rate
        t_end = float(s0[-1] + length[-1]) if s0.size else self.t
        last = int(np.floor(t_end / rate + 1e-9))
        if final and t_end > last * rate * (1 + 1e-12):
            last += 1
        # cumulative utilization-s, J and g at each segment's start
        at_start = [c + np.concatenate(([0.0], np.cumsum(x)[:-1])) for c, x in
                    zip(self.cum, totals, strict=True)]
        rates = [util, power]
        carbon = self.carbon

        def cumulative(q: int, i: np.ndarray, g: np.ndarray) -> np.ndarray:
            """Quantity ``q`` accumulated up to time ``g`` inside segments ``i``."""
            if q == 2:
                return at_start[2][i] + self._co2(power[i], s0[i], g)
            return at_start[q][i] + rates[q][i] * (g - s0[i])

        for w in _windows(last - self.emitted):
            k = np.arange(self.emitted + w.start + 1, self.emitted + w.stop + 1)
            grid = np.minimum(k * rate, t_end)
            starts = np.concatenate(([(k[0] - 1) * rate], grid[:-1]))
            duration = grid - starts
            if not s0.size:          # the rest of a row the previous intervals began
                values = [np.full(grid.size, c) for c in self.cum]
                deltas = [_deltas(v, e) for v, e in zip(values, self.cum_emitted, strict=True)]
                self.cum_emitted = self.cum.copy()
                yield self._table(starts, duration, deltas,
                                  np.full(grid.size, self.kv_last, np.int64))
                continue
            # segment of each grid point: grid points are sorted, so count them per segment
            # (a search per segment of this window, not per point)
            lo, hi = np.searchsorted(s0, [grid[0], grid[-1]], side="right")
            lo, hi = max(int(lo) - 1, 0), max(int(hi), 1)
            first = np.searchsorted(grid, s0[lo:hi], side="right")
            j = lo + np.repeat(np.arange(hi - lo), np.diff(np.append(first, grid.size)))
            j = np.concatenate((np.full(int(first[0]), lo, np.int64), j))
            # a row inside one segment has its rates; a row across a boundary (or the first,
            # which may start in the previous batch) gets the exact difference
            mean = [util[j], power[j]]
            cross = np.flatnonzero(np.concatenate(([True], j[1:] != j[:-1])))
            ends = [cumulative(q, j[cross], grid[cross]) for q in range(2 + carbon)]
            before = [cumulative(q, j[cross - 1], starts[cross]) for q in range(2 + carbon)]
            for q in range(2 + carbon):
                before[q][0] = self.cum_emitted[q] if cross[0] == 0 else before[q][0]
            for q in range(2):
                mean[q][cross] = (ends[q] - before[q]) / duration[cross]
            co2 = None
            if carbon:
                at_grid = cumulative(2, j, grid)
                co2 = _deltas(at_grid, self.cum_emitted[2])
            self.cum_emitted = np.array([float(cumulative(q, j[-1:], grid[-1:])[0])
                                         for q in range(2 + carbon)] + [0.0] * (1 - carbon))
            yield self._table(starts, duration, [mean[0] * duration, mean[1] * duration, co2],
                              kv[j], mean)
        self.emitted = max(self.emitted, last)

    def _table(self, time_s, duration, totals, kv, mean=None) -> dict:
        """Rows from their totals (utilization-s, J, g), or with ``mean`` utilization and
        power already known."""
        if mean is not None:
            util, power = mean
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                util = totals[0] / duration
                power = totals[1] / duration
        out = {"replica": np.full(time_s.size, self.replica, np.int64), "time_s": time_s,
               "duration_s": duration, "gpu_utilization": util,
               "kv_cache_bytes": np.asarray(kv, np.int64), "power_w": power,
               "energy_wh": totals[1] / 3600.0}
        if self.carbon:
            out["co2_g"] = totals[2]
        return out


def _deltas(values: np.ndarray, before: float) -> np.ndarray:
    """Differences of consecutive cumulative values, the first against ``before``."""
    out = np.empty_like(values)
    out[0] = values[0] - before
    np.subtract(values[1:], values[:-1], out=out[1:])
    return out


def _windows(n: int) -> list[slice]:
    return [slice(i, min(i + MAX_ROWS, n)) for i in range(0, max(n, 0), MAX_ROWS)]


def to_batch(rows: dict, schema: pa.Schema) -> pa.RecordBatch:
    """Fragment rows (a dict of arrays) as a record batch of ``schema``."""
    return pa.RecordBatch.from_arrays([from_numpy(np.ascontiguousarray(rows[f.name]))
                                       for f in schema], schema=schema)
