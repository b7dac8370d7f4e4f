"""The request record every run writes (``requests.parquet``) and the state behind it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from archive.arrow import from_numpy, to_numpy

REQUEST_COLUMNS = {
    "id": "row of the request in the trace (0-based)",
    "session_id": "session of the request, when the trace has sessions",
    "replica": "replica that served the request",
    "arrival_s": "time the client sent the request, s",
    "scheduled_s": "time the engine first scheduled the request on the GPU, s",
    "queue_s": "waiting in the engine, scheduled − (arrival + front-end time), s",
    "first_token_s": "time of the first output token, s",
    "end_s": "time the request finished, or was aborted, s",
    "ttft_s": "time to first token, front end + queue + prefill, s",
    "tpot_s": "time per output token after the first, (end − first token) / (n_out − 1), s",
    "e2e_s": "end-to-end latency, end − arrival, s",
    "n_input_tokens": "prompt tokens",
    "n_output_tokens": "generated tokens",
    "n_cached_tokens": "prompt tokens the prefix cache supplied at the first admission",
    "preemptions": "times the request was preempted (recompute)",
    "status": "finished, or timeout when the client gave up (--request-timeout)",
    "kv_cache_peak_bytes": "KV cache of the request at its end, bytes (eq. 4.1, GQA-aware)",
}
"""Columns of ``requests.parquet``, in order; times in seconds of simulated time."""

FINISHED, TIMEOUT = "finished", "timeout"


def _strings(words: list[str]) -> pa.Array:
    """A small Arrow string array built from its buffers (``pa.array`` of Python strings
    imports pandas, 0.25 s; see :mod:`archive.arrow`)."""
    offsets = np.cumsum([0] + [len(w.encode()) for w in words]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(words), [
        None, pa.py_buffer(offsets.tobytes()), pa.py_buffer("".join(words).encode())])


STATUS_VALUES = _strings([FINISHED, TIMEOUT])


def timed_out(table: pa.Table) -> np.ndarray:
    """Which requests of a request-record table failed (``status == timeout``)."""
    return to_numpy(table.column("status").combine_chunks().indices) == 1


def request_table(rows: np.ndarray, sessions, n_in: np.ndarray, n_out: np.ndarray,
                  record: dict[str, np.ndarray], kv_bytes_per_token: float) -> pa.Table:
    """One table of :data:`REQUEST_COLUMNS` from per-request arrays (all of one length).

    ``record`` is what an engine path returns per request: ``replica``, ``arrival_s``,
    ``scheduled_s``, ``queue_s``, ``first_token_s``, ``end_s``, ``n_cached_tokens``,
    ``preemptions`` and ``timed_out``; TTFT, TPOT and E2E are derived here.
    """
    arrival, first, end = record["arrival_s"], record["first_token_s"], record["end_s"]
    failed = record["timed_out"]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where((n_out > 1) & ~failed, (end - first) / (n_out - 1), np.nan)
    columns = {"id": rows.astype(np.int64)}
    if sessions is not None:
        columns["session_id"] = sessions
    columns.update({
        "replica": record["replica"].astype(np.int64), "arrival_s": arrival,
        "scheduled_s": record["scheduled_s"], "queue_s": record["queue_s"],
        "first_token_s": first, "end_s": end,
        "ttft_s": np.where(failed, np.nan, first - arrival), "tpot_s": tpot,
        "e2e_s": end - arrival, "n_input_tokens": n_in, "n_output_tokens": n_out,
        "n_cached_tokens": record["n_cached_tokens"],
        "preemptions": record["preemptions"].astype(np.int64),
    })
    arrays = [c if isinstance(c, pa.Array | pa.ChunkedArray) else from_numpy(
        np.ascontiguousarray(c)) for c in columns.values()]
    names = list(columns)
    status = pa.DictionaryArray.from_arrays(
        from_numpy(failed.astype(np.int8)), STATUS_VALUES)
    kv = from_numpy(np.round(kv_bytes_per_token * (n_in + n_out)).astype(np.int64))
    return pa.Table.from_arrays([*arrays, status, kv], names=[*names, "status",
                                                              "kv_cache_peak_bytes"])
