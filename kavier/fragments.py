"""Discrete-event export: GPU utilization and KV-cache usage over each request's lifetime.

Two forms, chosen by the export rate ``T_i`` (thesis 4.3.3):

* ``T_i > 0``: snapshots every ``T_i`` seconds, ``N = ceil((T_p + T_d) / T_i)`` rows per
  request, the last one shortened so that durations add up to the request's service time.
* ``T_i = 0``: run-length fragments, one row per constant-utilization phase (warm-up,
  inference, cool-down), the form OpenDC consumes natively.

GPU utilization follows Listing 4.3: 50 % during the first ``warm_s`` (0.1 s) and the last
``cool_s`` (0.1 s) of a request, the utilization cap in between. The thesis samples that
function at the start of each snapshot, so at 1 s export a 1.5 s request shows 50 % for its whole
first second; here each row carries the *time average* of the function over its interval, so
utilization-seconds (and the energy a linear power model derives from them) are the same at
every export rate. KV-cache bytes are given at the end of each row's interval (the most the
interval needs): the reused prefix is there from the start, the rest of the prompt's KV is
written during prefill, then one token's KV per decode step (eq. 4.1 per token, GQA-aware);
zero with the KV cache off.

Speed: a row's time and KV are affine in its index ``k`` within each (request, phase) segment, so
each column is built with a few ``numpy.repeat`` passes over the rows instead of per-row
gathers, and only the few rows that touch a warm-up or cool-down are evaluated exactly.
Batches hold whole requests and at most ``max_rows`` rows (one longer request gets a batch of
its own), which bounds memory and keeps each numpy pass within the CPU cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from archive.arrow import column, from_numpy

FRAGMENT_SCHEMA = pa.schema([
    pa.field("request_id", pa.int64(), nullable=False),
    pa.field("time_s", pa.float64(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("gpu_utilization", pa.float64(), nullable=False),
    pa.field("kv_cache_bytes", pa.int64(), nullable=False),
])
"""``fragments.parquet``: ``time_s`` is the start of the interval in simulated seconds,
``gpu_utilization`` the interval's mean utilization, a fraction in [0, 1]."""

ENERGY_FIELDS = [pa.field("power_w", pa.float64(), nullable=False),
                 pa.field("energy_wh", pa.float64(), nullable=False)]
CO2_FIELD = pa.field("co2_g", pa.float64(), nullable=False)


def fragment_schema(sustainability=None) -> pa.Schema:
    """:data:`FRAGMENT_SCHEMA`, plus mean ``power_w`` and GPU ``energy_wh`` per row with a
    :class:`~kavier.sustainability.Sustainability` (power model), plus ``co2_g`` (facility
    energy × carbon intensity) when it has a carbon trace."""
    fields = list(FRAGMENT_SCHEMA)
    if sustainability is not None:
        fields += ENERGY_FIELDS + ([CO2_FIELD] if sustainability.carbon is not None else [])
    return pa.schema(fields)

FRAGMENT_PARQUET_OPTIONS = {
    "use_dictionary": False,
    "column_encoding": {c: "BYTE_STREAM_SPLIT" for c in ("time_s", "kv_cache_bytes", "co2_g")},
    "compression": "lz4",
    "write_statistics": ["request_id", "time_s"],
    "write_batch_size": 65_536,
}
"""Writer options: byte-stream split for the columns whose values change from row to row
(times, KV bytes, CO2), plain encoding for the rest (ids, durations, utilization and power come
in long runs of one value, which LZ4 shrinks better than byte-stream split and as well as a
dictionary, faster), LZ4, statistics only on the columns one filters by, and 65,536 values per
internal write batch instead of pyarrow's 1,024. ``python benchmarks/bench_fragment_writer.py``
(18.3 M rows of the Marconi-shaped benchmark at 0.1 s, best of five single-threaded writes on
the 2-core dev machine): 5 columns in 0.298 s and 18.7 MB (1,024-value batches: 0.336 s;
dictionary ids and byte-stream split on every other column, the earlier choice: 0.419 s,
23.7 MB; snappy: 0.719 s, 163.8 MB; pyarrow's defaults: 1.235 s, 126.6 MB); 7 columns with
energy in 0.362 s and 23.3 MB (earlier choice 0.563 s, 33.6 MB)."""

GENERATION_ROWS = 131_072
"""Rows generated per batch: small enough that numpy's passes over a batch stay in the CPU
cache (generation is several times faster than with multi-million-row batches)."""

WARM_UTILIZATION = 0.5
"""Utilization during warm-up and cool-down (Listing 4.3)."""

_FLOAT_SLACK = 1e-9
"""Relative slack so that ``total / T_i`` landing a rounding error above an integer does not
add an empty row."""


def _inference_window(total, warm_s, cool_s):
    """Start and end of the full-utilization phase within each request (Listing 4.3)."""
    start = np.minimum(warm_s, total)
    return start, np.maximum(start, total - cool_s)


