"""``tracer collect``: prefill and decode sweeps against a vLLM server, written as an archive
measurements dataset (thesis 6.2.3–6.2.6, done the careful way).

* Prompts have exactly the planned number of tokens (sent as token ids built with the server's
  ``/tokenize``); outputs exactly the planned number (``max_tokens = min_tokens``,
  ``ignore_eos``); token counts recorded are the server's ``usage``.
* Every request is streamed and timed (:mod:`tracer.client`); around it ``/metrics`` is
  scraped (once between two requests: the scrape after one is the one before the next), so
  that the engine's own prefill and decode times sit beside the client's TTFT and decode
  time (the difference is HTTP and scheduling overhead).
* The server's prefix cache is defeated per request (a unique ``cache_salt``, or with
  ``salt="prompt"`` unique leading tokens for servers without it), so repetitions measure
  prefill, not cache hits.
* Warm-up requests run first and are not recorded.
* Optional concurrency levels: at level ``c`` every repetition sends ``c`` identical-size
  requests together (each recorded with ``concurrency = c``); the engine's per-request times
  cannot be told apart then and are left null, and GPU samples are tagged with the group's
  first request. Calibration of the one-at-a-time model uses the ``c = 1`` rows.
* Each finished request is appended to ``measurements.jsonl`` and flushed to disk at once; a
  crash loses nothing measured, and ``resume=True`` skips what is already there. Failed
  requests are recorded with their error, never dropped.
* With an :class:`~tracer.sampler.NvidiaSmiSampler`, GPU samples are tagged with the request
  in flight, appended to ``gpu_samples.jsonl`` as they arrive (a resumed sweep adds to it) and
  written as ``gpu_samples.parquet`` at the end.

At the end ``measurements.parquet`` (schema :data:`archive.schema.MEASUREMENTS`, which
``kavier calibrate --dataset DIR`` reads as is), ``setup.json`` and ``dataset.json`` with the
card are written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from archive.cards import finish
from archive.errors import InputError
from archive.schema import MEASUREMENTS
from archive.smi import samples_table
from tracer.client import RequestResult, ServerError, VLLMClient
from tracer.jsonlog import read_log
from tracer.sampler import NvidiaSmiSampler

POWERS_OF_TWO = tuple(2**k for k in range(6, 15))
"""Default sweep sizes: 64 … 16,384 tokens."""


@dataclass(frozen=True)
class SweepPlan:
    """What to measure.

    Attributes
    ----------
    prefill_sizes : tuple of int
        Prompt lengths of the prefill sweep (one output token each).
    decode_sizes : tuple of int
        Output lengths of the decode sweep (prompt of ``decode_prompt_tokens``).
    repetitions : int
    warmup : int
        Unrecorded requests sent first.
    decode_prompt_tokens : int
    salt : {"cache_salt", "prompt", "none"}
        How the server's prefix cache is defeated.
    """

    prefill_sizes: tuple[int, ...] = POWERS_OF_TWO
    decode_sizes: tuple[int, ...] = POWERS_OF_TWO
    repetitions: int = 10
    warmup: int = 2
    decode_prompt_tokens: int = 16
    salt: str = "cache_salt"
    concurrency: tuple[int, ...] = (1,)

    def requests(self) -> list[dict]:
        """The planned requests in order: for each concurrency level, the prefill sweep, then
        the decode sweep; at level ``c`` each repetition is ``c`` requests sent together."""
        plan = []
        for c in self.concurrency:
            for sweep, sizes in (("prefill", self.prefill_sizes), ("decode", self.decode_sizes)):
                for size in sizes:
                    n_in, n_out = (size, 1) if sweep == "prefill" else (
                        self.decode_prompt_tokens, size)
                    plan += [{"sweep": sweep, "size": size, "repetition": r, "slot": k,
                              "concurrency": c, "n_input": n_in, "n_output": n_out}
                             for r in range(self.repetitions) for k in range(c)]
        return plan

    def tokens(self) -> tuple[int, int]:
        """Prompt and output tokens the plan sends (warm-up excluded), for the estimate
        printed before a sweep starts (the default decode sweep alone asks for 327,040
        output tokens, about 1.8 h at 20 ms per token)."""
        plan = self.requests()
        return sum(r["n_input"] for r in plan), sum(r["n_output"] for r in plan)


@dataclass(frozen=True)
class Setup:
    """What was measured on what: recorded in ``setup.json`` and the measurement rows."""

    provider: str
    gpu: str
    model: str
    served_model: str
    engine: str = "vLLM"
    engine_version: str = ""
    cluster: str = ""
    node: str = ""
    gpu_name_smi: str = ""
    dtype: str = ""
    temperature: float = 0.0
    kv_cache: str = "on"
    prefix_caching: str = "server default; defeated per request"
    extra: dict = field(default_factory=dict)

    @property
    def setup_id(self) -> str:
        """``provider-gpu-engineversion-model``, lower case."""
        return f"{self.provider}-{self.gpu}-{self.engine}{self.engine_version}-{self.model}".lower()


def _key(row: dict) -> tuple:
    return (row["sweep"], int(row["size"]), int(row["repetition"]),
            int(row.get("concurrency") or 1), int(row.get("slot") or 0))


def _row(planned: dict, result: RequestResult, setup: Setup, run_id: str,
         engine: dict[str, float]) -> dict:
    n_out = result.n_output_tokens if result.success else None
    return {
        "setup_id": setup.setup_id, "provider": setup.provider, "gpu": setup.gpu,
        "engine": setup.engine, "engine_version": setup.engine_version, "model": setup.model,
        "sweep": planned["sweep"], "size": planned["size"],
        "n_input_tokens": result.n_input_tokens or planned["n_input"],
        "n_input_tokens_estimated": result.n_input_tokens is None,
        "n_output_tokens": n_out if n_out is not None else 0,
        "n_output_tokens_requested": planned["n_output"], "repetition": planned["repetition"],
        "latency_s": result.latency_s, "ttft_s": result.ttft_s, "decode_s": result.decode_s,
        "throughput_tok_s": (n_out / result.latency_s) if result.success else None,
        "tpot_s": result.tpot_s, **result.itl_stats(),
        "engine_prefill_s": engine.get("prefill"), "engine_decode_s": engine.get("decode"),
        "prefix_cache_hits": engine.get("prefix_cache_hits"),
        "concurrency": planned["concurrency"], "slot": planned["slot"],
        "run_id": run_id, "error": result.error,
    }


def _salted(prompt: list[int], index: int, run_id: str, mode: str) -> tuple[list[int], str]:
    salt = f"{run_id}-{index}"
    if mode != "prompt":
        return prompt, (salt if mode == "cache_salt" else None)
    unique = [1000 + (index >> (8 * k)) % 256 for k in range(3)]   # distinct leading tokens
    return unique + prompt[len(unique):] if len(prompt) > len(unique) else prompt, None


def _engine_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if k in before}


def collect(client: VLLMClient, plan: SweepPlan, setup: Setup, out_dir: str | Path,
            sampler: NvidiaSmiSampler | None = None, resume: bool = False,
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Run the sweep and write the dataset folder ``out_dir``; returns it.

    Raises
    ------
    ServerError
        When the server cannot be reached at all (failed single requests are recorded).
    InputError
        When ``out_dir`` already holds measured rows and ``resume`` is False (they are never
        deleted), or its log has a bad line other than a torn last one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "measurements.jsonl"
    done = set()
    rows, _ = read_log(log)
    if rows and not resume:
        raise InputError(f"{len(rows)} measured rows are already here; pass --resume to "
                         "continue them, or choose another --output", path=out)
    done = {_key(row) for row in rows}
    run_id = f"{setup.setup_id}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    prompts: dict[int, list[int]] = {}

    def prompt(n: int) -> list[int]:
        if n not in prompts:
            prompts[n] = client.prompt_tokens(setup.served_model, n)
        return prompts[n]

    for i in range(plan.warmup):
        client.complete(setup.served_model, prompt(plan.decode_prompt_tokens), 8,
                        cache_salt=f"warmup-{run_id}-{i}" if plan.salt == "cache_salt" else None)
    planned = [p for p in plan.requests() if _key(p) not in done]
    groups = [list(g) for _, g in groupby(planned, key=lambda p: _key(p)[:4])]
    last = _metrics_or_none(client)     # the engine's counters after the latest request
    has_metrics = last is not None
    sent = len(done)
    if sampler is not None:                 # samples land on disk as they arrive
        sampler.spool, sampler.tags = out / "gpu_samples.jsonl", {"run_id": run_id}
    with open(log, "a") as sink, (sampler or _NoSampler()) as gpu, ThreadPoolExecutor(
            max(plan.concurrency)) as pool:
        for group in groups:
            gpu.request_id = sent
            jobs = []
            for request in group:
                tokens, salt = _salted(prompt(request["n_input"]), sent, run_id, plan.salt)
                jobs.append((request, tokens, salt))
                sent += 1
            sequential = len(group) == 1 and has_metrics
            before = (last if last is not None else client.metrics()) if sequential else {}
            results = list(pool.map(lambda job: client.complete(
                setup.served_model, job[1], job[0]["n_output"], job[2], setup.temperature),
                jobs))
            last = client.metrics_after(before) if sequential else None
            engine = _engine_delta(before, last) if sequential else {}
            gpu.request_id = None
            for (request, _, _), result in zip(jobs, results, strict=True):
                sink.write(json.dumps(_row(request, result, setup, run_id, engine)) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            if progress:
                progress(sent - len(done), len(planned))
    samples = sampler.spooled() if sampler else pd.DataFrame()   # this run's and earlier ones'
    gpu_info = ({"gpu_name_smi": sampler.gpu_name, "driver_version": sampler.driver_version}
                if sampler else {})
    _write_dataset(out, log, samples, setup, plan, run_id,
                   sampler.power_field if sampler else None, gpu_info)
    return out


def _metrics_or_none(client: VLLMClient) -> dict | None:
    """The engine's counters, or None when the server has no vLLM ``/metrics``."""
    try:
        return client.metrics() or None
    except ServerError:
        return None


