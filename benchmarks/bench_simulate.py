"""Speed and memory of ``kavier simulate`` on a Marconi-shaped workload (thesis 6.4, Table 6.9).

The thesis times its prototype on the aggregated Marconi trace: 96,870 requests of 3,000
sessions (32.29 turns each on average), about 500 A10 GPU-hours: 9.9 s at 1 s export, 92.8 s at
0.1 s, 914.8 s at 0.01 s. That trace is not redistributable here, so this script builds one of
the same shape, deterministically (seeded):

* 3,000 sessions; turns per session ``1 + Poisson(31.29)``; sessions start uniformly in the
  first hour, turns follow after exponential think times (mean 60 s);
* per turn a new prompt of ``LogNormal`` size (median 200 tokens) and an answer of ``LogNormal``
  size (median 256 tokens, at most 4,096); each turn's input is the whole conversation so far
  plus the new prompt (so inputs grow with history, as in multi-turn chat);
* about 0.96e9 input tokens in total, and about 480 GPU-hours for Llama-3-8B on an A10 with the
  thesis timing model.

Each configuration runs in a fresh process (so peak RSS is its own), in-process timing covers
simulation plus Parquet writing after imports and after building the workload. Run:
``python benchmarks/bench_simulate.py`` (all rates and the 1,000× task-level run) or
``python benchmarks/bench_simulate.py --rates 1 0.1``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from kavier.engine import Simulator, run
from kavier.library import gpu_library, llm_library
from kavier.output import run_folder
from kavier.run import ExportOptions, write_run
from kavier.timing import make_timing


def marconi_shaped(seed: int = 0, sessions: int = 3000) -> pd.DataFrame:
    """The Marconi-shaped workload described in the module docstring, sorted by arrival."""
    rng = np.random.default_rng(seed)
    turns = 1 + rng.poisson(31.29, sessions)
    session = np.repeat(np.arange(sessions), turns)
    first = np.repeat(np.cumsum(turns) - turns, turns)
    turn = np.arange(session.size) - first
    prompt = np.maximum(rng.lognormal(np.log(200), 0.8, session.size).astype(np.int64), 1)
    answer = np.clip(rng.lognormal(np.log(256), 0.7, session.size).astype(np.int64), 1, 4096)
    exchanged = np.cumsum(prompt + answer)
    before_session = np.where(first > 0, exchanged[first - 1], 0)
    history = exchanged - (prompt + answer) - before_session
    gaps = rng.exponential(60.0, session.size)
    waited = np.cumsum(gaps)
    arrival = np.repeat(rng.uniform(0, 3600, sessions), turns) + waited - waited[first]
    df = pd.DataFrame({"session_id": session, "turn_id": turn, "arrival_s": arrival,
                       "n_input_tokens": history + prompt, "n_output_tokens": answer})
    return df.sort_values("arrival_s", kind="stable", ignore_index=True)


def _simulator():
    timing = make_timing("thesis", llm_library().get("Llama-3-8B"), gpu_library().get("A10"))
    return Simulator(timing)


def one(rate: float | None, copies: int) -> dict:
    """Time one configuration in this process: ``rate`` None means task level only."""
    base = marconi_shaped()
    options = ExportOptions(export_rate_s=rate or 0.0, fragments=rate is not None,
                            opendc=rate is not None)
    sim = _simulator()
    with tempfile.TemporaryDirectory() as tmp, run_folder(tmp) as out:
        start = time.perf_counter()
        if copies == 1:
            chunks = run(base, sim)
        else:
            span = float(base["arrival_s"].max()) + 1.0
            chunks = (sim.step(base.assign(session_id=base["session_id"] + k * 3000,
                                           arrival_s=base["arrival_s"] + k * span),
                               np.arange(len(base)) + k * len(base)) for k in range(copies))
        rows = write_run(chunks, sim, out, options, len(base) * copies)
        wall = time.perf_counter() - start
    summary = sim.summary()
    return {"export_rate_s": rate, "copies": copies, "requests": summary["n_requests"],
            "input_tokens": summary["n_input_tokens"], "gpu_hours": summary["gpu_hours"],
            "wall_s": wall, "peak_rss_gib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2**20, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="*", type=float, default=[1.0, 0.1, 0.01])
    parser.add_argument("--copies", type=int, default=1000,
                        help="copies of the trace for the task-level run (0: skip)")
    parser.add_argument("--one", nargs=2, metavar=("RATE", "COPIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rate = None if args.one[0] == "none" else float(args.one[0])
        print(json.dumps(one(rate, int(args.one[1]))))
        return
    runs = [(str(r), 1) for r in args.rates] + ([("none", args.copies)] if args.copies else [])
    print(f"{'export':>8} {'copies':>6} {'requests':>12} {'input tokens':>15} {'GPU-h':>11} "
          f"{'wall s':>8} {'peak RSS GiB':>12}  rows")
    for rate, copies in runs:
        out = subprocess.run([sys.executable, __file__, "--one", rate, str(copies)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        rows = ", ".join(f"{k} {v:,}" for k, v in r["rows"].items())
        print(f"{rate:>8} {copies:>6} {r['requests']:>12,} {r['input_tokens']:>15,} "
              f"{r['gpu_hours']:>11,.1f} {r['wall_s']:>8.2f} {r['peak_rss_gib']:>12.2f}  {rows}",
              flush=True)


if __name__ == "__main__":
    main()
