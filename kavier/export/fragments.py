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
    "column_encoding": {c: "BYTE_STREAM_SPLIT" for c in ("time_s", "kv_cache_bytes", "co2_g")},
    "compression": "lz4",
    "write_statistics": ["replica", "time_s"],
    "write_batch_size": 65_536,
}
"""Writer options: byte-stream split for the columns that change from row to row, plain
encoding and LZ4 for the rest, statistics on the columns one filters by
(``benchmarks/bench_fragment_writer.py`` compares the choices)."""


def fragment_schema(with_co2: bool) -> pa.Schema:
    """:data:`FRAGMENT_SCHEMA`, plus ``co2_g`` with a carbon trace."""
    return pa.schema(list(FRAGMENT_SCHEMA) + ([CO2_FIELD] if with_co2 else []))


class FragmentBuilder:
    """Turns one replica's timeline, batch by batch, into fragment rows.

    Parameters
    ----------
    replica : int
    export_rate_s : float
        ``T_i`` > 0, or 0 for run-length rows.
    sustainability : Sustainability
        For the idle power and the carbon trace.
    """

    def __init__(self, replica: int, export_rate_s: float, sustainability) -> None:
        if export_rate_s < 0:
            raise ValueError(f"export rate must be >= 0 seconds, got {export_rate_s}")
        self.replica, self.rate, self.sus = replica, export_rate_s, sustainability
        self.t = 0.0                       # end of the timeline seen so far
        self.cum = np.zeros(3)             # utilization-s, J, gCO2 at ``t``
        self.emitted = 0                   # grid rows written (T_i > 0)
        self.cum_emitted = np.zeros(3)     # cumulative values at the last grid point
        self.kv_last = 0

    def add(self, start, duration, utilization, power_w, kv_bytes) -> dict | None:
        """Intervals of this replica (time-ordered, after the previous ones); returns the
        rows they complete (columns of :func:`fragment_schema`) or None."""
        return self._rows(*self._segments(start, duration, utilization, power_w, kv_bytes))

    def finish(self, end_s: float) -> dict | None:
        """Idle to ``end_s`` (the end of the run) and the last, possibly shorter, row."""
        empty = np.zeros(0)
        seg = self._segments(np.array([end_s]), np.zeros(1), np.zeros(1), np.zeros(1),
                             np.zeros(1, np.int64)) if end_s > self.t else (
            empty, empty, empty, empty, empty, np.zeros(0, np.int64))
        return self._rows(*seg, final=True)

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
        return seg_start[keep], seg_len[keep], util[keep], power[keep], kv[keep], keep

    def _co2(self, power, t0, t1):
        if self.sus.carbon is None:
            return np.zeros(np.shape(t0))
        return self.sus.co2_g(power, t0, t1)

    def _rows(self, s0, length, util, power, kv, _keep=None, final: bool = False):
        seg_cum = np.stack([util * length, power * length, self._co2(power, s0, s0 + length)])
        cum_end = self.cum[:, None] + np.cumsum(seg_cum, axis=1)
        if self.rate == 0:
            rows = None if not s0.size else self._table(s0, length, seg_cum, kv)
        else:
            rows = self._grid(s0, length, util, power, kv, cum_end, final)
        if s0.size:
            self.t = float(s0[-1] + length[-1])
            self.cum = cum_end[:, -1].copy()
            self.kv_last = int(kv[-1])
        return rows

    def _grid(self, s0, length, util, power, kv, cum_end, final):
        rate = self.rate
        t_end = float(s0[-1] + length[-1]) if s0.size else self.t
        last = int(np.floor(t_end / rate + 1e-9))
        if final and t_end > last * rate * (1 + 1e-12):
            last += 1
        if last <= self.emitted:
            return None
        grid = np.minimum(np.arange(self.emitted + 1, last + 1) * rate, t_end)
        if not s0.size:
            values = np.repeat(self.cum[:, None], grid.size, axis=1)
            kv_at = np.full(grid.size, self.kv_last, np.int64)
        else:
            j = np.clip(np.searchsorted(s0, grid, side="left") - 1, 0, s0.size - 1)
            before = np.concatenate((self.cum[:, None], cum_end[:, :-1]), axis=1)[:, j]
            into = np.clip(grid - s0[j], 0.0, length[j])
            values = before + np.stack([util[j] * into, power[j] * into,
                                        self._co2(power[j], s0[j], s0[j] + into)])
            kv_at = kv[j]
        previous = np.concatenate((self.cum_emitted[:, None], values[:, :-1]), axis=1)
        starts = np.concatenate(([self.emitted * rate], grid[:-1]))
        self.emitted, self.cum_emitted = last, values[:, -1].copy()
        return self._table(starts, grid - starts, values - previous, kv_at)

    def _table(self, time_s, duration, totals, kv) -> dict:
        with np.errstate(divide="ignore", invalid="ignore"):
            util = np.where(duration > 0, totals[0] / duration, 0.0)
            power = np.where(duration > 0, totals[1] / duration, self.sus.idle_w())
        out = {"replica": np.full(time_s.size, self.replica, np.int64), "time_s": time_s,
               "duration_s": duration, "gpu_utilization": util,
               "kv_cache_bytes": np.asarray(kv, np.int64), "power_w": power,
               "energy_wh": totals[1] / 3600.0}
        if self.sus.carbon is not None:
            out["co2_g"] = totals[2]
        return out


def to_batch(rows: dict, schema: pa.Schema) -> pa.RecordBatch:
    """Fragment rows (a dict of arrays) as a record batch of ``schema``."""
    return pa.RecordBatch.from_arrays([from_numpy(np.ascontiguousarray(rows[f.name]))
                                       for f in schema], schema=schema)
