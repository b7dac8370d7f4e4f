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
