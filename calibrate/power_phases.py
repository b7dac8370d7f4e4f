"""Power against what the GPU was doing: a tracer dataset's GPU samples aligned with its
requests and their simulated costs.

``utilization.gpu`` alone cannot tell a memory-bound decode from a compute-bound prefill (both
read "100 %"), so the simulator evaluates its power model at the utilization each step *would*
show by its costs, ``u = min(cap, max(compute_s, φ · memory_s) / duration_s)``
(:func:`kavier.sim.timeline.power_utilization`), where ``φ`` — ``memory_bound_utilization`` —
is the share of ``P_max − P_idle`` a step bound by streaming weights and KV draws. Here ``φ``
is fitted to measurements: ``tracer collect`` tags every GPU sample with the request in flight,
so each single request's mean measured power can be set against the power the model predicts
for it — its prefill pass and its decode steps, each at its own utilization, weighted by their
durations — and ``φ`` and ``P_max`` chosen together to minimise the MAPE over requests
(Nelder-Mead; ``P_idle`` and the model's shape come from the utilization fit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from archive.errors import InputError
from calibrate.power import score_pct
from kavier.models.power import PowerModel
from kavier.sim.sustainability import MEMORY_BOUND_UTILIZATION
from kavier.sim.timeline import power_utilization

DEFAULT_PHI = MEMORY_BOUND_UTILIZATION
"""The simulator's default ``memory_bound_utilization`` (docs/sustainability.md)."""


