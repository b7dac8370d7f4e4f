"""Capacity planning: the cheapest deployment that meets TTFT and TPOT SLOs on a workload.

Candidates are (GPU type, tensor-parallel size) pairs, each replica of TP × PP GPUs with the
run's pipeline-parallel size. For each, the smallest number of
replicas whose TTFT and TPOT meet the SLOs at a percentile, with no request timing out, is
found by doubling and then bisecting over full simulations (the percentile of a queueing
system falls as replicas are added, so the search is monotone in practice). Each candidate is
one point of :func:`kavier.analysis.sweep.run_points`, so candidates run in local worker
processes or on a Dask cluster. A candidate that cannot run (weights that do not fit the
GPUs, heads a degree cannot split) is reported with the reason, not dropped silently. With
expert parallelism the experts of every candidate are split over all its replicas × TP GPUs
(the replicas are the data-parallel ranks of one group); a one-GPU candidate holds every
expert, the same deployment as without it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from archive.arrow import to_numpy
from archive.errors import InputError
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from kavier.sim.prefix import PrefixCache
from kavier.sim.requests import timed_out
from kavier.sim.simulation import pool_blocks, simulate
from kavier.sim.sustainability import Sustainability


def _percentiles(point: dict, config, timing) -> tuple[dict, dict]:
    """One simulation: the summary and the SLO metrics at the point's percentile."""
    ttft, tpot = [], []

    def keep(t):
        ok = ~timed_out(t)
        ttft.append(to_numpy(t.column("ttft_s"))[ok])
        tpot.append(to_numpy(t.column("tpot_s"), np.float64)[ok])

    prefix = point["prefix"]
    cache = None if prefix is None else PrefixCache(prefix.config, prefix.content,
                                                    point["sessions"])
    sus = Sustainability(PowerModel.linear_for(timing.gpu),
                         gpus_per_replica=config.tensor_parallel_size)
    summary = simulate(point["table"], timing, config, point["block"], cache, sus, keep,
                       lambda b, p: None, point["slo_ttft_s"], point["slo_tpot_s"])
    values = {}
    for slo, name, parts in ((point["slo_ttft_s"], "ttft_s", ttft),
                             (point["slo_tpot_s"], "tpot_s", tpot)):
        if slo is not None:
            values[name] = float(np.nanpercentile(np.concatenate(parts), point["percentile"]))
    return summary, values


def _meets(point: dict, values: dict, summary: dict) -> bool:
    return summary["n_failed"] == 0 and all(
        values[name] <= point[f"slo_{name}"] for name in values)


def _misfit(timing, config, block_size: int) -> str | None:
    """Why the weights leave no room for a KV pool (:func:`pool_blocks`), or None."""
    try:
        pool_blocks(timing, config, block_size)
    except InputError as exc:
        return exc.message
    return None


def plan_candidate(point: dict) -> dict:
    """The smallest replica count of one candidate that meets the SLOs, and its cost.

    ``point``: ``llm``, ``gpu`` (specs), ``tensor_parallel_size``, ``params``, ``kv_cache``,
    ``timing_model``, ``config`` (EngineConfig), ``table``, ``block``, ``prefix``,
    ``sessions``, ``slo_ttft_s``, ``slo_tpot_s``, ``percentile``, ``max_replicas``,
    ``price_per_gpu_hour``.

    Returns
    -------
    dict
        ``gpu``, ``tensor_parallel_size``, ``replicas``, ``gpus``, the percentiles, the SLO
        attainment (share of requests meeting every SLO), GPU-hours, cost per run and per
        million tokens, ``tried`` (replicas → meets), and ``status``: ``ok``, ``misses``
        (even ``max_replicas`` miss) or why the candidate cannot run.
    """
    tp = point["tensor_parallel_size"]
    out = {"gpu": point["gpu"].name, "tensor_parallel_size": tp, "tried": {}}
    try:
        config = replace(point["config"], tensor_parallel_size=tp)
        results: dict[int, tuple] = {}
        misfit: str | None = None                # why the last count tried did not fit

        def meets(n: int) -> bool:
            at = replace(config, replicas=n)       # expert parallelism spans the replicas
            if at.enable_expert_parallel and n * tp == 1:   # one GPU holds every expert
                at = replace(at, enable_expert_parallel=False)
            timing = make_timing(point["timing_model"], point["llm"], point["gpu"],
                                 point["params"], point["kv_cache"], tp,
                                 at.expert_parallel_size, at.pipeline_parallel_size)
            nonlocal misfit
            misfit = _misfit(timing, at, point["block"]) if config.enable_expert_parallel else None
            if misfit:                           # more ranks hold fewer experts each
                out["tried"][n] = False
                return False
            summary, values = _percentiles(point, at, timing)
            results[n] = (summary, values)
            out["tried"][n] = _meets(point, values, summary)
            return out["tried"][n]

        low, high = 0, 1
        while not meets(high):
            low, high = high, high * 2
            if high > point["max_replicas"]:
                if misfit:
                    return {**out, "status": f"cannot run on {low} replicas: {misfit}"}
                return {**out, "status": f"misses with {low} replicas"}
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if meets(mid) else (mid, high)
    except InputError as exc:
        return {**out, "status": f"cannot run: {exc.message}"}
    summary, values = results[high]
    tokens = summary["n_input_tokens"] + summary["n_output_tokens"]
    cost = point["price_per_gpu_hour"] * summary["provisioned_gpu_hours"]
    return {**out, "status": "ok", "replicas": high,
            "gpus": high * tp * config.pipeline_parallel_size,
            **{f"p_{k}": v for k, v in values.items()},
            "slo_attainment": summary["goodput"], "gpu_hours": summary["gpu_hours"],
            "provisioned_gpu_hours": summary["provisioned_gpu_hours"],
            "comm_share": summary["comm_share"], "cost_per_run": cost,
            "cost_per_mtok": cost / tokens * 1e6 if tokens else None}


def ranked(results: list[dict]) -> list[dict]:
    """Candidates that meet the SLOs, cheapest per million tokens first, then the others."""
    ok = sorted((r for r in results if r["status"] == "ok"),
                key=lambda r: (r["cost_per_mtok"], r["gpus"]))
    return ok + [r for r in results if r["status"] != "ok"]
