"""Fit the batching overheads of the step model to measurements taken under concurrency.

``tracer collect --concurrency 1,4,16`` sends, at level ``c``, groups of ``c`` same-size
requests together. Each group is simulated as ``c`` requests arriving at once on one replica
with continuous batching (:func:`kavier.sim.simulation.simulate`), with the sequential
parameters already calibrated, and ``batch_step_overhead_s`` and ``batch_seq_overhead_s``
(:class:`kavier.models.timing.TimingParams`) are fitted so that the simulated end-to-end latencies
match the measured ones (MAPE, Nelder-Mead over the logarithms, both kept >= 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.optimize import minimize

from archive.errors import InputError
from kavier.models.power import PowerModel
from kavier.models.timing import RooflineTiming, make_timing
from kavier.sim.config import EngineConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability

BATCH_PARAMS = ("batch_step_overhead_s", "batch_seq_overhead_s")
_GROUP = ["sweep", "n_input_tokens", "n_output_tokens_requested", "repetition", "concurrency"]


def concurrent_groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """The successful rows measured with ``concurrency > 1``, one frame per group sent
    together (same sweep, size, repetition and level)."""
    if "concurrency" not in df.columns:
        return []
    ok = df[(df["concurrency"] > 1) & (df.get("error", pd.Series(index=df.index)).isna())]
    return [g for _, g in ok.groupby(_GROUP, sort=True)]


def predict(groups: list[pd.DataFrame], timing: RooflineTiming) -> np.ndarray:
    """Simulated end-to-end latency of every row of ``groups`` (concatenated in order)."""
    out = []
    sus = Sustainability(PowerModel("constant", 0.0, 0.0))
    for g in groups:
        requests = pa.table({"n_input_tokens": g["n_input_tokens"].to_numpy(np.int64),
                             "n_output_tokens": g["n_output_tokens"].to_numpy(np.int64),
                             "arrival_s": np.zeros(len(g))})
        config = EngineConfig(max_num_seqs=max(256, len(g)), num_gpu_blocks=10**7)
        tables = []
        simulate(requests, timing, config, 16, None, sus, tables.append, lambda b, p: None)
        out.append(tables[0].column("e2e_s").to_numpy())
    return np.concatenate(out) if out else np.array([])


def fit_batching(df: pd.DataFrame, timing: RooflineTiming) -> tuple[RooflineTiming, dict]:
    """Fit the batching overheads; returns the timing with them and MAPE before and after.

    Raises
    ------
    InputError
        When the timing model is not the roofline model or there are no concurrent groups.
    """
    if not isinstance(timing, RooflineTiming):
        raise InputError("batching overheads need the roofline timing model",
                         field="timing-model")
    groups = concurrent_groups(df)
    if not groups:
        raise InputError("no rows measured with concurrency > 1 (tracer collect "
                         "--concurrency)", field="concurrency")
    measured = np.concatenate([g["latency_s"].to_numpy() for g in groups])

    def with_params(x) -> RooflineTiming:
        values = dict(zip(BATCH_PARAMS, np.exp(x) - 1e-6, strict=True))
        return make_timing("roofline", timing.llm, timing.gpu,
                           timing.params.with_(**{k: max(v, 0.0) for k, v in values.items()}),
                           timing.kv_cache)

    def mape(x) -> float:
        return float(np.mean(np.abs(predict(groups, with_params(x)) - measured) / measured)
                     * 100.0)

    before = mape(np.log(np.array([1e-6, 1e-6])))
    start = np.log(np.array([1e-3, 1e-4]))
    result = minimize(mape, start, method="Nelder-Mead",
                      options={"xatol": 1e-3, "fatol": 1e-4, "maxiter": 300})
    fitted = with_params(result.x)
    return fitted, {"mape_before_pct": before, "mape_after_pct": float(result.fun),
                    "groups": len(groups), "rows": int(measured.size),
                    **{k: getattr(fitted.params, k) for k in BATCH_PARAMS}}
