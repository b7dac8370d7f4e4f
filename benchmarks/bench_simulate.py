"""Speed and memory of ``kavier simulate`` on a Marconi-shaped workload (thesis 6.4, Table 6.9).

The thesis times its prototype on the aggregated Marconi trace: 96,870 requests of 3,000
sessions (32.29 turns each on average), about 500 A10 GPU-hours: 9.9 s at 1 s export, 92.8 s at
0.1 s, 914.8 s at 0.01 s. That trace is not redistributable here, so this script uses one of
the same shape, built deterministically by :func:`kavier.analysis.workloads.marconi_shaped`: 96,584
requests, 0.96e9 input tokens, 506.4 GPU-hours for Llama-3-8B on an A10 with the thesis
timing model.

Each configuration runs in a fresh process (so peak RSS is its own), in-process timing covers
simulation plus Parquet writing after imports and after building the workload. Run:
``python benchmarks/bench_simulate.py`` (all rates and the 1,000× task-level run) or
``python benchmarks/bench_simulate.py --rates 1 0.1``; ``--baseline 1 0.1`` also times a
re-implementation of the prototype's per-snapshot loop on the same machine (rows marked
``loop``).
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
import pyarrow as pa
from kavier.engine import Simulator, run

from kavier import workloads
from kavier.export.output import run_folder
from kavier.export.run import ExportOptions, write_run
from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from kavier.sim.sustainability import Sustainability


def marconi_shaped() -> pd.DataFrame:
    """The benchmark workload: :func:`kavier.analysis.workloads.marconi_shaped`'s requests."""
    return workloads.marconi_shaped().requests


def _simulator():
    """What ``kavier simulate`` runs by default: thesis timing, Llama-3-8B on an A10, energy
    per request with the linear power model (fragments without energy columns, as the CLI
    writes them unless a power model is asked for)."""
    gpu = gpu_library().get("A10")
    timing = make_timing("thesis", llm_library().get("Llama-3-8B"), gpu)
    power = Sustainability(PowerModel("linear", gpu.idle_power_w, gpu.max_power_w))
    return Simulator(timing, sustainability=power)


def one(rate: float | None, copies: int) -> dict:
    """Time one configuration in this process: ``rate`` None means task level only."""
    base = workloads.marconi_shaped().table
    options = ExportOptions(export_rate_s=rate or 0.0, fragments=rate is not None,
                            opendc=rate is not None, fragment_energy=False)
    sim = _simulator()
    with tempfile.TemporaryDirectory() as tmp, run_folder(tmp) as out:
        start = time.perf_counter()
        if copies == 1:
            chunks = run(base, sim)
        else:
            columns = {c: base.column(c).to_numpy() for c in base.column_names}
            span = float(columns["arrival_s"].max()) + 1.0
            chunks = (sim.step(pa.table({**columns,
                                         "session_id": columns["session_id"] + k * 3000,
                                         "arrival_s": columns["arrival_s"] + k * span}),
                               np.arange(base.num_rows) + k * base.num_rows)
                      for k in range(copies))
        rows = write_run(chunks, sim, out, options, base.num_rows * copies)
        wall = time.perf_counter() - start
    summary = sim.summary()
    return {"export_rate_s": rate, "copies": copies, "requests": summary["n_requests"],
            "input_tokens": summary["n_input_tokens"], "gpu_hours": summary["gpu_hours"],
            "wall_s": wall, "peak_rss_gib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2**20, "rows": rows}


def _utilization(t: float, t_p: float, t_d: float) -> float:
    """Listing 4.3 at one instant."""
    return 0.5 if t < 0.1 or t >= t_p + t_d - 0.1 else 1.0


def _request_rows(i: int, t_p: float, t_d: float, rate: float) -> list[dict]:
    """One request's OpenDC-style fragment rows, one dict per snapshot."""
    total_ms = max(1, round((t_p + t_d) * 1000))
    step_ms = max(1, round(rate * 1000))
    snaps = max(1, int((t_p + t_d) / rate))
    return [{"id": i, "duration": step_ms if k < snaps - 1 else max(1, total_ms - k * step_ms),
             "cpu_count": 1, "cpu_usage": 0.0, "gpu_count": 1,
             "gpu_usage": _utilization(k * rate, t_p, t_d) * 1695.0} for k in range(snaps)]


def prototype_loop(rate: float, flush: int = 10_000) -> dict:
    """The thesis prototype's algorithm, for a same-machine comparison: a Python loop over
    requests and, inside it, over snapshots, one dict per fragment row, turned into a DataFrame
    and appended to Parquet every ``flush`` requests. Written for this benchmark from the
    thesis's description (4.3.3, Listing 4.3) and the prototype's published structure (a
    function per request, one per snapshot, six-key rows); it is not the prototype's code, and
    it skips what the prototype also does per request (prefix-cache lookup, progress bar,
    timing functions in Python)."""
    import pyarrow.parquet as pq

    base = marconi_shaped()
    timing = _simulator().timing
    prefill = timing.prefill_s(base["n_input_tokens"].to_numpy())
    decode = timing.decode_s(base["n_input_tokens"].to_numpy(), base["n_output_tokens"].to_numpy())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        writer, rows, n = None, [], 0
        for i, (t_p, t_d) in enumerate(zip(prefill.tolist(), decode.tolist(), strict=True)):
            rows.extend(_request_rows(i, t_p, t_d, rate))
            if (i + 1) % flush == 0 or i == len(prefill) - 1:
                table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
                writer = writer or pq.ParquetWriter(f"{tmp}/fragments.parquet", table.schema)
                writer.write_table(table)
                n, rows = n + table.num_rows, []
        writer.close()
        wall = time.perf_counter() - start
    return {"export_rate_s": rate, "copies": 1, "requests": len(base),
            "input_tokens": int(base["n_input_tokens"].sum()),
            "gpu_hours": float((prefill + decode).sum() / 3600), "wall_s": wall,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rows": {"fragments.parquet (prototype-style loop)": n}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="*", type=float, default=[1.0, 0.1, 0.01])
    parser.add_argument("--copies", type=int, default=1000,
                        help="copies of the trace for the task-level run (0: skip)")
    parser.add_argument("--baseline", nargs="*", type=float, default=[],
                        help="export rates at which to also time the prototype-style loop")
    parser.add_argument("--one", nargs=2, metavar=("RATE", "COPIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rate = None if args.one[0] == "none" else float(args.one[0])
        copies = int(args.one[1])
        print(json.dumps(prototype_loop(rate) if copies == 0 else one(rate, copies)))
        return
    runs = [(str(r), 1) for r in args.rates] + ([("none", args.copies)] if args.copies else [])
    runs += [(str(r), 0) for r in args.baseline]
    print(f"{'export':>8} {'copies':>6} {'requests':>12} {'input tokens':>15} {'GPU-h':>11} "
          f"{'wall s':>8} {'peak RSS GiB':>12}  rows")
    for rate, copies in runs:
        out = subprocess.run([sys.executable, __file__, "--one", rate, str(copies)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        rows = ", ".join(f"{k} {v:,}" for k, v in r["rows"].items())
        label = "loop" if copies == 0 else copies
        print(f"{rate:>8} {label:>6} {r['requests']:>12,} {r['input_tokens']:>15,} "
              f"{r['gpu_hours']:>11,.1f} {r['wall_s']:>8.2f} {r['peak_rss_gib']:>12.2f}  {rows}",
              flush=True)


if __name__ == "__main__":
    main()
