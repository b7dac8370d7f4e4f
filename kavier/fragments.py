"""Discrete-event export: GPU utilization and KV-cache usage over each request's lifetime.

Two forms, chosen by the export rate ``T_i`` (thesis 4.3.3):

* ``T_i > 0``: snapshots every ``T_i`` seconds, ``N = ceil((T_p + T_d) / T_i)`` rows per
  request, the last one shortened so that durations add up to the request's service time.
* ``T_i = 0``: run-length fragments, one row per constant-utilization phase (warm-up,
  inference, cool-down), the form OpenDC consumes natively.

GPU utilization follows Listing 4.3: 50 % during the first ``warm_s`` (0.1 s) and the last
``cool_s`` (0.1 s) of a request, the utilization cap in between. KV-cache bytes are given at the
end of each row's interval (the most the interval needs): the prompt's KV is written during
prefill, then one token's KV per decode step (eq. 4.1 per token, GQA-aware); zero with the KV
cache off. Rows are produced in chunks of ``flush_size`` requests so memory stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

FRAGMENT_SCHEMA = pa.schema([
    pa.field("request_id", pa.int64()),
    pa.field("time_s", pa.float64()),
    pa.field("duration_s", pa.float64()),
    pa.field("gpu_utilization", pa.float64()),
    pa.field("kv_cache_bytes", pa.float64()),
])
"""``fragments.parquet``: ``time_s`` is the start of the interval in simulated seconds,
``gpu_utilization`` a fraction in [0, 1]."""

WARM_UTILIZATION = 0.5
"""Utilization during warm-up and cool-down (Listing 4.3)."""


def _utilization(offset, total, cap, warm_s, cool_s):
    """Listing 4.3 at ``offset`` seconds into a request of ``total`` seconds."""
    inference = (offset >= warm_s) & (offset < total - cool_s)
    return np.where(inference, cap, WARM_UTILIZATION)


def _kv_bytes(at, prefill, decode, n_in, n_out, kv_per_token):
    """KV-cache bytes ``at`` seconds into a request."""
    with np.errstate(divide="ignore", invalid="ignore"):
        during_prefill = n_in * np.clip(np.where(prefill > 0, at / prefill, 1.0), 0.0, 1.0)
        generated = n_out * np.clip(np.where(decode > 0, (at - prefill) / decode, 1.0), 0.0, 1.0)
    return kv_per_token * np.where(at <= prefill, during_prefill, n_in + generated)


def _snapshot_rows(start, total, export_rate_s):
    counts = np.maximum(np.ceil(total / export_rate_s).astype(np.int64), 1)
    owner = np.repeat(np.arange(len(total)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    offset = (np.arange(owner.size) - first) * export_rate_s
    duration = np.minimum(export_rate_s, total[owner] - offset)
    return owner, offset, duration


def _phase_rows(total, warm_s, cool_s):
    bounds = np.stack([np.zeros_like(total), np.minimum(warm_s, total),
                       np.maximum(np.minimum(warm_s, total), total - cool_s), total], axis=1)
    lengths = np.diff(bounds, axis=1)
    keep = lengths > 0
    owner = np.nonzero(keep)[0]
    offset = bounds[:, :3][keep]
    return owner, offset, lengths[keep]


def fragment_batches(requests, export_rate_s: float, kv_bytes_per_token: float,
                     utilization_cap: float = 1.0, flush_size: int = 10_000,
                     warm_s: float = 0.1, cool_s: float = 0.1) -> Iterator[pa.RecordBatch]:
    """Yield fragment rows as record batches of :data:`FRAGMENT_SCHEMA`.

    Parameters
    ----------
    requests : DataFrame
        Output of :func:`kavier.engine.simulate`.
    export_rate_s : float
        Snapshot interval ``T_i`` in seconds; 0 for run-length fragments.
    kv_bytes_per_token : float
        KV-cache bytes per token (0 with the KV cache off).
    utilization_cap : float
        GPU utilization while inferring, fraction in (0, 1].
    flush_size : int
        Requests per batch; bounds memory.

    Raises
    ------
    ValueError
        For a negative export rate, a cap outside (0, 1] or a flush size below 1.
    """
    if export_rate_s < 0:
        raise ValueError(f"export rate must be >= 0 seconds, got {export_rate_s}")
    if not 0 < utilization_cap <= 1:
        raise ValueError(f"utilization cap must be in (0, 1], got {utilization_cap}")
    if flush_size < 1:
        raise ValueError(f"flush size must be >= 1, got {flush_size}")
    cols = {c: requests[c].to_numpy(np.float64) for c in (
        "id", "start_s", "prefill_s", "decode_s", "n_input_tokens", "n_output_tokens")}
    for lo in range(0, len(requests), flush_size):
        part = {c: v[lo:lo + flush_size] for c, v in cols.items()}
        total = part["prefill_s"] + part["decode_s"]
        if export_rate_s > 0:
            owner, offset, duration = _snapshot_rows(part["start_s"], total, export_rate_s)
        else:
            owner, offset, duration = _phase_rows(total, warm_s, cool_s)
        end = offset + duration
        yield pa.RecordBatch.from_arrays([
            pa.array(part["id"][owner].astype(np.int64)),
            pa.array(part["start_s"][owner] + offset),
            pa.array(duration),
            pa.array(_utilization(offset, total[owner], utilization_cap, warm_s, cool_s)),
            pa.array(_kv_bytes(end, part["prefill_s"][owner], part["decode_s"][owner],
                               part["n_input_tokens"][owner], part["n_output_tokens"][owner],
                               kv_bytes_per_token)),
        ], schema=FRAGMENT_SCHEMA)
