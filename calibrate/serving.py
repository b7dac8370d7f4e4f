"""Calibrate the step-time model on a serving run under load, and predict serving runs.

A serving run (:mod:`archive.serving`) is replayed in the simulation core
(:func:`kavier.sim.simulation.simulate`): its requests enter at their measured arrivals, with
the run's engine configuration (``max_num_seqs``, ``max_num_batched_tokens``, chunked prefill,
block size, the KV pool's ``num_gpu_blocks`` where recorded, else sized from GPU memory) and,
when the run had prefix caching on and recorded its prompts, vLLM's block-level prefix cache in
the same pool. The replay is scored per request on TTFT, TPOT and E2E.

Fitting
-------
The timing parameters named in ``fit`` (default :data:`SERVING_FIT_PARAMS`) are fitted by
minimising the mean of the three per-request MAPEs (thesis eq. 2.26) over the *fit requests*:
those arriving in the first ``split`` share of the run. The rest are held out: the replay
still simulates every request (arrivals and sizes are inputs a predictor has), but no held-out
latency takes part in the fit. Bounds keep the fit physical: efficiencies in
``[0.05, max_efficiency]`` (0.95 by default: no kernel streams or computes at its data sheet's
peak), overheads positive. A parameter that ends within 1 % of a bound (or an overhead at ~0) is
reported, since the data then did not pin it down. The optimiser is scipy's Nelder-Mead in
coordinates that map onto those ranges (:class:`_Space`); the objective is piecewise constant
in places — a request joins one step or the next — so a gradient method would stall.

With engine timestamps (``engine.timestamps == "engine"``: vLLM's own ``queued_ts``) the API
server's HTTP and tokenization are not in the latencies, so ``request_overhead_s`` is 0 and
cannot be fitted; with client timestamps it is a parameter like the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.optimize import minimize
from sklearn.metrics import mean_absolute_percentage_error

from archive.errors import InputError
from archive.serving import ServingRun
from archive.traces import PromptContent
from kavier.models.library import (
    gpu_library,
    llm_library,
    with_kv_cache_dtype,
)
from kavier.models.power import PowerModel
from kavier.models.timing import (
    ROOFLINE_DEFAULTS,
    RooflineTiming,
    TimingParams,
    default_params,
    make_timing,
)
from kavier.sim.config import EngineConfig
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability

SERVING_FIT_PARAMS = ("compute_efficiency", "memory_efficiency", "kv_memory_efficiency",
                      "batch_step_overhead_s", "batch_seq_overhead_s")
"""Parameters fitted on a serving run by default: what a run under load identifies (prefill
chunks identify compute, small and large batches separate weight from KV streaming, the step
count and batch sizes the two overheads)."""
FITTABLE = SERVING_FIT_PARAMS + ("request_overhead_s", "token_overhead_s", "prefill_floor_s",
                                 "attention_efficiency", "allreduce_latency_s",
                                 "link_efficiency", "compute_half_tokens", "prefill_sharpness")
METRICS = ("ttft_s", "tpot_s", "e2e_s")


@dataclass(frozen=True)
class Replay:
    """A serving run set up for the simulation core.

    Attributes
    ----------
    run : ServingRun
    timing : RooflineTiming
        The library model and GPU with ``params`` (``request_overhead_s`` 0 for engine
        timestamps).
    config : EngineConfig
    block_size : int
    prefix_content : PromptContent or None
        The prompts' block hashes when the run had prefix caching on (each replay starts
        from an empty cache).
    phase_draws : int
        Replays whose per-request latencies :meth:`predict` averages (1: the replay itself;
        :meth:`expected`).
    """

    run: ServingRun
    timing: RooflineTiming
    config: EngineConfig
    block_size: int
    prefix_content: PromptContent | None
    phase_draws: int = 1

    def with_params(self, params: TimingParams) -> Replay:
        """The same replay with other timing parameters."""
        timing = make_timing("roofline", self.timing.llm, self.timing.gpu, self._own(params),
                             True, self.config.tensor_parallel_size,
                             self.config.expert_parallel_size,
                             self.config.pipeline_parallel_size)
        return replace(self, timing=timing)

    def with_arrivals(self, arrival_s: np.ndarray) -> Replay:
        """The same replay with the requests sent at ``arrival_s`` (s, one per request, in the
        run's row order)."""
        requests = self.run.requests.assign(arrival_s=np.asarray(arrival_s, np.float64))
        return replace(self, run=replace(self.run, requests=requests))

    def _own(self, params: TimingParams) -> TimingParams:
        if self.run.engine["timestamps"] == "engine":
            return params.with_(request_overhead_s=0.0)
        return params

    def predict(self) -> tuple[pd.DataFrame, dict, pa.Table]:
        """Simulate the run: per-request predictions (the ``requests.parquet`` columns, in
        the run's row order), the summary, and the GPU timeline (``steps.parquet``). With
        ``phase_draws`` above 1 the TTFT, TPOT and E2E columns are :meth:`expected`'s; the
        rest of the record, the summary and the timeline are the replay's own."""
        predicted, summary, steps = self._simulate()
        if self.phase_draws > 1 and steps is not None and steps.num_rows:
            predicted = self.expected(predicted, steps)
        return predicted, summary, steps

    def expected(self, predicted: pd.DataFrame, steps: pa.Table) -> pd.DataFrame:
        """``predicted`` with each request's TTFT, TPOT and E2E replaced by their mean over
        ``phase_draws`` replays: this one and ``phase_draws − 1`` with every arrival moved by
        an independent uniform draw in ``[−½, ½)`` of the median step (fixed seeds, so a fit's
        loss stays deterministic; an arrival is kept at or after 0).

        A step-level replay knows when a request reached the engine, not where in the step in
        flight it landed, and the real run's steps do not line up with the replay's. One
        replay predicts a request's latency for one such phase, which per request is as far
        from the measured phase as two draws are from each other (:func:`phase_floor`); the
        mean over phases is the latency the model expects given what the replay knows, and
        is what per-request errors should be scored on (docs/calibration.md, "Expected
        latency over the arrival phase"). NaN where a request failed in every draw.
        """
        step_s = float(np.median(steps.column("duration_s").to_numpy()))
        arrival = self.run.requests["arrival_s"].to_numpy(np.float64)
        one = replace(self, phase_draws=1)
        draws = [predicted[list(METRICS)].to_numpy(np.float64)]
        for k in range(1, self.phase_draws):
            shift = np.random.default_rng([PHASE_DRAW_SEED, k]).uniform(-step_s / 2.0,
                                                                        step_s / 2.0,
                                                                        arrival.size)
            moved, _, _ = one.with_arrivals(np.maximum(arrival + shift, 0.0)).predict()
            draws.append(moved[list(METRICS)].to_numpy(np.float64))
        with warnings.catch_warnings():       # a request that failed in every draw: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(np.stack(draws), axis=0)
        return predicted.assign(**{m: mean[:, j] for j, m in enumerate(METRICS)})

    def _simulate(self) -> tuple[pd.DataFrame, dict, pa.Table]:
        prefix = (None if self.prefix_content is None else PrefixCache(
            PrefixCacheConfig("blocks", block_size=self.block_size), self.prefix_content,
            None))
        r = self.run.requests
        table = pa.table({"n_input_tokens": r["n_input_tokens"].to_numpy(np.int64),
                          "n_output_tokens": r["n_output_tokens"].to_numpy(np.int64),
                          "arrival_s": r["arrival_s"].to_numpy(np.float64)})
        requests, steps = [], []
        summary = simulate(table, self.timing, self.config, self.block_size, prefix,
                           Sustainability(PowerModel.linear_for(self.timing.gpu),
                                          gpus_per_replica=self.config.tensor_parallel_size),
                           requests.append, lambda b, _p: steps.append(b))
        predicted = pa.concat_tables(requests).to_pandas().sort_values("id")
        return (predicted.reset_index(drop=True), summary,
                pa.Table.from_batches(steps) if steps else None)


EXPECTED_DRAWS = 16
"""Phase draws of the expected-latency rows a one-draw calibration adds to its report
(:attr:`ServingCalibration.expected`): on the bundled MoE run the held-out TTFT MAPE is
within 0.3 points of its 64-draw value there (docs/calibration.md)."""

PHASE_DRAW_SEED = 20261204
"""First word of the seed of :meth:`Replay.expected`'s arrival shifts (the draw's index is
the second), apart from :func:`phase_floor`'s seeds."""


ASYNC_SCHEDULING_SINCE = (0, 14)
"""The vLLM release that made async scheduling its default (v0.14.0, January 2026: the vLLM
roadmap's "async scheduling on by default", PR 27614; PR 31998 extended it to speculative
decoding)."""


def async_scheduling(engine: dict) -> bool:
    """Whether the run's engine scheduled one step ahead: its recorded ``async_scheduling``,
    else vLLM's default for its ``version`` (on from :data:`ASYNC_SCHEDULING_SINCE`; off for
    another engine or an unknown version)."""
    if engine.get("async_scheduling") is not None:
        return bool(engine["async_scheduling"])
    if str(engine.get("name", "vLLM")).lower() != "vllm":
        return False
    try:
        version = tuple(int(p) for p in str(engine.get("version")).split(".")[:2])
    except ValueError:
        return False
    return version >= ASYNC_SCHEDULING_SINCE


UNMODELLED_ENGINE = {
    "quantization": ((None,), "quantized weights"),
    "dtype": ((None, "auto", "bfloat16", "float16", "half", "torch.bfloat16", "torch.float16"),
              "weights in another dtype than 16-bit"),
}
"""Engine settings a replay cannot follow (vLLM's argument names → the values it can, and what
another value means): the library's models hold 2-byte weights, so a run with quantized
weights would be replayed as another engine. ``kv_cache_dtype`` is followed where
:data:`~kavier.models.library.KV_CACHE_DTYPES` models it and refused otherwise, by
:func:`~kavier.models.library.with_kv_cache_dtype` itself."""


def _refuse_unmodelled_engine(run: ServingRun) -> None:
    for key, (fine, what) in UNMODELLED_ENGINE.items():
        value = run.engine.get(key)
        if (value.lower() if isinstance(value, str) else value) not in fine:
            raise InputError(f"{key} {value!r}: {what} is not modelled, so the replay would "
                             "simulate another engine", path=run.path, field=f"engine.{key}")


def replay_for(run: ServingRun, params: TimingParams | None = None,
               llm_lib: str | Path | None = None, gpu_lib: str | Path | None = None) -> Replay:
    """Set ``run`` up for the simulation core with the library's LLM and GPU entries (plus
    those of the TOML/JSON files ``llm_lib`` and ``gpu_lib``, for a model or GPU the bundled
    library lacks) and ``params`` (default :func:`~kavier.models.timing.default_params`).

    The run's tensor- and pipeline-parallel sizes become the replica's, its scheduling mode
    :func:`async_scheduling`'s, its data-parallel size the number
    of replicas (least-outstanding routing, as vLLM's internal data-parallel load balancer),
    and expert parallelism splits the experts over all of their GPUs.

    Raises
    ------
    InputError
        For a model or GPU the library does not know, a parallel layout it rejects, prompts
        hashed with another block size than the engine's, or an engine setting the
        simulator does not model (:data:`UNMODELLED_ENGINE`: quantized weights; a KV-cache
        dtype outside :data:`~kavier.models.library.KV_CACHE_DTYPES`).
    """
    engine = run.engine
    _refuse_unmodelled_engine(run)
    llm = with_kv_cache_dtype(llm_library(llm_lib).get(engine["llm"]),
                              engine.get("kv_cache_dtype"), run.path, "engine.kv_cache_dtype")
    gpu = gpu_library(gpu_lib).get(engine["gpu"])
    block = engine["block_size"]
    config = EngineConfig(replicas=engine.get("data_parallel_size") or 1,
                          tensor_parallel_size=engine["tensor_parallel_size"],
                          pipeline_parallel_size=engine.get("pipeline_parallel_size") or 1,
                          async_scheduling=async_scheduling(engine),
                          enable_expert_parallel=bool(engine.get("enable_expert_parallel")),
                          max_num_seqs=engine["max_num_seqs"],
                          max_num_batched_tokens=engine["max_num_batched_tokens"],
                          chunked_prefill=bool(engine["enable_chunked_prefill"]),
                          num_gpu_blocks=engine["num_gpu_blocks"],
                          gpu_memory_utilization=engine.get("gpu_memory_utilization") or 0.9)
    content = run.content() if engine["enable_prefix_caching"] else None
    if content is not None and content.block_size != block:
        raise InputError(f"hash_ids cover {content.block_size}-token blocks, the engine's are "
                         f"{block}", path=run.path, field="hash_block_size")
    replay = Replay(run, make_timing("roofline", llm, gpu, None, True,
                                     config.tensor_parallel_size,
                                     config.expert_parallel_size,
                                     config.pipeline_parallel_size), config, block, content)
    return replay.with_params(params or default_params("roofline", gpu))


def measured(run: ServingRun) -> pd.DataFrame:
    """The run's measured TTFT, TPOT and E2E per request (NaN where not defined or failed)."""
    out = run.requests[list(METRICS)].astype(np.float64).copy()
    out[~run.ok] = np.nan
    return out


def fit_mask(run: ServingRun, split: float) -> np.ndarray:
    """Requests arriving in the first ``split`` share of the run's arrival span: the fit set.

    Raises
    ------
    InputError
        When ``split`` is not in (0, 1].
    """
    if not 0.0 < split <= 1.0:
        raise InputError(f"must be in (0, 1], got {split}", field="--split")
    arrival = run.requests["arrival_s"].to_numpy()
    cut = arrival.min() + split * (arrival.max() - arrival.min())
    return arrival <= cut if split < 1.0 else np.ones(arrival.size, bool)


def _percent_errors(true: np.ndarray, pred: np.ndarray) -> dict:
    ok = np.isfinite(true) & np.isfinite(pred) & (true > 0)
    t, p = true[ok], pred[ok]
    if not t.size:
        return {"n": 0}
    out = {"n": int(t.size), "mape_pct": 100 * float(mean_absolute_percentage_error(t, p)),
           "mean_error_pct": float((p.mean() / t.mean() - 1) * 100),
           "measured_mean_s": float(t.mean()), "predicted_mean_s": float(p.mean())}
    for q in (50, 90, 99):
        out[f"p{q}_error_pct"] = float((np.percentile(p, q) / np.percentile(t, q) - 1) * 100)
    return out


def score(true: pd.DataFrame, pred: pd.DataFrame, mask: np.ndarray) -> dict:
    """Per metric (``ttft_s``, ``tpot_s``, ``e2e_s``) over the requests in ``mask``: MAPE and
    signed errors of the mean, p50, p90 and p99, in %, and the count scored."""
    return {m: _percent_errors(true[m].to_numpy()[mask], pred[m].to_numpy()[mask])
            for m in METRICS}


def itl_scores(run: ServingRun, predicted: pd.DataFrame, summary: dict) -> dict:
    """Inter-token latencies of the whole run, measured vs simulated: the token-weighted mean
    (``Σ (last − first token) / Σ (n_out − 1)``, exact on both sides) and, where the run
    recorded every gap (``itl_s``), its p50, p90 and p99 against the simulation's (its
    quantile sketch); signed errors in %. ITL has no per-request MAPE: it is per token."""
    ok = run.ok & (run.requests["n_output_tokens"].to_numpy() > 1)
    r, p = run.requests[ok], predicted[ok]
    gaps = (r["n_output_tokens"] - 1).sum()
    measured = {"mean": float((r["e2e_s"] - r["ttft_s"]).sum() / gaps) if gaps else None}
    simulated = {"mean": float((p["e2e_s"] - p["ttft_s"]).sum() / gaps) if gaps else None}
    lists = r["itl_s"].dropna()
    values = np.concatenate([np.asarray(v, np.float64) for v in lists]) if len(lists) else []
    for q in (50, 90, 99):
        measured[f"p{q}"] = float(np.percentile(values, q)) if len(values) else None
        simulated[f"p{q}"] = summary.get(f"p{q}_itl_s") if len(values) else None
    error = {k: (simulated[k] / measured[k] - 1) * 100 if measured[k] and simulated[k]
             is not None else None for k in measured}
    return {"measured_s": measured, "predicted_s": simulated, "error_pct": error}


PHASE_SEEDS = 3
"""Replays :func:`phase_floor` averages over."""


def phase_floor(replay: Replay, predicted: pd.DataFrame, steps: pa.Table | None,
                mask: np.ndarray, seeds: int = PHASE_SEEDS) -> dict | None:
    """The per-request error that step phase alone makes: :func:`score` of ``predicted``
    (the replay's own prediction, or its :meth:`Replay.expected` latencies when the replay
    averages phase draws) against single replays with every arrival moved later by an
    independent uniform draw in [0, one median step), averaged over ``seeds`` draws. For an
    expected latency this is what a model right in expectation scores against one phase.

    A step-level simulator cannot know where in the engine's step each real request
    arrived, so a request that waits for the step in flight, or for a slot, may start one
    step earlier or later than it did. When TTFT is a few steps long that phase is tens of
    percent of it, and a per-request MAPE near this floor is not a property of the model
    (it is the spread phase makes, not a strict bound: a replay can land closer by chance).
    The shift keeps the workload's statistics (rate and sizes).

    Returns
    -------
    dict or None
        :func:`score`'s dict over ``mask``, each metric's ``mape_pct`` and signed errors
        averaged over the draws (``n`` the count scored); None when the replay ran no step.
    """
    if steps is None or not steps.num_rows:
        return None
    step_s = float(np.median(steps.column("duration_s").to_numpy()))
    arrival = replay.run.requests["arrival_s"].to_numpy(np.float64)
    one = replace(replay, phase_draws=1)
    draws = []
    for seed in range(seeds):
        shift = np.random.default_rng(seed).uniform(0.0, step_s, arrival.size)
        moved, _, _ = one.with_arrivals(arrival + shift).predict()
        draws.append(score(predicted, moved, mask))
    return {m: {k: (v if k == "n" else float(np.mean([d[m][k] for d in draws])))
                for k, v in draws[0][m].items()} for m in METRICS}


def objective(s: dict) -> float:
    """The fitted loss: the mean of the per-metric MAPEs, %."""
    return float(np.mean([s[m]["mape_pct"] for m in METRICS if s[m]["n"]]))


SCALES_S = {"batch_step_overhead_s": 1e-3, "batch_seq_overhead_s": 1e-5,
            "token_overhead_s": 1e-5, "request_overhead_s": 1e-2, "prefill_floor_s": 1e-2,
            "allreduce_latency_s": 1e-5, "compute_half_tokens": 100.0, "prefill_sharpness": 1.0}
"""Typical size of each overhead, s (``compute_half_tokens`` in tokens, ``prefill_sharpness``
its excess over :data:`LOWER`): the optimiser works in ``log((value − lower) / scale)``, so a
parameter of 10 µs and one of 10 ms move alike."""
LOWER = {"prefill_sharpness": 1.0}
"""Lowest value of a parameter of :data:`SCALES_S` (0 where not named): the soft maximum's
exponent is at least 1, the sum of compute and memory time."""


class _Space:
    """The optimiser's unbounded coordinates ``z`` and the parameters they stand for: an
    efficiency is ``lo + (hi − lo) · sigmoid(z)`` in ``[0.05, max_efficiency]``, an overhead
    ``lower + scale · exp(z)`` (above :data:`LOWER`, 0 for an overhead, 1 for the soft
    maximum's exponent; it reaches the lower end in the limit)."""

    def __init__(self, fit: tuple[str, ...], max_efficiency: float) -> None:
        self.fit, self.hi = fit, max_efficiency

    def value(self, name: str, z: float) -> float:
        if name.endswith("efficiency"):      # link_efficiency too: a share of a peak
            return float(0.05 + (self.hi - 0.05) / (1.0 + np.exp(-z)))
        return LOWER.get(name, 0.0) + SCALES_S[name] * float(np.exp(np.clip(z, -30.0, 30.0)))

    def coordinate(self, name: str, value: float) -> float:
        if name.endswith("efficiency"):
            share = np.clip((value - 0.05) / (self.hi - 0.05), 0.02, 0.98)
            return float(np.log(share / (1.0 - share)))
        scale = SCALES_S[name]
        return float(np.log(max(value - LOWER.get(name, 0.0), 0.1 * scale) / scale))

    def on_bound(self, name: str, value: float) -> bool:
        """Within 1 % of the top of an efficiency's range, or any other parameter at ~its
        lower end (an overhead at ~0, the soft maximum's exponent at ~1)."""
        if name.endswith("efficiency"):
            return self.hi - value <= 0.01 * (self.hi - 0.05) or value <= 0.06
        return value - LOWER.get(name, 0.0) <= 0.01 * SCALES_S[name]


def _effective(timing: RooflineTiming, name: str) -> float | None:
    """The value parameter ``name`` has in ``timing``'s model: its own, or for None what
    the model uses in its place (the link's latency or efficiency; the weights' efficiency
    for the KV's, the matmuls' for attention's); None only for ``prefill_sharpness`` (the
    hard maximum)."""
    params = timing.params
    value = getattr(params, name)
    if value is not None or name == "prefill_sharpness":
        return value
    link = timing.tp_link if timing.tensor_parallel_size > 1 else timing.ep_link
    if name == "allreduce_latency_s":
        return link.latency_s
    if name == "link_efficiency":
        return link.efficiency
    if name.startswith("kv"):
        return params.memory_efficiency
    return params.compute_efficiency if name.endswith("efficiency") else 0.0


def _start(timing: RooflineTiming, name: str) -> float:
    value = _effective(timing, name)
    if value is None:                                        # hard max: start at the default
        value = ROOFLINE_DEFAULTS.prefill_sharpness
    if name == "compute_half_tokens" and not value:
        value = SCALES_S[name]   # off (0): start at a GEMM tile's size, where its effect shows
    return float(value)


@dataclass
class ServingFit:
    """What :func:`fit_serving` found.

    Attributes
    ----------
    params : TimingParams
        The fitted parameters.
    fitted : tuple of str
    before, after : dict
        :func:`score` on the fit requests, held out and on all requests, before (the starting
        parameters) and after the fit: ``{"fit": {...}, "heldout": {...}, "all": {...}}``.
    on_bound : list of str
        Fitted parameters within 1 % of a bound.
    evaluations : int
        Replays the optimiser ran.
    """

    params: TimingParams
    fitted: tuple
    before: dict
    after: dict
    on_bound: list
    evaluations: int


def fit_serving(replay: Replay, fit: tuple[str, ...] = SERVING_FIT_PARAMS, split: float = 0.5,
                max_efficiency: float = 0.95, max_evaluations: int = 400) -> ServingFit:
    """Fit ``fit`` on the requests arriving in the first ``split`` of the run.

    Raises
    ------
    InputError
        For a parameter that cannot be fitted (unknown, or ``request_overhead_s`` with engine
        timestamps), a bad ``max_efficiency``, or no fit requests.
    """
    unknown = [p for p in fit if p not in FITTABLE]
    if unknown or not fit:
        raise InputError(f"cannot fit {unknown or 'nothing'}; choose from {', '.join(FITTABLE)}",
                         field="--fit")
    if "request_overhead_s" in fit and replay.run.engine["timestamps"] == "engine":
        raise InputError("the run's latencies start at the engine's queue (engine timestamps), "
                         "so they hold no front-end time to fit", field="--fit")
    timing = replay.timing
    if ({"allreduce_latency_s", "link_efficiency"} & set(fit)
            and timing.tensor_parallel_size == timing.expert_parallel_size == 1):
        raise InputError("the run has no collectives (tensor and expert parallel size 1), so "
                         "it holds no allreduce_latency_s or link_efficiency to fit",
                         field="--fit")
    if not 0.05 < max_efficiency <= 1.0:
        raise InputError(f"must be in (0.05, 1], got {max_efficiency}", field="--max-efficiency")
    mask = fit_mask(replay.run, split)
    true = measured(replay.run)
    if not (mask & replay.run.ok).any():
        raise InputError("no successful requests in the fit share of the run", field="--split")
    space = _Space(tuple(fit), max_efficiency)
    start = replay.timing.params
    z0 = np.array([space.coordinate(p, _start(replay.timing, p)) for p in fit])
    count, at_start = [0], []

    def params_at(z) -> TimingParams:
        return start.with_(**{p: space.value(p, v) for p, v in zip(fit, z, strict=True)})

    def loss(z) -> float:
        count[0] += 1
        pred, _, _ = replay.with_params(params_at(z)).predict()
        value = objective(score(true, pred, mask))
        if not at_start:                    # Nelder-Mead evaluates the start first
            at_start.append(value)
        return value

    def scores(params) -> dict:
        pred, _, _ = replay.with_params(params).predict()
        return {"fit": score(true, pred, mask), "heldout": score(true, pred, ~mask),
                "all": score(true, pred, np.ones(mask.size, bool))}

    # Nelder-Mead, restarted from its best point with a fresh simplex while that still
    # improves and evaluations remain: a replay's losses jump where a request's admission moves
    # by a step, and a collapsed simplex stalls on such an edge
    best_z, best = z0, np.inf
    while count[0] < max_evaluations:
        simplex = np.vstack([best_z] + [best_z + np.eye(len(fit))[i] for i in range(len(fit))])
        result = minimize(loss, best_z, method="Nelder-Mead",
                          options={"maxfev": max_evaluations - count[0],
                                   "initial_simplex": simplex, "xatol": 1e-2, "fatol": 1e-2})
        if result.fun >= best:
            break
        best_z, best = result.x, result.fun
    # no better point found: keep the start itself (its coordinates' round trip is inexact),
    # each fitted parameter at the value the model used for it (not None: a link's own)
    params = params_at(best_z) if best < at_start[0] else start.with_(**{
        p: v for p in fit if (v := _effective(replay.timing, p)) is not None})
    on_bound = [p for p in fit          # the hard maximum (prefill_sharpness None): no bound
                if getattr(params, p) is not None and space.on_bound(p, getattr(params, p))]
    return ServingFit(params, tuple(fit), scores(start), scores(params), on_bound, count[0])


@dataclass
class ServingCalibration:
    """Everything :func:`calibrate_serving` computed, for the report and the profile.

    Attributes
    ----------
    run : ServingRun
    fit : ServingFit
    measured, predicted : pandas.DataFrame
        Measured TTFT/TPOT/E2E (:func:`measured`) and the calibrated replay's request record.
    mask : ndarray of bool
        The fit requests (:func:`fit_mask`).
    summary : dict
        The calibrated replay's run summary.
    steps : pyarrow.Table or None
        Its GPU timeline.
    predicted_runs : dict
        Dataset name → :func:`score` of every request of another run predicted with the
        fitted parameters.
    itl : dict
        :func:`itl_scores` of the calibrated replay.
    floor : dict or None
        :func:`phase_floor` of the calibrated replay on the held-out requests.
    expected : dict or None
        With one phase draw: the held-out :func:`score` of the calibrated parameters'
        expected latencies over :data:`EXPECTED_DRAWS` arrival phases (:meth:`Replay.expected`)
        and that prediction's floor, ``{"draws", "heldout", "floor"}``; None with more draws
        (the rows above are already that) or no step.
    """

    run: ServingRun
    fit: ServingFit
    measured: pd.DataFrame
    predicted: pd.DataFrame
    mask: np.ndarray
    summary: dict
    steps: pa.Table | None
    predicted_runs: dict
    itl: dict
    floor: dict | None
    expected: dict | None = None


def calibrate_serving(dataset: str, fit: tuple[str, ...] = SERVING_FIT_PARAMS,
                      split: float = 0.5, max_efficiency: float = 0.95,
                      max_evaluations: int = 400, predict: tuple[str, ...] = (),
                      start: TimingParams | None = None,
                      phase_draws: int = 1, llm_lib: str | Path | None = None,
                      gpu_lib: str | Path | None = None) -> ServingCalibration:
    """Fit on ``dataset`` (:func:`fit_serving`) from ``start`` (default
    :func:`kavier.models.timing.default_params`), then replay it and every run in
    ``predict`` with the fitted parameters; every replay's latencies are the mean over
    ``phase_draws`` arrival phases (:meth:`Replay.expected`; 1: the replay's own).
    ``llm_lib``, ``gpu_lib``: extra library entries (:func:`replay_for`).

    Raises
    ------
    InputError
        As :func:`read_serving`, :func:`replay_for` and :func:`fit_serving`, and for
        ``phase_draws`` below 1.
    """
    from archive.serving import read_serving

    if phase_draws < 1:
        raise InputError(f"must be at least 1, got {phase_draws}", field="--phase-draws")
    run = read_serving(dataset)
    others = [(name, read_serving(name)) for name in predict]
    replay = replace(replay_for(run, start, llm_lib, gpu_lib), phase_draws=phase_draws)
    result = fit_serving(replay, fit, split, max_efficiency, max_evaluations)
    calibrated = replay.with_params(result.params)
    predicted, summary, steps = calibrated.predict()
    scored = {}
    for name, other in others:
        pred, _, _ = replace(replay_for(other, result.params, llm_lib, gpu_lib),
                             phase_draws=phase_draws).predict()
        scored[name] = score(measured(other), pred, np.ones(len(pred), bool))
    mask = fit_mask(run, split)
    floor = phase_floor(calibrated, predicted, steps, ~mask)   # the held-out rows' mask
    expected = None
    if phase_draws == 1 and steps is not None and steps.num_rows:
        many = replace(calibrated, phase_draws=EXPECTED_DRAWS)
        mean = many.expected(predicted, steps)
        expected = {"draws": EXPECTED_DRAWS, "heldout": score(measured(run), mean, ~mask),
                    "floor": phase_floor(many, mean, steps, ~mask)}
    return ServingCalibration(run, result, measured(run), predicted, mask, summary, steps,
                              scored, itl_scores(run, predicted, summary), floor, expected)