class _NoSampler:
    request_id = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _write_dataset(out: Path, log: Path, samples: pd.DataFrame, setup: Setup, plan: SweepPlan,
                   run_id: str, power_field: str | None, gpu_info: dict) -> None:
    rows = pd.DataFrame([json.loads(line) for line in log.read_text().splitlines() if line])
    table = pa.Table.from_pandas(rows[MEASUREMENTS.names], schema=MEASUREMENTS,
                                 preserve_index=False)
    pq.write_table(table, out / "measurements.parquet")
    files = ["measurements.parquet", "measurements.jsonl", "setup.json"]
    if not samples.empty:
        fields = ("power.draw.instant",) if power_field == "power.draw.instant" else ()
        pq.write_table(samples_table(samples, run_id, fields), out / "gpu_samples.parquet")
        files += ["gpu_samples.parquet", "gpu_samples.jsonl"]
    (out / "setup.json").write_text(json.dumps({**asdict(setup), "setup_id": setup.setup_id,
                                                "run_id": run_id, "plan": asdict(plan),
                                                "gpu_power_field": power_field, **gpu_info},
                                               indent=2))
    failed = int(rows["error"].notna().sum())
    finish(out, {
        "name": out.name, "title": f"{setup.model} on {setup.gpu} ({setup.provider}, "
                                   f"{setup.engine} {setup.engine_version})",
        "kind": "measurements", "version": "1.0.0", "main_table": "measurements.parquet",
        "files": files, "creators": ["tracer collect"], "licence": "as its owner decides",
        "source": f"tracer collect, run {run_id}", "citation": "see source",
        "description": f"Prefill sweep {list(plan.prefill_sizes)} and decode sweep "
                       f"{list(plan.decode_sizes)} tokens, {plan.repetitions} repetitions; "
                       f"{len(rows)} requests, {failed} failed (recorded with their error)."})
