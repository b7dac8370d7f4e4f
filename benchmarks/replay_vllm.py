"""Replay real vLLM serving runs in the simulation core and score it per request.

For each run in ``benchmarks/data/vllm-serving-llmservingsim/`` (vLLM 0.19, Llama-3.1-8B,
300 ShareGPT requests at about 10 req/s; see its README): the requests enter the engine at
their measured ``queued_ts`` (the front end is already behind them, so the request overhead is
0), with the run's ``max_num_seqs``, ``max_num_batched_tokens`` and, where recorded, its KV pool
(``num_gpu_blocks``); the library's GPU and LLM entries and the toolkit's default timing
parameters (uncalibrated). Measured as LLMServingSim scores it: TTFT = first_token − queued,
TPOT = (last_token − first_token) / (output_toks − 1), E2E = last_token − queued. Prints
per-request MAPE (scikit-learn's ``mean_absolute_percentage_error``) and the signed error of the
mean and p99, and the simulated preemptions. Prefix caching (on in the RTX 4090 run) is not
replayed: the copied request records carry no prompt tokens.

Run: ``python benchmarks/replay_vllm.py [--compute-efficiency X --memory-efficiency Y]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.metrics import mean_absolute_percentage_error

from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import TimingParams, make_timing
from kavier.sim.config import EngineConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability

DATA = Path(__file__).parent / "data" / "vllm-serving-llmservingsim"
RUNS = {"RTXPRO6000_Llama-3.1-8B": "RTX-PRO-6000", "RTX4090_Llama-3.1-8B": "RTX-4090"}


def measured(folder: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]
    get = {k: np.array([r[k] for r in rows], np.float64) for k in (
        "input_toks", "output_toks", "queued_ts", "first_token_ts", "last_token_ts")}
    out = get["output_toks"]
    return {"n_in": get["input_toks"].astype(np.int64), "n_out": out.astype(np.int64),
            "arrival_s": get["queued_ts"] - get["queued_ts"].min(),
            "ttft_s": get["first_token_ts"] - get["queued_ts"],
            "tpot_s": np.where(out > 1, (get["last_token_ts"] - get["first_token_ts"])
                               / np.maximum(out - 1, 1), np.nan),
            "e2e_s": get["last_token_ts"] - get["queued_ts"]}


def replay(folder: Path, gpu: str, params: TimingParams) -> tuple[dict, dict]:
    meta = json.loads((folder / "meta.json").read_text())
    engine = meta["engine_kwargs"]
    m = measured(folder)
    timing = make_timing("roofline", llm_library().get("Llama-3.1-8B"), gpu_library().get(gpu),
                         params)
    config = EngineConfig(max_num_seqs=engine["max_num_seqs"],
                          max_num_batched_tokens=engine["max_num_batched_tokens"],
                          num_gpu_blocks=meta.get("kv_cache", {}).get("num_gpu_blocks"))
    table = pa.table({"n_input_tokens": m["n_in"], "n_output_tokens": m["n_out"],
                      "arrival_s": m["arrival_s"]})
    sus = Sustainability(PowerModel.linear_for(timing.gpu))
    tables = []
    summary = simulate(table, timing, config, meta.get("kv_cache", {}).get("block_size", 16),
                       None, sus, tables.append, lambda b, p: None)
    sim = tables[0].to_pydict()
    return m, {"summary": summary, **{k: np.array(sim[k], np.float64)
                                      for k in ("ttft_s", "tpot_s", "e2e_s")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-efficiency", type=float, default=None)
    parser.add_argument("--memory-efficiency", type=float, default=None)
    args = parser.parse_args()
    params = TimingParams(request_overhead_s=0.0)
    if args.compute_efficiency is not None:
        params = params.with_(compute_efficiency=args.compute_efficiency)
    if args.memory_efficiency is not None:
        params = params.with_(memory_efficiency=args.memory_efficiency)
    print(f"timing parameters: compute_efficiency={params.compute_efficiency}, "
          f"memory_efficiency={params.memory_efficiency}, request_overhead_s=0 (uncalibrated)")
    for name, gpu in RUNS.items():
        m, s = replay(DATA / name, gpu, params)
        print(f"{name} on {gpu}: simulated preemptions {s['summary']['preemptions']:,}, "
              f"makespan {s['summary']['makespan_s']:.1f} s")
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            ok = ~np.isnan(m[metric]) & ~np.isnan(s[metric]) & (m[metric] > 0)
            mape = 100 * mean_absolute_percentage_error(m[metric][ok], s[metric][ok])
            mean_err = 100 * (s[metric][ok].mean() / m[metric][ok].mean() - 1)
            p99_err = 100 * (np.percentile(s[metric][ok], 99) / np.percentile(m[metric][ok], 99)
                             - 1)
            print(f"  {metric[:-2].upper():<5} per-request MAPE {mape:7.1f} %   mean "
                  f"{mean_err:+7.1f} %   p99 {p99_err:+7.1f} %   (measured mean "
                  f"{m[metric][ok].mean():.4g} s)")


if __name__ == "__main__":
    main()
