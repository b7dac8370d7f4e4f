"""Serving runs under load against an OpenAI-compatible server, as ``vllm bench serve`` runs
them, written as an archive serving-run dataset that ``kavier calibrate --dataset`` takes.

Requests are sent on a schedule — a Poisson process at ``--request-rate`` (``--burstiness``
is the shape of gamma-distributed gaps, 1 being Poisson, as in ``vllm bench serve``), or the
arrivals of an archive trace — with at most ``--max-concurrency`` in flight. Each prompt has
exactly its token count (token ids built with the server's ``/tokenize``) and each completion
exactly its output count (``min_tokens`` = ``max_tokens``, ``ignore_eos``). Every request is
appended to ``requests.jsonl`` (flushed and fsync'd) as it completes, with its send time, TTFT,
every inter-token latency and its error, so a run that dies loses nothing measured; the dataset
(``archive/importers/serving.py``, client timestamps) is written at the end. Warm-up requests
run before the schedule starts and are not recorded. The run is bounded: ``--num-prompts``
requests, and each one ``--timeout`` seconds at most.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archive.errors import InputError
from tracer.client import ServerError, VLLMClient


@dataclass(frozen=True)
class Schedule:
    """What to send: per request its send offset (s from the start), prompt and output
    tokens."""

    offset_s: np.ndarray
    n_input_tokens: np.ndarray
    n_output_tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.offset_s.size)


def poisson_schedule(n: int, rate: float, input_len: int, output_len: int,
                     burstiness: float = 1.0, seed: int = 0) -> Schedule:
    """``n`` requests of fixed sizes with gamma(shape = burstiness, mean 1/rate) gaps (a
    Poisson process at burstiness 1; ``vllm bench serve``'s ``--burstiness``); the first one
    at 0 s. ``rate`` may be ``inf``: everything at once.

    Raises
    ------
    InputError
        For a non-positive count, rate, size or burstiness.
    """
    for name, value in (("num-prompts", n), ("request-rate", rate), ("input-len", input_len),
                        ("output-len", output_len), ("burstiness", burstiness)):
        if not value > 0:
            raise InputError(f"must be positive, got {value}", field=name)
    if np.isinf(rate):
        offsets = np.zeros(n)
    else:
        gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
        offsets = np.concatenate(([0.0], np.cumsum(gaps[:-1])))
    return Schedule(offsets, np.full(n, input_len), np.full(n, output_len))


def trace_schedule(table, n: int | None, rate_scale: float = 1.0) -> Schedule:
    """The first ``n`` requests of an archive workload (its arrivals divided by
    ``rate_scale``, and its sizes).

    Raises
    ------
    InputError
        When the trace has no arrival times, or ``rate_scale`` is not positive.
    """
    if "arrival_s" not in table.column_names:
        raise InputError("the trace has no arrival times to replay", field="trace")
    if not rate_scale > 0:
        raise InputError(f"must be positive, got {rate_scale}", field="rate-scale")
    rows = table.num_rows if n is None else min(n, table.num_rows)
    arrival = table.column("arrival_s").to_numpy()[:rows].astype(np.float64)
    return Schedule((arrival - arrival.min()) / rate_scale,
                    table.column("n_input_tokens").to_numpy()[:rows].astype(np.int64),
                    np.maximum(table.column("n_output_tokens").to_numpy()[:rows], 1)
                    .astype(np.int64))


class _Log:
    """``requests.jsonl``, appended one completed request at a time, flushed and fsync'd."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def estimate(schedule: Schedule) -> str:
    """What a schedule asks for, printed before it starts: requests, prompt and output
    tokens, and the send span (the run lasts at least that long)."""
    return (f"{len(schedule):,} requests, {int(schedule.n_input_tokens.sum()):,} prompt + "
            f"{int(schedule.n_output_tokens.sum()):,} output tokens, sent over "
            f"{float(schedule.offset_s.max()):,.1f} s")


def run(url: str, api_key: str | None, model: str, schedule: Schedule, folder: Path,
        max_concurrency: int | None = None, warmup: int = 1, timeout_s: float = 600.0,
        on_done=None, sampler=None) -> list[dict]:
    """Send ``schedule`` to the server and log every request; returns the records.

    Each record: ``request_id``, ``start_s`` (send time from the run's start),
    ``send_unix_s`` (the same instant on the wall clock, to align GPU samples with),
    ``n_input_tokens`` (the server's count where it gives one), ``n_output_tokens``,
    ``ttft_s``, ``itl_s`` (list), ``error`` (None on success). A ``sampler``
    (:class:`~tracer.sampler.NvidiaSmiSampler`) is entered after the warm-up, so its first
    sample precedes the first recorded request, and left when the last one has finished.

    Raises
    ------
    InputError
        When the output folder already holds a run, or a size exceeds the model's
        ``max_model_len``.
    ServerError
        When the server cannot be reached or a warm-up request fails.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "requests.jsonl"
    if log_path.exists() and log_path.stat().st_size:
        raise InputError("holds a run already; choose another --output", path=folder)
    probe = VLLMClient(url, api_key, timeout_s)
    limit = next((m.get("max_model_len") for m in probe.models() if m.get("id") == model),
                 None)
    longest = int((schedule.n_input_tokens + schedule.n_output_tokens).max())
    if limit and longest > limit:
        raise InputError(f"a request needs {longest:,} tokens, more than the model's "
                         f"max_model_len {limit:,}", field="input-len")
    prompts = {int(n): probe.prompt_tokens(model, int(n))
               for n in np.unique(schedule.n_input_tokens)}
    for _ in range(warmup):
        check = probe.complete(model, prompts[int(schedule.n_input_tokens[0])], 4)
        if not check.success:              # a failure here would vanish from the results
            raise ServerError(f"the warm-up request failed ({check.error}); is the server "
                              "ready? (--warmup 0 skips it)")
    local = threading.local()
    log, records = _Log(log_path), []
    gate = threading.BoundedSemaphore(max_concurrency or len(schedule))

    def send(i: int, start: float, t0: float) -> None:
        if not hasattr(local, "client"):
            local.client = VLLMClient(url, api_key, timeout_s, retries=0)
        try:
            result = local.client.complete(model, prompts[int(schedule.n_input_tokens[i])],
                                           int(schedule.n_output_tokens[i]))
        finally:
            gate.release()
        record = {"request_id": str(i), "start_s": start - t0,
                  "send_unix_s": wall0 + (start - t0),
                  "n_input_tokens": result.n_input_tokens or int(schedule.n_input_tokens[i]),
                  "n_output_tokens": (result.n_output_tokens if result.success
                                      else 0) or (len(result.itl_s) + 1),
                  "ttft_s": result.ttft_s, "itl_s": result.itl_s,
                  "error": None if result.success else (result.error or "failed")}
        log.write(record)
        records.append(record)
        if on_done:
            on_done(record)

    workers = min(max_concurrency or len(schedule), 256, len(schedule))
    try:
        with sampler or nullcontext(), ThreadPoolExecutor(max_workers=workers) as pool:
            t0, wall0 = time.perf_counter(), time.time()
            for i in range(len(schedule)):
                delay = t0 + schedule.offset_s[i] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                gate.acquire()
                pool.submit(send, i, time.perf_counter(), t0)
    finally:
        log.close()
    return sorted(records, key=lambda r: int(r["request_id"]))


def summary(records: list[dict]) -> dict:
    """``vllm bench serve``'s summary: request throughput and mean, median and p99 of TTFT,
    TPOT, ITL and E2E (s), failures by reason."""
    ok = [r for r in records if r["error"] is None]
    e2e = np.array([r["ttft_s"] + sum(r["itl_s"]) for r in ok])
    ends = [r["start_s"] + r["ttft_s"] + sum(r["itl_s"]) for r in ok]
    duration = max(ends) - min(r["start_s"] for r in records) if ok else 0.0
    tpot = np.array([sum(r["itl_s"]) / (r["n_output_tokens"] - 1) for r in ok
                     if r["n_output_tokens"] > 1])
    itl = np.array([x for r in ok for x in r["itl_s"]])
    out = {"requests": len(records), "failed": len(records) - len(ok),
           "duration_s": duration,
           "request_throughput_req_s": len(ok) / duration if duration > 0 else None}
    for name, values in (("ttft_s", np.array([r["ttft_s"] for r in ok])), ("tpot_s", tpot),
                         ("itl_s", itl), ("e2e_s", e2e)):
        out[name] = ({"mean": float(values.mean()), "median": float(np.median(values)),
                      "p99": float(np.percentile(values, 99))} if values.size else None)
    reasons: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            reasons[r["error"]] = reasons.get(r["error"], 0) + 1
    out["failures"] = reasons
    return out
