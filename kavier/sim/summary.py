"""The run summary: one for every run, from the request record and the GPU timeline."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from archive.arrow import column, to_numpy
from kavier.sim.requests import timed_out
from kavier.sim.stats import QuantileSketch


class Summary:
    """Accumulates requests and timeline intervals chunk by chunk (memory stays flat).

    Parameters
    ----------
    replicas : int
    stages : int
        Pipeline stages per replica: the timeline's ``replica`` column counts GPU groups,
        ``replicas × stages`` of them, each ``gpus_per_replica`` GPUs.
    peak_flops_per_s, peak_bytes_per_s : float
        Of one GPU, for the run's MFU and MBU.
    sustainability : Sustainability
        Power model, PUE and carbon trace.
    slo_ttft_s, slo_tpot_s : float or None
        SLOs for goodput (a missing one is not checked).
    closed_loop : bool
        Requests were sent back to back (arrivals follow completions: no offered load).
    """

    def __init__(self, replicas: int, peak_flops_per_s: float, peak_bytes_per_s: float,
                 sustainability, slo_ttft_s: float | None = None,
                 slo_tpot_s: float | None = None, closed_loop: bool = False,
                 stages: int = 1) -> None:
        self.replicas, self.sus, self.closed_loop = replicas, sustainability, closed_loop
        self.groups = replicas * stages
        self.peak_flops_per_s, self.peak_bytes_per_s = peak_flops_per_s, peak_bytes_per_s
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.counts = dict.fromkeys(("n_requests", "n_finished", "n_failed", "n_input_tokens",
                                     "n_output_tokens", "n_cached_tokens", "preemptions",
                                     "requests_with_prefix_hit", "n_meeting_slos"), 0)
        self.queue_sum = 0.0
        self.first_arrival, self.last_arrival, self.last_end = np.inf, -np.inf, 0.0
        self._queues: list[tuple[np.ndarray, np.ndarray]] = []
        self.sketches = {m: QuantileSketch() for m in ("ttft_s", "tpot_s", "e2e_s")}
        self.busy_s = np.zeros(self.groups)
        self.seconds = dict.fromkeys(("prefill", "decode"), 0.0)
        self.work = dict.fromkeys(("flops", "dram_bytes", "comm_s", "energy_busy_j",
                                   "co2_busy_g", "busy_ci_s"), 0.0)
        self.peak_kv_blocks = 0

    def add_requests(self, t: pa.Table) -> None:
        """Add a chunk of the request record (:data:`~kavier.sim.requests.REQUEST_COLUMNS`)."""
        if not t.num_rows:
            return
        c = self.counts
        failed = timed_out(t)
        ok = ~failed
        n_in = column(t, "n_input_tokens", np.int64)
        n_out = column(t, "n_output_tokens", np.int64)
        cached = column(t, "n_cached_tokens", np.int64)
        c["n_requests"] += t.num_rows
        c["n_failed"] += int(failed.sum())
        c["n_finished"] += int(ok.sum())
        c["n_input_tokens"] += int(n_in.sum())
        c["n_output_tokens"] += int(n_out[ok].sum())
        c["n_cached_tokens"] += int(cached.sum())
        c["requests_with_prefix_hit"] += int((cached > 0).sum())
        c["preemptions"] += int(column(t, "preemptions", np.int64).sum())
        queue = column(t, "queue_s", np.float64)
        self.queue_sum += float(np.nansum(queue))
        metrics = {m: column(t, m, np.float64) for m in self.sketches}
        for m, values in metrics.items():
            self.sketches[m].add(values[ok])
        meets = ok.copy()
        if self.slo_ttft_s is not None:
            meets &= metrics["ttft_s"] <= self.slo_ttft_s
        if self.slo_tpot_s is not None:
            tpot = metrics["tpot_s"]
            meets &= np.isnan(tpot) | (tpot <= self.slo_tpot_s)
        c["n_meeting_slos"] += int(meets.sum())
        arrival = column(t, "arrival_s", np.float64)
        self.first_arrival = min(self.first_arrival, float(arrival.min()))
        self.last_arrival = max(self.last_arrival, float(arrival.max()))
        self._queues.append((arrival, queue))
        self.last_end = max(self.last_end, float(np.nanmax(column(t, "end_s", np.float64))))

    def add_steps(self, b: pa.RecordBatch) -> dict[str, np.ndarray]:
        """Add timeline intervals (:data:`~kavier.sim.timeline.STEP_COLUMNS`); returns their
        power (:meth:`Sustainability.intervals`) for the writers."""
        get = {name: to_numpy(b.column(name)) for name in b.schema.names}
        duration = get["duration_s"]
        self.busy_s += np.bincount(get["replica"], duration, minlength=self.groups)
        pre, dec = get["prefill_tokens"], get["decode_tokens"]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(pre + dec > 0, pre / (pre + dec), 0.0)
        self.seconds["prefill"] += float((duration * share).sum())
        self.seconds["decode"] += float((duration * (1.0 - share)).sum())
        self.work["flops"] += float(get["flops"].sum())
        self.work["dram_bytes"] += float(get["dram_bytes"].sum())
        self.work["comm_s"] += float(get["comm_s"].sum())
        self.peak_kv_blocks = max(self.peak_kv_blocks, int(get["kv_blocks_used"].max()))
        power = self.sus.intervals(get["start_s"], duration, get["compute_s"], get["memory_s"])
        self.work["energy_busy_j"] += float(power["energy_j"].sum())
        if "co2_g" in power:
            self.sus.carbon.check_covers(float(get["start_s"].min()),
                                         float((get["start_s"] + duration).max()))
            self.work["co2_busy_g"] += float(power["co2_g"].sum())
            self.work["busy_ci_s"] += float(power["carbon_s"].sum())
        return power

    def result(self) -> dict:
        """The summary (plain JSON types)."""
        c, n = self.counts, self.counts["n_requests"]
        end = self.last_end if n else 0.0
        start = self.first_arrival if n else 0.0
        makespan = end - start
        busy = float(self.busy_s.sum())
        gpus = self.sus.gpus_per_replica             # GPU-hours count every GPU of a replica
        out = {
            **{k: c[k] for k in ("n_requests", "n_finished", "n_failed", "n_input_tokens",
                                 "n_output_tokens", "n_cached_tokens", "preemptions")},
            "replicas": self.replicas, "gpus": self.groups * gpus,
            "makespan_s": makespan, "timeline_s": end,
            "gpu_hours": gpus * busy / 3600.0,
            "prefill_gpu_hours": gpus * self.seconds["prefill"] / 3600.0,
            "decode_gpu_hours": gpus * self.seconds["decode"] / 3600.0,
            "provisioned_gpu_hours": gpus * self.groups * end / 3600.0,
            "output_throughput_tok_s": c["n_output_tokens"] / makespan if makespan > 0
            else None,
            "total_throughput_tok_s": (c["n_input_tokens"] + c["n_output_tokens"]) / makespan
            if makespan > 0 else None,
            "mean_queue_s": self.queue_sum / n if n else None,
            "busy_fraction": [float(b / end) if end > 0 else None for b in self.busy_s],
            "mfu": self.work["flops"] / (self.peak_flops_per_s * busy) if busy else None,
            "mbu": self.work["dram_bytes"] / (self.peak_bytes_per_s * busy) if busy else None,
            "comm_share": self.work["comm_s"] / busy if busy else None,
            "peak_kv_blocks_used": self.peak_kv_blocks,
            "goodput": c["n_meeting_slos"] / n if n else None,
            "goodput_req_s": c["n_meeting_slos"] / makespan if makespan > 0 else None,
            "slo_ttft_s": self.slo_ttft_s, "slo_tpot_s": self.slo_tpot_s,
            **self._backlog(),
        }
        for name, sketch in self.sketches.items():
            out.update(sketch.percentiles(name))
        out["sustainability"] = self._energy(end, busy)
        return out

    def _backlog(self) -> dict:
        """Whether the queue drains: the mean queueing delay of the first and the last tenth
        of the requests by arrival. ``backlog`` is true when the last tenth waits more than
        1 s on average and over 10× the first tenth: arrivals outpace service for the whole
        trace, and the latency percentiles measure the backlog, not serving (never back to
        back, where arrivals follow completions)."""
        if not self._queues:
            return {"queue_first_tenth_s": None, "queue_last_tenth_s": None, "backlog": False}
        arrival = np.concatenate([a for a, _ in self._queues])
        queue = np.concatenate([q for _, q in self._queues])[np.argsort(arrival, kind="stable")]
        tenth = max(queue.size // 10, 1)
        first, last = _mean_scheduled(queue[:tenth]), _mean_scheduled(queue[-tenth:])
        backlog = (not self.closed_loop and first is not None and last is not None
                   and last > 1.0 and last > 10.0 * first)
        return {"queue_first_tenth_s": first, "queue_last_tenth_s": last, "backlog": backlog}

    def _energy(self, end: float, busy: float) -> dict:
        sus, w = self.sus, self.work
        idle_s = self.groups * end - busy
        idle_j = sus.idle_w() * idle_s
        gpu_j = w["energy_busy_j"] + idle_j
        out = {**sus.to_dict(), "energy_busy_wh": w["energy_busy_j"] / 3600.0,
               "energy_idle_wh": idle_j / 3600.0, "energy_gpu_wh": gpu_j / 3600.0,
               "energy_gpu_j": gpu_j, "energy_facility_wh": gpu_j * sus.pue / 3600.0,
               "mean_power_w": gpu_j / (self.groups * sus.gpus_per_replica * end)
               if end > 0 else None}
        if sus.carbon is not None:
            if end > 0:
                sus.carbon.check_covers(0.0, end)
            idle_ci = self.groups * float(sus.carbon.integral(0.0, end)) - w["busy_ci_s"]
            idle_co2 = float(sus.co2_of(sus.idle_w(), idle_ci))
            out["co2_g"] = w["co2_busy_g"] + idle_co2
            out["co2_idle_g"] = idle_co2
        return out


def _mean_scheduled(queue: np.ndarray) -> float | None:
    """Mean queueing delay of the requests that were scheduled (NaN: timed out before), s;
    None when none was."""
    queue = queue[~np.isnan(queue)]
    return float(queue.mean()) if queue.size else None