def _mean_utilization(begin, end, total, cap, warm_s, cool_s):
    """Time average of Listing 4.3's utilization over ``[begin, end]`` seconds into requests
    of ``total`` seconds."""
    w0, w1 = _inference_window(total, warm_s, cool_s)
    inference = np.clip(np.minimum(end, w1) - np.maximum(begin, w0), 0.0, None)
    length = end - begin
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (WARM_UTILIZATION * (length - inference) + cap * inference) / length
    return np.where(length > 0, mean, WARM_UTILIZATION)


def kv_tokens_at(at, prefill, decode, n_in, n_cached, n_out):
    """Tokens whose K and V are in the cache ``at`` seconds into each request.

    The reused prefix (``n_cached``) is there from the start; the rest of the prompt is written
    linearly over the prefill, the output linearly over the decode; at the end all
    ``n_in + n_out`` tokens are (the request's ``kv_cache_peak_bytes``).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        in_prefill = n_cached + (n_in - n_cached) * np.where(
            prefill > 0, np.clip(at / prefill, 0.0, 1.0), 1.0)
        in_decode = n_in + n_out * np.where(
            decode > 0, np.clip((at - prefill) / decode, 0.0, 1.0), 1.0)
    return np.where(at >= prefill + decode, n_in + n_out,
                    np.where(at <= prefill, in_prefill, in_decode))


def _ranges(first, counts):
    """Concatenated ``first_i + arange(counts_i)`` and the owner ``i`` of each element."""
    owner = np.repeat(np.arange(counts.size), counts)
    within = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first, counts) + within, owner


def _snapshot_batch(part, rate, cap, kv_per_token, warm_s, cool_s):
    total = part["total_s"]
    counts = np.where(total > 0, np.maximum(np.ceil(total / rate - _FLOAT_SLACK), 1), 0
                      ).astype(np.int64)
    first = np.cumsum(counts) - counts
    n = int(counts.sum())
    k = np.arange(n, dtype=np.float64)
    k -= np.repeat(first.astype(np.float64), counts)            # row index within its request
    time_s = k * rate
    time_s += np.repeat(part["start_s"], counts)
    has = counts > 0
    last = (first + counts - 1)[has]
    duration = np.full(n, rate)
    duration[last] = (total - (counts - 1) * rate)[has]
    utilization = np.full(n, cap)
    head = np.minimum(counts, math.ceil(warm_s / rate) + 1)
    tail_from = np.clip(np.floor((total - cool_s) / rate) - 1, 0, counts).astype(np.int64)
    for begin, length in ((first, head), (first + tail_from, counts - tail_from)):
        edge, owner = _ranges(begin, length)
        offset = (edge - first[owner]) * rate
        end = np.minimum(offset + rate, total[owner])
        utilization[edge] = _mean_utilization(offset, end, total[owner], cap, warm_s, cool_s)
    if not kv_per_token:
        return time_s, duration, utilization, counts, np.zeros(n, np.int64)
    kv = _snapshot_kv(part, rate, counts, k, last, has)
    kv *= round(kv_per_token)
    return time_s, duration, utilization, counts, kv


def _snapshot_kv(part, rate, counts, k, last, has):
    """KV tokens at the end of each snapshot, built segment-wise (prefill rows, decode rows),
    in place: each pass over the rows reuses one array instead of allocating a new one."""
    prefill, decode = part["prefill_s"], part["decode_s"]
    n_in, n_cached, n_out = part["n_input_tokens"], part["n_cached_tokens"], part[
        "n_output_tokens"]
    in_prefill = np.minimum(counts, np.floor(prefill / rate)).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_s1 = np.where(prefill > _FLOAT_SLACK, (n_in - n_cached) / prefill, 0.0)
        per_s2 = np.where(decode > _FLOAT_SLACK, n_out / decode, 0.0)
    # token count at the end of row k of a request:
    #   prefill rows: n_cached + per_s1 (k + 1) T_i;  decode rows: n_in + per_s2 ((k + 1) T_i - T_p)
    s1, s2 = per_s1 * rate, per_s2 * rate
    a1 = n_cached + s1
    a2 = n_in + s2 - per_s2 * prefill
    segments = np.stack([in_prefill, counts - in_prefill], axis=1).ravel()
    tokens = np.repeat(np.stack([s1, s2], axis=1).ravel(), segments)
    tokens *= k
    tokens += np.repeat(np.stack([a1, a2], axis=1).ravel() + 1e-6, segments)
    np.floor(tokens, out=tokens)
    whole = tokens.astype(np.int64)
    whole[last] = (n_in + n_out)[has]
    return whole


def phase_rows(total, warm_s=0.1, cool_s=0.1):
    """Run-length phases of Listing 4.3 per request.

    Returns
    -------
    owner, phase, offset, duration : ndarrays
        Request index, phase (0 warm-up, 1 inference, 2 cool-down), start offset (s) and length
        (s) of each non-empty phase, in order.
    """
    w0, w1 = _inference_window(total, warm_s, cool_s)
    bounds = np.stack([np.zeros_like(total), w0, w1, total], axis=1)
    lengths = np.diff(bounds, axis=1)
    owner, phase = np.nonzero(lengths > 0)
    return owner, phase, bounds[owner, phase], lengths[owner, phase]


def phase_utilization(phase, cap):
    """Utilization of each phase of :func:`phase_rows`: the cap while inferring, else 50 %."""
    return np.where(phase == 1, cap, WARM_UTILIZATION)


def _phase_batch(part, cap, kv_per_token, warm_s, cool_s):
    total = part["total_s"]
    owner, phase, offset, duration = phase_rows(total, warm_s, cool_s)
    tokens = kv_tokens_at(offset + duration, *(part[c][owner] for c in (
        "prefill_s", "decode_s", "n_input_tokens", "n_cached_tokens", "n_output_tokens")))
    kv = np.floor(tokens + 1e-6).astype(np.int64) * round(kv_per_token)
    counts = np.bincount(owner, minlength=total.size)
    return (part["start_s"][owner] + offset, duration, phase_utilization(phase, cap), counts,
            kv)


def _groups(weights: np.ndarray, max_rows: int) -> Iterator[slice]:
    """Consecutive slices of requests whose rows add up to at most ``max_rows`` (a single
    heavier request forms its own slice)."""
    ends = np.cumsum(weights)
    lo = 0
    while lo < weights.size:
        base = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, base + max_rows, side="right")), lo + 1)
        yield slice(lo, hi)
        lo = hi


def fragment_batches(requests, export_rate_s: float, kv_bytes_per_token: float,
                     utilization_cap: float = 1.0, max_rows: int = GENERATION_ROWS,
                     warm_s: float = 0.1, cool_s: float = 0.1,
                     sustainability=None) -> Iterator[pa.RecordBatch]:
    """Yield fragment rows as record batches of :func:`fragment_schema`.

    Parameters
    ----------
    requests : pyarrow.Table
        Output of the engine: ``id``, ``start_s``, ``prefill_s``, ``decode_s``,
        ``n_input_tokens``, ``n_cached_tokens``, ``n_output_tokens``.
    export_rate_s : float
        Snapshot interval ``T_i`` in seconds; 0 for run-length fragments.
    kv_bytes_per_token : float
        KV-cache bytes per token (0 with the KV cache off).
    utilization_cap : float
        GPU utilization while inferring, fraction in (0, 1].
    max_rows : int
        Rows per batch at most (unless one request alone has more); bounds memory.
    sustainability : kavier.sustainability.Sustainability, optional
        Adds ``power_w``, ``energy_wh`` and, with a carbon trace, ``co2_g`` per row. Energy is
        exact; a row's CO2 charges its mean power over the row's carbon intensity, which
        differs from the exact integral only for a row that both mixes utilization levels and
        straddles a carbon-trace step (parts per billion on the Azure trace).

    Raises
    ------
    ValueError
        For a negative export rate, a cap outside (0, 1] or ``max_rows`` below 1.
    """
    if export_rate_s < 0:
        raise ValueError(f"export rate must be >= 0 seconds, got {export_rate_s}")
    if not 0 < utilization_cap <= 1:
        raise ValueError(f"utilization cap must be in (0, 1], got {utilization_cap}")
    if max_rows < 1:
        raise ValueError(f"flush size must be >= 1 row, got {max_rows}")
    cols = {c: column(requests, c, np.float64) for c in (
        "start_s", "prefill_s", "decode_s", "n_input_tokens", "n_cached_tokens",
        "n_output_tokens")}
    ids = column(requests, "id", np.int64)
    schema = fragment_schema(sustainability)
    cols["total_s"] = cols["prefill_s"] + cols["decode_s"]
    total = cols["total_s"]
    weight = np.ceil(total / export_rate_s) if export_rate_s > 0 else np.full(total.size, 3.0)
    for group in _groups(weight, max_rows):
        part = {c: v[group] for c, v in cols.items()}
        if export_rate_s > 0:
            time_s, duration, util, counts, kv = _snapshot_batch(
                part, export_rate_s, utilization_cap, kv_bytes_per_token, warm_s, cool_s)
        else:
            time_s, duration, util, counts, kv = _phase_batch(
                part, utilization_cap, kv_bytes_per_token, warm_s, cool_s)
        arrays = [np.repeat(ids[group], counts), time_s, duration, util, kv]
        if sustainability is not None:
            power = sustainability.row_power_w(util)
            arrays += [power, power * duration / 3600.0]
            if sustainability.carbon is not None:
                arrays.append(sustainability.co2_g(power, time_s, time_s + duration))
        yield pa.RecordBatch.from_arrays([from_numpy(a) for a in arrays], schema=schema)
