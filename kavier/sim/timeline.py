"""The GPU timeline: every replica's busy intervals with their work, MFU, MBU and KV bytes.

An interval is one engine step, or a run of pure-decode steps with the same batch (the engine
computes such runs at once; see :mod:`kavier.sim.engine`). Each carries its FLOPs and DRAM
bytes, from which

* **MFU** = FLOPs / (peak FLOP/s × duration) and **MBU** = bytes / (peak bytes/s × duration)
  (model FLOPs and bandwidth utilization, as Chowdhery et al. 2022 and vLLM's benchmarks
  define them), and
* the **utilization the power model sees** (:func:`power_utilization`)

follow. Fragments, the OpenDC export, energy and CO2 are all computed from these rows
(:mod:`kavier.export`, :mod:`kavier.sim.sustainability`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from archive.arrow import from_numpy

STEP_COLUMNS = {
    "replica": "replica (GPU) index",
    "start_s": "start of the interval, s",
    "duration_s": "length of the interval, s",
    "n_steps": "engine steps in the interval (a decode run has several)",
    "n_seqs": "sequences in the batch",
    "prefill_tokens": "prompt tokens computed",
    "decode_tokens": "decode tokens computed",
    "kv_blocks_used": "KV blocks held by running requests at the end of the interval",
    "kv_cache_bytes": "KV-cache bytes of those blocks",
    "flops": "floating-point operations",
    "dram_bytes": "DRAM bytes read or written",
    "compute_s": "time the FLOPs take at the achieved compute rate F·C_e, s",
    "memory_s": "time the bytes take at the achieved bandwidths (weights B·M_e, KV B·M_kv), s",
    "mfu": "model FLOPs utilization, FLOPs / (peak FLOP/s × duration)",
    "mbu": "model bandwidth utilization, bytes / (peak bytes/s × duration)",
    "comm_s": "collective communication in the interval (tensor-parallel all-reduces, "
              "expert-parallel all-gathers and reduce-scatters), part of duration_s; 0 on one "
              "GPU, s",
}
"""Columns of ``steps.parquet`` (one row per interval), in order."""

_DERIVED = ("kv_cache_bytes", "mfu", "mbu", "comm_s")
_GIVEN = [k for k in STEP_COLUMNS if k not in _DERIVED]
"""The columns an engine supplies; the rest are derived here."""
FLUSH_INTERVALS = 65_536


def power_utilization(compute_s, memory_s, duration_s, memory_bound_utilization: float,
                      cap: float = 1.0) -> np.ndarray:
    """Utilization in [0, cap] that the power model (thesis Table 4.1) is evaluated at.

    ``u = min(cap, max(compute_s, φ · memory_s) / duration_s)``: a compute-bound step (its
    FLOPs fill the step at the achieved rate) draws ``P(1)``; a step bound by streaming
    weights and KV draws ``P(φ)`` with ``φ = memory_bound_utilization``; time spent in
    per-step and per-sequence overheads (CPU work, kernel launches) draws neither. The thesis
    runs every request at the cap (Listing 4.3); on real GPUs the decode phase draws far less
    than the prompt phase (Patel et al., "Splitwise", ISCA 2024, Figs. 9–10: token generation
    stays well below the power of prompt computation on DGX-A100/H100), which a constant
    utilization cannot express. ``φ = 0.5`` is our default reading of those figures, to be
    calibrated where power is measured.
    """
    compute_s, memory_s, duration_s = (np.asarray(x, np.float64)
                                       for x in (compute_s, memory_s, duration_s))
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.maximum(compute_s, memory_bound_utilization * memory_s) / duration_s
    return np.clip(np.where(duration_s > 0, u, 0.0), 0.0, cap)


class Timeline:
    """Collects intervals and hands them on in record batches of :data:`STEP_COLUMNS`.

    Parameters
    ----------
    peak_flops_per_s, peak_bytes_per_s : float
        The GPU's dense FP16 peak and DRAM bandwidth (for MFU and MBU).
    kv_bytes_per_block : float
    comm : callable or None
        ``comm(n_tokens)`` of the timing (:meth:`RooflineTiming.comm_s`), linear in the
        tokens a step computes: an interval of ``k`` steps over ``T`` tokens spends ``k·c(0) +
        (c(1) − c(0))·T`` in collectives. None: 0.
    sink : callable
        Receives each :class:`pyarrow.RecordBatch`, in the order intervals were added; each
        replica's intervals arrive in time order.
    """

    def __init__(self, peak_flops_per_s: float, peak_bytes_per_s: float,
                 kv_bytes_per_block: float, sink: Callable[[pa.RecordBatch], None],
                 comm: Callable | None = None) -> None:
        self.peak_flops_per_s, self.peak_bytes_per_s = peak_flops_per_s, peak_bytes_per_s
        self.kv_bytes_per_block, self.sink = kv_bytes_per_block, sink
        c0 = float(comm(0.0)) if comm else 0.0
        self._comm = (c0, float(comm(1.0)) - c0) if comm else (0.0, 0.0)
        self._rows: list[tuple] = []

    def add(self, replica: int, start: float, duration: float, n_steps: int, n_seqs: int,
            prefill_tokens: int, decode_tokens: int, kv_blocks: int, costs) -> None:
        """One interval; ``costs`` a :class:`~kavier.models.timing.Costs` of floats."""
        self._rows.append((replica, start, duration, n_steps, n_seqs, prefill_tokens,
                           decode_tokens, kv_blocks, costs.flops, costs.bytes, costs.compute_s,
                           costs.memory_s))
        if len(self._rows) >= FLUSH_INTERVALS:
            self.flush()

    def add_arrays(self, columns: dict[str, np.ndarray]) -> None:
        """Many intervals at once (the fast path): arrays for every column of
        :data:`STEP_COLUMNS` but ``kv_cache_bytes``, ``mfu`` and ``mbu``."""
        self.flush()
        self._emit({k: np.asarray(columns[k]) for k in _GIVEN})

    def flush(self) -> None:
        """Hand on the intervals collected so far."""
        if not self._rows:
            return
        cols = list(zip(*self._rows, strict=True))
        self._rows = []
        self._emit({k: np.asarray(v) for k, v in zip(_GIVEN, cols, strict=True)})

    def _emit(self, c: dict[str, np.ndarray]) -> None:
        if not c["start_s"].size:
            return
        duration = c["duration_s"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mfu = np.where(duration > 0, c["flops"] / (self.peak_flops_per_s * duration), 0.0)
            mbu = np.where(duration > 0, c["dram_bytes"] / (self.peak_bytes_per_s * duration),
                           0.0)
        kv_blocks = c["kv_blocks_used"].astype(np.int64)
        out = {
            "replica": c["replica"].astype(np.int64), "start_s": c["start_s"].astype(np.float64),
            "duration_s": duration, "n_steps": c["n_steps"].astype(np.int64),
            "n_seqs": c["n_seqs"].astype(np.int64),
            "prefill_tokens": c["prefill_tokens"].astype(np.int64),
            "decode_tokens": c["decode_tokens"].astype(np.int64), "kv_blocks_used": kv_blocks,
            "kv_cache_bytes": np.round(kv_blocks * self.kv_bytes_per_block).astype(np.int64),
            **{k: c[k].astype(np.float64) for k in ("flops", "dram_bytes", "compute_s",
                                                     "memory_s")},
            "mfu": mfu, "mbu": mbu,
            "comm_s": (self._comm[0] * c["n_steps"] + self._comm[1]
                            * (c["prefill_tokens"] + c["decode_tokens"])).astype(np.float64)}
        self.sink(pa.RecordBatch.from_arrays([from_numpy(np.ascontiguousarray(v))
                                              for v in out.values()], names=list(out)))