def request_power(measurements: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Mean measured power per request that ran alone and has samples tagged with it.

    ``samples.request_id`` is the request's 0-based position in ``measurements`` (the order
    ``tracer collect`` logs them). Returns ``n_input_tokens``, ``n_output_tokens``, ``sweep``,
    ``power_w`` (mean of the request's samples) and ``samples`` per request.

    Raises
    ------
    InputError
        When no successful single request has a sample (sampling too coarse for the requests:
        lower ``--loop-ms`` or raise the sizes).
    """
    rows = measurements.reset_index(drop=True)
    alone = rows[(rows["concurrency"] == 1) & rows["error"].isna()]
    tagged = samples.dropna(subset=["request_id", "power_w"])
    power = tagged.groupby(tagged["request_id"].astype(np.int64))["power_w"].agg(["mean", "size"])
    joined = alone.join(power, how="inner")
    if joined.empty:
        raise InputError("no single request has a GPU sample tagged with it; sample faster "
                         "(--loop-ms) or measure longer requests", field="request_id")
    return pd.DataFrame({"n_input_tokens": joined["n_input_tokens"].to_numpy(np.float64),
                         "n_output_tokens": joined["n_output_tokens"].to_numpy(np.float64),
                         "sweep": joined["sweep"].to_numpy(), "power_w": joined["mean"].to_numpy(),
                         "samples": joined["size"].to_numpy(np.int64)})


def predicted_power(timing, model: PowerModel, n_in, n_out, phi: float,
                    cap: float = 1.0) -> np.ndarray:
    """Mean power of each request alone on the GPU, W: its prefill pass and its decode, each at
    the utilization :func:`~kavier.sim.timeline.power_utilization` gives their costs
    (``timing.request_costs``), weighted by duration."""
    prefill, decode = timing.request_costs(np.asarray(n_in, np.float64), 0,
                                           np.asarray(n_out, np.float64))
    energy = np.zeros(np.shape(n_in))
    for part in (prefill, decode):
        u = power_utilization(part.compute_s, part.memory_s, part.duration_s, phi, cap)
        energy = energy + model.power_w(u) * part.duration_s
    return energy / (prefill.duration_s + decode.duration_s)


def fit_memory_bound_utilization(per_request: pd.DataFrame, timing, model: PowerModel) -> dict:
    """``φ`` in [0, 1] and ``P_max`` fitted together to the measured per-request power (the
    MAPE of :func:`predicted_power`; ``P_idle`` and the shape stay the utilization fit's).

    ``P_max`` is refitted because the utilization fit cannot place it: a memory-bound decode
    reads "100 %" too, so that fit's ``P_max`` is an average of compute- and memory-bound
    power. Compute-bound requests (long prompts) pin ``P_max`` here, memory-bound ones
    (decode) ``φ``; both need to be in the sweep.

    Returns
    -------
    dict
        ``memory_bound_utilization``, ``max_w``, ``mape_pct``; ``mape_default_pct`` (the
        utilization fit's model at :data:`DEFAULT_PHI`, what the simulator would use
        without this fit); request and sample counts; measured and predicted mean power per
        sweep.
    """
    n_in, n_out = per_request["n_input_tokens"], per_request["n_output_tokens"]
    measured = per_request["power_w"].to_numpy(np.float64)

    def at(x) -> tuple[PowerModel, float]:
        top = model.idle_w + np.exp(x[0])
        return (PowerModel(model.name, model.idle_w, float(top), model.shape),
                float(1.0 / (1.0 + np.exp(-x[1]))))

    def mape(candidate: PowerModel, phi: float) -> float:
        return score_pct(predicted_power(timing, candidate, n_in, n_out, phi), measured)

    start = [np.log(max(model.max_w - model.idle_w, 1.0)), 0.0]
    best = minimize(lambda x: mape(*at(x)), start, method="Nelder-Mead",
                    options={"xatol": 1e-5, "fatol": 1e-8, "maxiter": 2000})
    fitted, phi = at(best.x)
    predicted = predicted_power(timing, fitted, n_in, n_out, phi)
    by_sweep = {sweep: {"measured_w": float(measured[mask].mean()),
                        "predicted_w": float(predicted[mask].mean()), "requests": int(mask.sum())}
                for sweep in sorted(set(per_request["sweep"]))
                for mask in [(per_request["sweep"] == sweep).to_numpy()]}
    return {"memory_bound_utilization": phi, "max_w": fitted.max_w,
            "mape_pct": mape(fitted, phi), "mape_default_pct": mape(model, DEFAULT_PHI),
            "requests": len(per_request), "samples": int(per_request["samples"].sum()),
            "by_sweep": by_sweep}


def serving_window_power(steps: pd.DataFrame, model: PowerModel, phi: float, sample_s,
                         window_s: float, cap: float = 1.0) -> np.ndarray:
    """Mean predicted power of one GPU over ``[t − window_s, t]`` for each sample time ``t``
    (s from the run's start), W: the simulated timeline ``steps`` (one replica's
    ``steps.parquet`` rows) at :func:`~kavier.sim.timeline.power_utilization` with ``φ`` =
    ``phi``, ``P_idle`` between steps and outside the run. Exact: cumulative energy is
    piecewise linear in time, so it is interpolated at the window's ends.

    The window is the sample's own: the sampling interval for an instantaneous reading
    (``power.draw.instant``), 1 s for ``power.draw``, which Ampere and newer GPUs average over
    one second (nvidia-smi's documentation of ``power.draw``).
    """
    start = steps["start_s"].to_numpy(np.float64)
    duration = steps["duration_s"].to_numpy(np.float64)
    u = power_utilization(steps["compute_s"], steps["memory_s"], duration, phi, cap)
    power = model.power_w(u)
    # breakpoints: each step's start and end; idle power in the gaps between them
    t = np.empty(2 * start.size + 1)
    t[0], t[1::2], t[2::2] = 0.0, start, start + duration
    gap = start - np.concatenate(([0.0], (start + duration)[:-1]))
    energy = np.empty_like(t)
    energy[0] = 0.0
    energy[1::2] = model.idle_w * np.maximum(gap, 0.0)
    energy[2::2] = power * duration
    energy = np.cumsum(energy)

    def cumulative(x):
        x = np.asarray(x, np.float64)
        inside = np.interp(x, t, energy)
        return inside + model.idle_w * (np.maximum(x - t[-1], 0.0) - np.maximum(-x, 0.0))

    sample_s = np.asarray(sample_s, np.float64)
    return (cumulative(sample_s) - cumulative(sample_s - window_s)) / window_s


def fit_serving_phases(steps: pd.DataFrame, sample_s, measured_w, model: PowerModel,
                       window_s: float) -> dict:
    """``φ`` and ``P_max`` fitted together to a serving run's GPU samples, each set against
    :func:`serving_window_power` of the run's simulated timeline (the replay of its
    arrivals, sizes and engine settings); ``P_idle`` and the shape stay the utilization fit's.
    Prefill-heavy steps pin ``P_max``, decode steps ``φ``, as in
    :func:`fit_memory_bound_utilization`.

    Returns
    -------
    dict
        ``memory_bound_utilization``, ``max_w``, ``mape_pct`` over the samples,
        ``mape_default_pct`` (the utilization fit's model at :data:`DEFAULT_PHI`), ``samples``
        and ``window_s``.
    """
    measured_w = np.asarray(measured_w, np.float64)

    def at(x) -> tuple[PowerModel, float]:
        top = model.idle_w + np.exp(x[0])
        return (PowerModel(model.name, model.idle_w, float(top), model.shape),
                float(1.0 / (1.0 + np.exp(-x[1]))))

    def mape(candidate: PowerModel, phi: float) -> float:
        return score_pct(serving_window_power(steps, candidate, phi, sample_s, window_s),
                         measured_w)

    start = [np.log(max(model.max_w - model.idle_w, 1.0)), 0.0]
    best = minimize(lambda x: mape(*at(x)), start, method="Nelder-Mead",
                    options={"xatol": 1e-5, "fatol": 1e-8, "maxiter": 2000})
    fitted, phi = at(best.x)
    return {"memory_bound_utilization": phi, "max_w": fitted.max_w,
            "mape_pct": mape(fitted, phi), "mape_default_pct": mape(model, DEFAULT_PHI),
            "samples": int(measured_w.size), "window_s": window_s}


def serving_sample_times(folder, samples: pd.DataFrame) -> np.ndarray:
    """Each GPU sample's time from a ``tracer bench`` run's start, s: its nvidia-smi timestamp
    (the node's local time; node and client clocks assumed in step, as NTP keeps them on a
    cluster) against the wall-clock send times in the run's ``requests.jsonl``.

    Raises
    ------
    InputError
        For a run without ``requests.jsonl`` send times (one not recorded by tracer bench).
    """
    from pathlib import Path

    from dateutil.tz import tzlocal

    from archive.importers.serving import json_lines

    log = Path(folder) / "requests.jsonl"
    starts = [r["send_unix_s"] - r["start_s"] for r in (json_lines(log) if log.is_file() else ())
              if "send_unix_s" in r and "start_s" in r]
    if not starts:
        raise InputError("no wall-clock send times (requests.jsonl with send_unix_s, as "
                         "tracer bench writes) to align the GPU samples with", path=folder)
    stamps = pd.to_datetime(samples["timestamp"])
    if stamps.dt.tz is None:
        stamps = stamps.dt.tz_localize(tzlocal())
    unix = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    return unix - float(np.median(starts))


def serving_phases(folder, run, samples: pd.DataFrame, model: PowerModel, params=None) -> dict:
    """:func:`fit_serving_phases` for a ``tracer bench`` serving run in ``folder``: its replay
    in the simulation core (:func:`calibrate.serving.replay_for` with ``params``, default the
    library's) sets the timeline, the samples inside the run are aligned with it
    (:func:`serving_sample_times`), the window is the sampling interval for
    ``power.draw.instant`` and 1 s for ``power.draw``.

    Raises
    ------
    InputError
        For a data-parallel run (which GPU served which rank is not recorded), no send
        times, or no sample inside the run.
    """
    from calibrate.serving import replay_for

    if (run.engine.get("data_parallel_size") or 1) > 1:
        raise InputError("a data-parallel run's samples cannot be matched to its ranks",
                         field="data_parallel_size")
    _, _, steps = replay_for(run, params).predict()
    steps = steps.to_pandas()
    sample_s = serving_sample_times(folder, samples)
    end = float((steps["start_s"] + steps["duration_s"]).max())
    inside = (sample_s >= 0) & (sample_s <= end)
    if not inside.any():
        raise InputError("no GPU sample lies inside the run (were the node's and this "
                         "machine's clocks apart?)", path=folder)
    instant = (samples["power_field"] == "power.draw.instant").all()
    gaps = np.diff(np.sort(sample_s[inside]))
    window = float(np.median(gaps[gaps > 0])) if instant and (gaps > 0).any() else 1.0
    result = fit_serving_phases(steps, sample_s[inside],
                                samples["power_w"].to_numpy(np.float64)[inside], model,
                                window)
    return {**result, "requests": int(run.ok.sum())}
