"""The request timeline: requests run one at a time on one GPU (thesis 4.3.3).

Each request's service time comes from a timing model (:mod:`kavier.timing`), shortened by the
prefix cache (:mod:`kavier.cache`) when its prompt was seen before. Without arrival times the
trace runs back to back, as in the thesis. With arrival times a request starts at
``max(arrival, GPU free)`` (a single-server FIFO queue), which gives queueing delay and
``TTFT = queueing + prefill``. The recursion ``start_i = max(arrival_i, start_{i-1} +
service_{i-1})`` is Lindley's; it is evaluated in closed form with cumulative sums, so a chunk
of a million requests is a handful of numpy passes.

The :class:`Simulator` consumes requests in service order, chunk by chunk, and keeps only
running totals and fixed-size quantile sketches between chunks, so memory does not grow with
the length of the trace.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from archive.arrow import column, from_numpy
from archive.arrow import table as arrow_table
from archive.traces import Workload
from kavier.cache import PrefixCache
from kavier.stats import QuantileSketch
from kavier.sustainability import Sustainability
from kavier.timing import RooflineTiming, ThesisTiming

REQUEST_COLUMNS = {
    "id": "row of the request in the trace (0-based)",
    "session_id": "session of the request, when the trace has sessions",
    "arrival_s": "arrival time, s (NaN when run back to back)",
    "start_s": "time the GPU starts the request, s",
    "queue_s": "queueing delay, start − arrival, s",
    "n_input_tokens": "prompt tokens",
    "n_output_tokens": "generated tokens",
    "n_cached_tokens": "prompt tokens reused from the prefix cache",
    "cache_hit": "true when the prefix cache supplied part or all of the prompt",
    "prefill_s": "prefill time, request overhead included, s (0 on an exact-match hit)",
    "decode_s": "decode time, s (0 on a hit of the full policy)",
    "prefill_saved_s": "prefill time the prefix cache saved, s",
    "ttft_s": "time to first token, queue + prefill, s",
    "tpot_s": "time per output token after the first, decode / (n_out − 1), s",
    "e2e_s": "end-to-end latency, queue + prefill + decode, s",
    "end_s": "time the request finishes, s",
    "throughput_tok_s": "(input + output tokens) / service time, tokens/s",
    "kv_cache_peak_bytes": "KV cache of the request at its end, bytes (eq. 4.1, GQA-aware)",
    "kv_fits": "false when weights + this request's KV cache exceed the usable GPU memory",
    "power_w": "mean GPU power while serving the request, W (with a power model)",
    "energy_wh": "GPU energy of the request, Wh (IT, before PUE)",
    "co2_g": "emissions of the request's facility energy, gCO2 (with a carbon trace)",
}
"""Columns of ``requests.parquet``, in order; times in seconds of simulated time."""

def start_times(arrival_s: np.ndarray, service_s: np.ndarray, free_s: float = 0.0) -> np.ndarray:
    """Start time of each request on one FIFO server, s.

    ``start_i = max(arrival_i, start_{i-1} + service_{i-1})`` with the server free from
    ``free_s``, computed as ``free_s + S_{i-1} + max(0, max_{j<=i}(arrival_j − free_s −
    S_{j-1}))`` with ``S`` the cumulative service time. Arrivals must be in non-decreasing order.
    """
    done_before = free_s + np.concatenate(([0.0], np.cumsum(service_s)[:-1]))
    return done_before + np.maximum(np.maximum.accumulate(arrival_s - done_before), 0.0)


def service_order(requests: pa.Table, honor_arrivals: bool = True) -> np.ndarray:
    """Rows of ``requests`` in the order the GPU serves them: by arrival (stable: ties in
    trace order) when arrivals are honoured, else trace order."""
    if honor_arrivals and "arrival_s" in requests.column_names:
        return np.argsort(column(requests, "arrival_s", np.float64), kind="stable")
    return np.arange(requests.num_rows)


class Simulator:
    """Serve requests in order on one GPU and accumulate the run's summary.

    Parameters
    ----------
    timing : ThesisTiming or RooflineTiming
        Gives ``prefill_s(n_new, n_cached)`` and ``decode_s(n_in, n_out)`` per request.
    cache : PrefixCache or None
        Prefix cache, or None for no prefix caching.
    honor_arrivals : bool
        Use ``arrival_s`` (FIFO queue); when False or absent, back to back from t = 0.
    memory_limit_bytes : float or None
        Usable GPU memory; a request whose weights + KV exceed it is flagged
        (``kv_fits = False``). None: the GPU's full memory.
    sustainability : Sustainability or None
        Power model, PUE and carbon trace; adds ``power_w``, ``energy_wh`` and ``co2_g`` per
        request, and energy of idle gaps, to the summary.
    """

    def __init__(self, timing: ThesisTiming | RooflineTiming, cache: PrefixCache | None = None,
                 honor_arrivals: bool = True, memory_limit_bytes: float | None = None,
                 sustainability: Sustainability | None = None) -> None:
        self.timing, self.cache, self.honor_arrivals = timing, cache, honor_arrivals
        self.sustainability = sustainability
        self._energy = dict.fromkeys(("busy_j", "idle_j", "busy_co2_g", "idle_co2_g"), 0.0)
        self.kv_bytes_per_token = timing.llm.kv_bytes_per_token if timing.kv_cache else 0.0
        self.memory_limit_bytes = (timing.gpu.memory_bytes if memory_limit_bytes is None
                                   else memory_limit_bytes)
        self.free_s = 0.0
        self._first_start = None
        self._last_end = 0.0
        self._totals = dict.fromkeys((
            "n_requests", "n_input_tokens", "n_output_tokens", "n_cached_tokens", "cache_hits",
            "requests_not_fitting"), 0)
        self._seconds = dict.fromkeys(("service", "prefill", "decode", "queue", "prefill_saved",
                                       "decode_saved"), 0.0)
        self._sketches = {m: QuantileSketch() for m in ("ttft_s", "tpot_s", "e2e_s",
                                                          "service_s")}

    def step(self, chunk: pa.Table, rows: np.ndarray) -> pa.Table:
        """Serve the next requests.

        Parameters
        ----------
        chunk : pyarrow.Table
            The requests in service order: ``n_input_tokens``, ``n_output_tokens``, optionally
            ``arrival_s`` and ``session_id``.
        rows : ndarray of int64
            Their rows in the trace (the ``id`` column; the prefix cache reads content by it).

        Returns
        -------
        pyarrow.Table
            One row per request with the columns of :data:`REQUEST_COLUMNS`.

        Raises
        ------
        ValueError
            When arrivals go backwards across or within chunks.
        """
        n_in = column(chunk, "n_input_tokens", np.int64)
        n_out = column(chunk, "n_output_tokens", np.int64)
        cached = (self.cache.serve(rows, n_in) if self.cache is not None
                  else np.zeros(n_in.size, np.int64))
        hit = cached > 0
        policy = self.cache.config.policy if self.cache is not None else "none"
        base_prefill = self.timing.prefill_s(n_in)
        if policy == "blocks":
            prefill = np.where(hit, self.timing.prefill_s(n_in - cached, cached), base_prefill)
        else:
            prefill = np.where(hit, 0.0, base_prefill)
        base_decode = self.timing.decode_s(n_in, n_out)
        decode = np.where(hit, 0.0, base_decode) if policy == "full" else base_decode
        service = prefill + decode
        timed = self.honor_arrivals and "arrival_s" in chunk.column_names
        if timed:
            arrival = column(chunk, "arrival_s", np.float64)
            if np.any(np.diff(arrival) < 0):
                raise ValueError("arrivals must be served in non-decreasing order")
            start = start_times(arrival, service, self.free_s)
        else:
            start = self.free_s + np.concatenate(([0.0], np.cumsum(service)[:-1]))
            arrival = np.full(n_in.size, np.nan)
        queue = start - arrival if timed else np.zeros(n_in.size)
        end = start + service
        kv_peak = np.round(self.kv_bytes_per_token * (n_in + n_out)).astype(np.int64)
        fits = self.timing.llm.weight_bytes + kv_peak <= self.memory_limit_bytes
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(n_out > 1, decode / (n_out - 1), np.nan)
            throughput = np.where(service > 0, (n_in + n_out) / service, np.nan)
        out = {"id": rows.astype(np.int64)}
        if "session_id" in chunk.column_names:
            out["session_id"] = chunk.column("session_id")
        out.update({
            "arrival_s": arrival, "start_s": start, "queue_s": queue, "n_input_tokens": n_in,
            "n_output_tokens": n_out, "n_cached_tokens": cached, "cache_hit": hit,
            "prefill_s": prefill, "decode_s": decode, "prefill_saved_s": base_prefill - prefill,
            "ttft_s": queue + prefill, "tpot_s": tpot, "e2e_s": queue + service, "end_s": end,
            "throughput_tok_s": throughput, "kv_cache_peak_bytes": kv_peak, "kv_fits": fits,
        })
        if self.sustainability is not None:
            out.update(self._energy_columns(start, service, end))
        self._account(out, base_decode - decode)
        if n_in.size:
            self.free_s = float(end[-1])
        return arrow_table(out)

    def _energy_columns(self, start, service, end) -> dict[str, np.ndarray]:
        """Per-request power, energy and emissions; idle gaps go to the run's totals."""
        sus = self.sustainability
        if sus.carbon is not None and end.size:
            sus.carbon.check_covers(0.0, float(end[-1]))
        busy = sus.requests(start, service)
        gap_start = np.concatenate(([self.free_s], end[:-1]))
        idle = sus.idle(gap_start, np.maximum(start, gap_start))
        self._energy["busy_j"] += float(busy["energy_j"].sum())
        self._energy["idle_j"] += idle["energy_j"]
        with np.errstate(divide="ignore", invalid="ignore"):
            cols = {"power_w": np.where(service > 0, busy["energy_j"] / service, np.nan),
                    "energy_wh": busy["energy_j"] / 3600.0}
        if "co2_g" in busy:
            cols["co2_g"] = busy["co2_g"]
            self._energy["busy_co2_g"] += float(busy["co2_g"].sum())
            self._energy["idle_co2_g"] += idle["co2_g"]
        return cols

    def _energy_summary(self, timeline_s: float) -> dict:
        e, sus = self._energy, self.sustainability
        gpu_j = e["busy_j"] + e["idle_j"]
        out = {**sus.to_dict(), "energy_busy_wh": e["busy_j"] / 3600.0,
               "energy_idle_wh": e["idle_j"] / 3600.0, "energy_gpu_wh": gpu_j / 3600.0,
               "energy_gpu_j": gpu_j, "energy_facility_wh": gpu_j * sus.pue / 3600.0,
               "mean_power_w": gpu_j / timeline_s if timeline_s > 0 else float("nan")}
        if sus.carbon is not None:
            out["co2_g"] = e["busy_co2_g"] + e["idle_co2_g"]
            out["co2_idle_g"] = e["idle_co2_g"]
        return out

    def _account(self, r: dict[str, np.ndarray], decode_saved: np.ndarray) -> None:
        """Add a chunk's requests (the columns of :meth:`step`) to the run's totals."""
        if not r["id"].size:
            return
        t, s = self._totals, self._seconds
        t["n_requests"] += r["id"].size
        for c in ("n_input_tokens", "n_output_tokens", "n_cached_tokens"):
            t[c] += int(r[c].sum())
        t["cache_hits"] += int(r["cache_hit"].sum())
        t["requests_not_fitting"] += int((~r["kv_fits"]).sum())
        service = r["prefill_s"] + r["decode_s"]
        s["service"] += float(service.sum())
        s["prefill"] += float(r["prefill_s"].sum())
        s["decode"] += float(r["decode_s"].sum())
        s["queue"] += float(r["queue_s"].sum())
        s["prefill_saved"] += float(r["prefill_saved_s"].sum())
        s["decode_saved"] += float(decode_saved.sum())
        if self._first_start is None:
            self._first_start = float(r["start_s"][0])
        self._last_end = max(self._last_end, float(r["end_s"][-1]))
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            self._sketches[metric].add(r[metric])
        self._sketches["service_s"].add(service)

    def summary(self) -> dict:
        """Totals and percentiles of the requests served so far.

        Returns
        -------
        dict
            ``n_requests``, token totals, ``gpu_hours`` (busy time / 3600; prefill and decode
            parts), ``makespan_s`` (first start to last end), output and total token throughput
            over the makespan, mean queueing delay, prefill (and decode) GPU-hours the prefix
            cache saved, requests whose KV does not fit, and p50/p90/p99 of ``ttft_s``,
            ``tpot_s``, ``e2e_s`` and the service time (nearest rank, within 0.01 %; see
            :class:`~kavier.stats.QuantileSketch`). With a power model, ``sustainability``:
            GPU energy busy and idle over the timeline ``[0, last end]`` (Wh, and J), facility
            energy (× PUE), mean power, and with a carbon trace the emissions (g).
        """
        t, s = self._totals, self._seconds
        makespan = self._last_end - (self._first_start or 0.0)
        out = {
            **{k: t[k] for k in ("n_requests", "n_input_tokens", "n_output_tokens")},
            "gpu_hours": s["service"] / 3600.0,
            "prefill_gpu_hours": s["prefill"] / 3600.0,
            "decode_gpu_hours": s["decode"] / 3600.0,
            "makespan_s": makespan,
            "output_throughput_tok_s": t["n_output_tokens"] / makespan if makespan > 0
            else float("nan"),
            "total_throughput_tok_s": (t["n_input_tokens"] + t["n_output_tokens"]) / makespan
            if makespan > 0 else float("nan"),
            "mean_queue_s": s["queue"] / t["n_requests"] if t["n_requests"] else float("nan"),
            "prefill_saved_gpu_hours": s["prefill_saved"] / 3600.0,
            "decode_saved_gpu_hours": s["decode_saved"] / 3600.0,
            "requests_kv_not_fitting": t["requests_not_fitting"],
        }
        for name, sketch in self._sketches.items():
            out.update(sketch.percentiles(name))
        if self.sustainability is not None:
            out["timeline_s"] = self._last_end
            out["sustainability"] = self._energy_summary(self._last_end)
        if self.cache is not None:
            out["prefix_cache"] = self.cache.stats(t["n_requests"], t["n_input_tokens"],
                                                   t["n_cached_tokens"])
        return out


