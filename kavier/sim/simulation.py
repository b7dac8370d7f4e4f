"""One simulation run: checks the setup, picks the engine's path, streams its results.

Every run — one request at a time or batched, one replica or many — goes through
:func:`simulate`, writes the same request record and GPU timeline, and gets the same summary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from archive.arrow import column, from_numpy
from archive.errors import InputError
from kavier.models.timing import RooflineTiming
from kavier.sim.config import EngineConfig, kv_pool_blocks, resolve
from kavier.sim.engine import SteppedEngine
from kavier.sim.fastpath import FastPath, eligible
from kavier.sim.load import OfferedLoad
from kavier.sim.prefix import PrefixCache
from kavier.sim.requests import request_table
from kavier.sim.stats import QuantileSketch
from kavier.sim.summary import Summary
from kavier.sim.timeline import Timeline

CHUNK_REQUESTS = 1_000_000
"""Requests per chunk on the closed-form path (each chunk is a few numpy passes)."""


def check_setup(timing, config: EngineConfig, prefix: PrefixCache | None) -> None:
    """Reject option combinations the engine cannot honour, naming the option.

    Raises
    ------
    InputError
    """
    if not isinstance(timing, RooflineTiming) and not eligible(config):
        raise InputError("the thesis timing model (eqs. 4.2-4.6) has no batch step: it runs "
                         "one request at a time on one replica without a timeout; use "
                         "--timing-model roofline", field="timing-model")
    if config.enable_expert_parallel and (not timing.llm.n_experts
                                          or config.expert_parallel_size == 1):
        why = ("is not a mixture of experts" if not timing.llm.n_experts
               else "runs on one GPU (replicas × tensor parallel size = 1)")
        raise InputError(f"expert parallelism has no effect: {timing.llm.name} {why}",
                         field="enable-expert-parallel")
    if not timing.kv_cache:
        if prefix is not None and prefix.config.policy == "blocks":
            raise InputError("prefix-cache policy 'blocks' keeps KV blocks; it needs "
                             "--kv-cache on", field="prefix-cache-policy")
        if config.chunked_prefill:
            raise InputError("chunked prefill attends to the KV of earlier chunks; it needs "
                             "--kv-cache on", field="chunked-prefill")


def pool_blocks(timing, config: EngineConfig, block_size: int) -> int:
    """KV blocks per replica: ``num_gpu_blocks`` or sized from GPU memory."""
    if config.num_gpu_blocks is not None:
        return config.num_gpu_blocks
    return kv_pool_blocks(timing.llm, timing.gpu, block_size, config.gpu_memory_utilization,
                          config.activation_reserve_gib, config.tensor_parallel_size,
                          config.expert_parallel_size, config.pipeline_parallel_size)


def simulate(table: pa.Table, timing, config: EngineConfig, block_size: int,
             prefix: PrefixCache | None, sustainability,
             on_requests: Callable[[pa.Table], None],
             on_steps: Callable[[pa.RecordBatch, dict], None],
             slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
             path: str = "auto") -> dict:
    """Serve the requests of ``table`` and return the run's summary.

    Parameters
    ----------
    table : pyarrow.Table
        ``n_input_tokens``, ``n_output_tokens`` and optionally ``arrival_s`` (s) and
        ``session_id``, one row per request in trace order (the ``id`` is the row).
    timing : ThesisTiming or RooflineTiming
    config : EngineConfig
    block_size : int
        Tokens per KV block.
    prefix : PrefixCache or None
    sustainability : Sustainability
    on_requests : callable
        Receives the request record (:data:`~kavier.sim.requests.REQUEST_COLUMNS`), chunk by
        chunk.
    on_steps : callable
        Receives timeline batches (:data:`~kavier.sim.timeline.STEP_COLUMNS`) with their
        power (:meth:`Sustainability.intervals`), each replica's in time order.
    slo_ttft_s, slo_tpot_s : float or None
        SLOs for goodput.
    path : {"auto", "stepped", "compiled"}
        ``auto`` takes the closed-form path where it applies, else the compiled stepped loop
        where it applies (:func:`kavier.sim.compiled.applies`), else the Python one;
        ``stepped`` always steps in Python and ``compiled`` always in the compiled loop (the
        tests compare the three).

    Returns
    -------
    dict
        :meth:`Summary.result` plus ``kv_pool_blocks``, ``engine_path``, ``prefix_cache`` and
        ``zero_token_requests`` (requests whose empty prompt or zero output tokens were served
        as one token, per field: :func:`served_sizes`).

    Raises
    ------
    InputError
        For unsupported option combinations, or a request whose KV cannot fit an empty pool.
    ValueError
        For an unknown ``path``, ``"stepped"`` or ``"compiled"`` with the thesis timing
        model, or ``"compiled"`` where the compiled loop does not apply.
    """
    config = resolve(config, timing.kv_cache)
    tp = getattr(timing, "tensor_parallel_size", 1)
    if not tp == config.tensor_parallel_size == sustainability.gpus_per_replica:
        raise ValueError(f"tensor parallel size differs: timing {tp}, config "
                         f"{config.tensor_parallel_size}, sustainability "
                         f"{sustainability.gpus_per_replica}")
    if getattr(timing, "pipeline_parallel_size", 1) != config.pipeline_parallel_size:
        raise ValueError(f"pipeline parallel size differs: timing "
                         f"{timing.pipeline_parallel_size}, config "
                         f"{config.pipeline_parallel_size}")
    if getattr(timing, "expert_parallel_size", 1) != config.expert_parallel_size:
        raise ValueError(f"expert parallel size differs: timing {timing.expert_parallel_size}"
                         f", config {config.expert_parallel_size}")
    check_setup(timing, config, prefix)
    blocks = pool_blocks(timing, config, block_size)
    n_in, n_out, raised = served_sizes(table)
    if timing.kv_cache and n_in.size:
        need = -(-(n_in + n_out) // block_size)
        if int(need.max()) > blocks:
            i = int(np.argmax(need))
            raise InputError(f"request {i} needs {n_in[i] + n_out[i]:,} tokens of KV, more "
                             f"than a replica's pool of {blocks:,} blocks of {block_size}",
                             field="n_input_tokens")
    has_arrivals = "arrival_s" in table.column_names and not config.back_to_back
    arrival = column(table, "arrival_s", np.float64) if has_arrivals else np.zeros(n_in.size)
    sessions = table.column("session_id") if "session_id" in table.column_names else None
    summary = Summary(config.replicas, timing.gpu.flops_per_s, timing.gpu.bytes_per_s,
                      sustainability, slo_ttft_s, slo_tpot_s, config.back_to_back,
                      config.pipeline_parallel_size)
    kv_per_token = timing.llm.kv_bytes_per_token if timing.kv_cache else 0.0
    load = OfferedLoad(timing, config.max_num_seqs, blocks * block_size, config.replicas)

    def steps(batch: pa.RecordBatch) -> None:
        on_steps(batch, summary.add_steps(batch))

    def emit(requests: pa.Table) -> None:
        summary.add_requests(requests)
        load.add(*(column(requests, c, np.int64) for c in
                   ("n_input_tokens", "n_cached_tokens", "n_output_tokens")))
        on_requests(requests)

    timeline = Timeline(timing.gpu.flops_per_s, timing.gpu.bytes_per_s,
                        kv_per_token * block_size, steps, getattr(timing, "comm_s", None))
    if path not in ("auto", "stepped", "compiled"):
        raise ValueError(f"unknown engine path {path!r}")
    if path != "auto" and not isinstance(timing, RooflineTiming):
        raise ValueError("the thesis timing model has no stepped path (no batch step)")
    if eligible(config) and path == "auto":
        itl = QuantileSketch()
        engine = FastPath(timing, config, blocks, block_size, prefix, timeline, itl)
        order = (np.argsort(arrival, kind="stable") if has_arrivals
                 else np.arange(n_in.size))
        for lo in range(0, max(order.size, 1), CHUNK_REQUESTS):
            rows = order[lo:lo + CHUNK_REQUESTS]
            out = engine.step(rows, n_in[rows], n_out[rows],
                              arrival[rows] if has_arrivals else None)
            timeline.flush()
            emit(request_table(rows, None if sessions is None else sessions.take(
                from_numpy(rows)), n_in[rows], n_out[rows], out, kv_per_token))
        counters = {"queries_tokens": engine.cache_queries, "hits_tokens": engine.cache_hits,
                    "evictions": engine.pool.evictions}
        used = "closed-form"
    else:
        engine_class, used = _stepped_engine(timing, config, prefix, path)
        engine = engine_class(timing, config, blocks, block_size, prefix, timeline)
        out = engine.run(n_in, n_out, arrival, None if sessions is None
                         else np.asarray(sessions.to_numpy(zero_copy_only=False)))
        itl = engine.itl
        emit(request_table(np.arange(n_in.size), sessions, n_in, n_out, out, kv_per_token))
        counters = engine.cache_counters()
    result = summary.result()
    result.update(itl.percentiles("itl_s"))
    span = summary.last_arrival - summary.first_arrival if has_arrivals and n_in.size else 0.0
    result.update(load.result(span))
    result.update({"engine_path": used, "kv_pool_blocks": blocks, "block_size": block_size,
                   "prefix_cache": _cache_stats(prefix, counters, summary),
                   "zero_token_requests": raised})
    return result


def served_sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray, dict]:
    """Prompt and output tokens of each request as vLLM would serve them, and how many
    requests asked for zero of either.

    vLLM serves neither an empty prompt (its input processor rejects it: "The decoder prompt
    cannot be empty", ``vllm/v1/engine/processor.py``) nor zero output tokens
    (``SamplingParams`` needs ``max_tokens`` ≥ 1), yet traces hold such rows (BurstGPT logs
    failed requests with 0 response tokens). Each is served with one token — a one-token
    prompt, or a prefill that returns its first token and stops — and counted, so the summary
    says how many sizes the simulation raised (``zero_token_requests``) instead of changing
    them silently.
    """
    n_in = column(table, "n_input_tokens", np.int64)
    n_out = column(table, "n_output_tokens", np.int64)
    raised = {"n_input_tokens": int((n_in == 0).sum()), "n_output_tokens": int((n_out == 0).sum())}
    return np.maximum(n_in, 1), np.maximum(n_out, 1), raised


def _stepped_engine(timing, config: EngineConfig, prefix: PrefixCache | None, path: str):
    """The engine class that steps this run and its ``engine_path``: the compiled loop
    (:mod:`kavier.sim.compiled`) where it applies, unless ``path`` asks for the Python one.

    Raises
    ------
    ValueError
        For ``path="compiled"`` where the compiled loop does not apply.
    """
    if path == "stepped":
        return SteppedEngine, "stepped"
    # numba takes about 0.2 s to import: only runs that step pay it
    from kavier.sim import compiled
    if compiled.applies(timing, config, prefix):
        return compiled.CompiledEngine, "compiled"
    if path == "compiled":
        raise ValueError("the compiled engine does not run this configuration")
    return SteppedEngine, "stepped"


def _cache_stats(prefix: PrefixCache | None, counters: dict, summary: Summary) -> dict | None:
    """Prefix-cache statistics: vLLM's token hit rate as the headline
    (``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``), the share of
    requests with a hit beside it."""
    if prefix is None:
        return None
    n = summary.counts["n_requests"]
    q, h = counters["queries_tokens"], counters["hits_tokens"]
    return {**prefix.config.to_dict(), "block_size": prefix.block_size,
            "queries_tokens": q, "hits_tokens": h,
            "hit_rate_tokens": h / q if q else 0.0,
            "hit_rate_requests": summary.counts["requests_with_prefix_hit"] / n if n else 0.0,
            "evictions": counters["evictions"]}
