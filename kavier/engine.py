"""The request timeline: requests run one at a time on one GPU (thesis 4.3.3).

Each request's service time comes from a timing model (:mod:`kavier.timing`). Without arrival
times the trace runs back to back, as in the thesis. With arrival times a request starts at
``max(arrival, GPU free)`` (a single-server FIFO queue), which gives queueing delay and
``TTFT = queueing + prefill``. The recursion ``free_i = max(arrival_i, free_{i-1}) + service_i``
is Lindley's; it is evaluated in closed form with cumulative sums, so the whole timeline is a
handful of numpy passes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kavier.timing import RooflineTiming, ThesisTiming

REQUEST_COLUMNS = [
    "id", "arrival_s", "start_s", "queue_s", "n_input_tokens", "n_output_tokens", "prefill_s",
    "decode_s", "ttft_s", "tpot_s", "e2e_s", "end_s", "throughput_tok_s",
]
"""Columns of ``requests.parquet``; times in seconds of simulated time."""


def start_times(arrival_s: np.ndarray, service_s: np.ndarray) -> np.ndarray:
    """Start time of each request on one FIFO server, s.

    ``start_i = max(arrival_i, start_{i-1} + service_{i-1})``, computed as
    ``S_{i-1} + max_{j<=i}(arrival_j − S_{j-1})`` with ``S`` the cumulative service time.
    Arrivals must be in non-decreasing order.
    """
    done_before = np.concatenate(([0.0], np.cumsum(service_s)[:-1]))
    return done_before + np.maximum.accumulate(arrival_s - done_before)


def simulate(workload: pd.DataFrame, timing: ThesisTiming | RooflineTiming,
             honor_arrivals: bool = True) -> pd.DataFrame:
    """Simulate a workload on one GPU.

    Parameters
    ----------
    workload : DataFrame
        ``n_input_tokens``, ``n_output_tokens`` and optionally ``arrival_s`` (seconds, sorted
        or not: requests are served in arrival order, ties in trace order).
    timing : timing model
        Gives ``prefill_s`` and ``decode_s`` per request.
    honor_arrivals : bool
        When False, or when the workload has no ``arrival_s``, requests run back to back from
        t = 0 and queueing is zero (the thesis's batch view).

    Returns
    -------
    DataFrame
        One row per request with :data:`REQUEST_COLUMNS`: ``prefill_s`` (request overhead and
        prefill pass), ``decode_s``, ``queue_s``, ``ttft_s = queue_s + prefill_s``,
        ``tpot_s = decode_s / (n_output_tokens − 1)`` (NaN for single-token outputs),
        ``e2e_s = queue_s + prefill_s + decode_s`` and ``throughput_tok_s =
        (n_input_tokens + n_output_tokens) / (prefill_s + decode_s)``.
    """
    n_in = workload["n_input_tokens"].to_numpy(np.int64)
    n_out = workload["n_output_tokens"].to_numpy(np.int64)
    prefill = timing.prefill_s(n_in)
    decode = timing.decode_s(n_in, n_out)
    service = prefill + decode
    timed = honor_arrivals and "arrival_s" in workload.columns
    if timed:
        order = np.argsort(workload["arrival_s"].to_numpy(np.float64), kind="stable")
        arrival = workload["arrival_s"].to_numpy(np.float64)[order]
        start = np.empty_like(service)
        start[order] = start_times(arrival, service[order])
        arrival = workload["arrival_s"].to_numpy(np.float64)
    else:
        start = np.concatenate(([0.0], np.cumsum(service)[:-1]))
        arrival = start
    queue = start - arrival
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(n_out > 1, decode / (n_out - 1), np.nan)
        throughput = (n_in + n_out) / service
    return pd.DataFrame({
        "id": np.arange(len(n_in), dtype=np.int64),
        "arrival_s": arrival if timed else np.full(len(n_in), np.nan),
        "start_s": start,
        "queue_s": queue,
        "n_input_tokens": n_in,
        "n_output_tokens": n_out,
        "prefill_s": prefill,
        "decode_s": decode,
        "ttft_s": queue + prefill,
        "tpot_s": tpot,
        "e2e_s": queue + service,
        "end_s": start + service,
        "throughput_tok_s": throughput,
    })


def summarize(requests: pd.DataFrame) -> dict:
    """Totals and percentiles of a simulated run.

    Returns
    -------
    dict
        ``n_requests``, token totals, ``gpu_hours`` (busy time / 3600), ``makespan_s``
        (first start to last end), output and total token throughput over the makespan,
        mean queueing delay, and p50/p90/p99 of ``ttft_s``, ``tpot_s``, ``e2e_s`` and of the
        service time ``prefill_s + decode_s``.
    """
    service = requests["prefill_s"] + requests["decode_s"]
    makespan = float(requests["end_s"].max() - requests["start_s"].min())
    out_tokens = int(requests["n_output_tokens"].sum())
    in_tokens = int(requests["n_input_tokens"].sum())
    summary = {
        "n_requests": len(requests),
        "n_input_tokens": in_tokens,
        "n_output_tokens": out_tokens,
        "gpu_hours": float(service.sum() / 3600.0),
        "prefill_gpu_hours": float(requests["prefill_s"].sum() / 3600.0),
        "decode_gpu_hours": float(requests["decode_s"].sum() / 3600.0),
        "makespan_s": makespan,
        "output_throughput_tok_s": out_tokens / makespan if makespan > 0 else float("nan"),
        "total_throughput_tok_s": (in_tokens + out_tokens) / makespan if makespan > 0
        else float("nan"),
        "mean_queue_s": float(requests["queue_s"].mean()),
    }
    for name, values in (("ttft_s", requests["ttft_s"]), ("tpot_s", requests["tpot_s"]),
                         ("e2e_s", requests["e2e_s"]), ("service_s", service)):
        clean = values.dropna()
        for q in (50, 90, 99):
            summary[f"p{q}_{name}"] = float(np.percentile(clean, q)) if len(clean) else None
    return summary
