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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from archive.errors import InputError
from archive.importers.serving import block_hashes
from tracer.client import ServerError, VLLMClient
from tracer.jsonlog import AppendLog, read_log
from tracer.workloads import Schedule


def estimate(schedule: Schedule) -> str:
    """What a schedule asks for, printed before it starts: requests, prompt and output
    tokens, and the send span (the run lasts at least that long)."""
    return (f"{len(schedule):,} requests, {int(schedule.n_input_tokens.sum()):,} prompt + "
            f"{int(schedule.n_output_tokens.sum()):,} output tokens, sent over "
            f"{float(schedule.offset_s.max()):,.1f} s")


def run(url: str, api_key: str | None, model: str, schedule: Schedule, folder: Path,
        max_concurrency: int | None = None, warmup: int = 1, timeout_s: float = 600.0,
        on_done=None, sampler=None, cache_salt: bool = True,
        resume: bool = False, max_model_len: int | None = None) -> list[dict]:
    """Send ``schedule`` to the server and log every request; returns the records.

    Each record: ``request_id``, ``start_s`` (send time from the run's start),
    ``send_unix_s`` (the same instant on the wall clock, to align GPU samples with),
    ``n_input_tokens`` (the server's count where it gives one), ``n_output_tokens``,
    ``ttft_s``, ``itl_s`` (list), ``error`` (None on success), and ``stage`` or
    ``prefix_group`` where the schedule has them. With ``cache_salt`` every request carries
    its own ``cache_salt`` (vLLM's per-request prefix-cache isolation), so that identical
    prompts of one size do not hit each other's cached blocks. A ``sampler``
    (:class:`~tracer.sampler.NvidiaSmiSampler`) is entered after the warm-up, so its first
    sample precedes the first recorded request, and left when the last one has finished.

    With ``resume``, an interrupted run in ``folder`` continues: the same schedule (checked
    against the ``schedule.json`` fingerprint the run wrote), the requests already logged are
    not sent again, a torn last log line (a kill mid-write) is dropped and reported, and the
    rest are sent on the planned timeline, their ``start_s`` continuing it from the first of
    them (the gap while the run was down is in no record). Multi-turn sessions cannot resume:
    their histories are gone. ``max_model_len`` is the model's (asked of the server when the
    caller has not).

    Raises
    ------
    InputError
        When the output folder already holds a run and ``resume`` is False, when it holds
        another schedule's run, or a size exceeds the model's ``max_model_len``.
    ServerError
        When the server cannot be reached or a warm-up request fails.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "requests.jsonl"
    records = _resumed(folder, schedule) if resume else []
    if not resume and log_path.exists() and log_path.stat().st_size:
        raise InputError("holds a run already; pass --resume to continue it, or choose "
                         "another --output", path=folder)
    (folder / "schedule.json").write_text(json.dumps({"fingerprint": _fingerprint(schedule),
                                                      "requests": len(schedule)}) + "\n")
    done = {int(r["request_id"]) for r in records}
    todo = [i for i in range(len(schedule)) if i not in done]
    probe = VLLMClient(url, api_key, timeout_s)
    limit = max_model_len or probe.max_model_len(model)
    longest = int((schedule.n_input_tokens + schedule.n_output_tokens).max())
    if limit and longest > limit:
        raise InputError(f"a request needs {longest:,} tokens, more than the model's "
                         f"max_model_len {limit:,}", field="input-len")
    by_size = {} if schedule.prompts else {
        int(n): probe.prompt_tokens(model, int(n)) for n in np.unique(schedule.n_input_tokens)}

    def prompt(i: int) -> list[int]:
        return schedule.prompts[i] if schedule.prompts else by_size[int(
            schedule.n_input_tokens[i])]

    salt = f"bench-{folder.name}-{time.time_ns()}"
    for _ in range(warmup):
        check = probe.complete(model, prompt(0), 4, cache_salt=f"{salt}-warmup")
        if not check.success:              # a failure here would vanish from the results
            raise ServerError(f"the warm-up request failed ({check.error}); is the server "
                              "ready? (--warmup 0 skips it)")
    local = threading.local()
    log = AppendLog(log_path)
    gate = threading.BoundedSemaphore(max_concurrency or len(schedule))

    def client() -> VLLMClient:
        if not hasattr(local, "client"):
            local.client = VLLMClient(url, api_key, timeout_s, retries=0)
        return local.client

    def send(i: int, start: float, t0: float, ids: list[int] | None = None):
        """Send request ``i`` (its prompt, or ``ids``), log its record; returns the result.
        The caller has acquired ``gate``; it is released when the request ends."""
        ids = prompt(i) if ids is None else ids
        try:
            result = client().complete(model, ids, int(schedule.n_output_tokens[i]),
                                       cache_salt=f"{salt}-{i}" if cache_salt else None)
        finally:
            gate.release()
        record = {"request_id": str(i), "start_s": start - t0,
                  "send_unix_s": wall0 + (start - t0),
                  "n_input_tokens": result.n_input_tokens or int(schedule.n_input_tokens[i]),
                  "n_output_tokens": (result.n_output_tokens if result.success
                                      else 0) or (len(result.itl_s) + 1),
                  "ttft_s": result.ttft_s, "itl_s": result.itl_s,
                  "error": None if result.success else (result.error or "failed")}
        if schedule.session is not None:   # the prompt actually sent
            record["n_input_tokens"] = result.n_input_tokens or len(ids)
        if not cache_salt:                 # the server's cache can hit: the replay needs it
            record["hash_ids"] = block_hashes(ids)
        for key, labels in (("stage", schedule.stage), ("prefix_group", schedule.group),
                            ("session", schedule.session), ("turn", schedule.turn)):
            if labels is not None:
                record[key] = int(labels[i])
        log.write(record)
        records.append(record)
        if on_done:
            on_done(record)
        return result

    def converse(turns: np.ndarray, t0: float) -> None:
        """A session's turns one after another: each sends the conversation so far (earlier
        prompts and the server's answers, re-tokenized) and its question, ``think_s`` after
        the previous answer; after a failed turn the rest are sent with the history they
        have."""
        history: list[int] = []
        for k, i in enumerate(turns.tolist()):
            if k:
                time.sleep(schedule.think_s)
            ids = history + schedule.prompts[i]
            gate.acquire()
            result = send(i, time.perf_counter(), t0, ids)
            try:
                answer = client().tokenize(model, result.text) if result.text else []
            except ServerError as exc:        # the history is unknown: the session ends
                for rest in turns[k + 1:].tolist():
                    _log_failure(rest, f"session stopped: {exc}", t0)
                return
            history = ids + answer

    def _log_failure(i: int, error: str, t0: float) -> None:
        record = {"request_id": str(i), "start_s": time.perf_counter() - t0,
                  "send_unix_s": time.time(), "n_input_tokens": int(schedule.n_input_tokens[i]),
                  "n_output_tokens": 0, "ttft_s": None, "itl_s": [], "error": error}
        log.write(record)
        records.append(record)

    jobs = len(schedule) if schedule.session is None else int(np.unique(schedule.session).size)
    workers = min(jobs if schedule.session is not None else (max_concurrency or jobs), 256, jobs)
    try:
        with sampler or nullcontext(), ThreadPoolExecutor(max_workers=workers) as pool:
            # a resumed run continues the planned timeline from its first unsent request
            shift = float(schedule.offset_s[todo[0]]) if records and todo else 0.0
            t0, wall0 = time.perf_counter() - shift, time.time() - shift
            futures = []
            if schedule.session is None:
                for i in todo:
                    _wait_until(t0 + schedule.offset_s[i])
                    gate.acquire()
                    futures.append(pool.submit(send, i, time.perf_counter(), t0))
            else:
                for s in np.unique(schedule.session):
                    turns = np.flatnonzero(schedule.session == s)
                    _wait_until(t0 + schedule.offset_s[turns[0]])
                    futures.append(pool.submit(converse, turns, t0))
        for future in futures:            # a bug in a worker shows, it does not vanish
            future.result()
    finally:
        log.close()
    return sorted(records, key=lambda r: int(r["request_id"]))


def _fingerprint(schedule: Schedule) -> str:
    """SHA-256 of what a schedule sends: offsets, sizes, prompts, labels."""
    import hashlib

    digest = hashlib.sha256()
    for array in (schedule.offset_s, schedule.n_input_tokens, schedule.n_output_tokens,
                  schedule.stage, schedule.group, schedule.session):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    for prompt in schedule.prompts or ():
        digest.update(np.asarray(prompt, np.int64).tobytes())
    return digest.hexdigest()


def _resumed(folder: Path, schedule: Schedule) -> list[dict]:
    """The records of the interrupted run in ``folder`` (a torn last line cut off, on
    stderr), after checking it ran this schedule.

    Raises
    ------
    InputError
        For a multi-turn schedule, a folder without a run, another schedule's run, or a bad
        line other than the last.
    """
    import sys

    if schedule.session is not None:
        raise InputError("multi-turn sessions cannot resume (their histories are gone)",
                         field="resume")
    plan, log_path = folder / "schedule.json", folder / "requests.jsonl"
    if not plan.is_file() or not log_path.is_file():
        raise InputError("no interrupted tracer bench run here to resume", path=folder)
    if json.loads(plan.read_text()).get("fingerprint") != _fingerprint(schedule):
        raise InputError("holds a run of another schedule (other options or seed); resume it "
                         "with the options it was started with", path=folder)
    records, torn = read_log(log_path)
    if torn:
        print(f"{log_path}: its last line was cut off by the interruption; dropped",
              file=sys.stderr)
    return records


def _wait_until(instant: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``instant`` (not at all when past it)."""
    delay = instant - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


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