def run(workload, simulator: Simulator, chunk_size: int = 1_000_000) -> Iterator[pa.Table]:
    """Serve a whole workload in service order, ``chunk_size`` requests at a time.

    Parameters
    ----------
    workload : Workload, pyarrow.Table or pandas.DataFrame
        The requests (:meth:`Simulator.step`'s columns), or a workload holding them.

    Yields
    ------
    pyarrow.Table
        Simulated requests (:data:`REQUEST_COLUMNS`), chunk by chunk.
    """
    requests = _table(workload)
    order = service_order(requests, simulator.honor_arrivals)
    for lo in range(0, order.size, chunk_size):
        rows = order[lo:lo + chunk_size]
        yield simulator.step(requests.take(from_numpy(rows)), rows)


def _table(workload) -> pa.Table:
    if isinstance(workload, Workload):
        return workload.table
    if isinstance(workload, pa.Table):
        return workload
    return pa.Table.from_pandas(workload, preserve_index=False)


def simulate(workload, timing: ThesisTiming | RooflineTiming, honor_arrivals: bool = True,
             cache: PrefixCache | None = None):
    """Simulate a whole workload (as :func:`run` takes it) in memory and return its requests
    in service order as a pandas DataFrame (see :class:`Simulator`; for large traces iterate
    :func:`run` instead)."""
    sim = Simulator(timing, cache, honor_arrivals)
    return pa.concat_tables(list(run(workload, sim))).to_pandas()
