"""Every library LLM on every library GPU in several parallel layouts, checked for what must
never happen: a traceback (a bug), a non-finite number in a summary, a negative latency, a
failed-request count that disagrees with the records, or, for a dense model, a median TPOT
shorter than one read of a GPU's share of the weights at peak DRAM bandwidth (every token
passes every stage; a mixture of experts reads only the experts its batch touches, so it has
no such floor).

Each case is ``kavier simulate`` (in process, through the CLI) on the first ``--requests``
requests of the bundled Azure 2023 conversation trace, at the trace's own arrivals, with
tensor × pipeline layouts 1×1, 2×1, 4×1, 8×1, 2×2 and 1×2, and for a mixture of experts also
two data-parallel ranks with ``--enable-expert-parallel`` at TP 1 and 2. A layout the GPUs
cannot hold must end in the one-line error of bad input (exit 2); anything else but exit 0 is
printed with its traceback. Then, per model and GPU, it prints where a higher tensor-parallel
degree made the median TPOT longer, with the collective share of the GPU time
(``comm_share``): over PCIe the all-reduces can cost more than the split saves
(docs/models.md), which is a result to read, not a defect.

Run: ``python benchmarks/library_sweep.py [--requests 400] [--workers 2]`` (1,736 cases,
about 2 minutes on 2 cores). The simulations write under a temporary folder, removed after.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

LAYOUTS = ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (1, 2))
"""(tensor-parallel size, pipeline-parallel size) of every case."""


def cases(requests_file: Path) -> list[tuple]:
    """(trace, LLM, GPU, TP, PP, expert parallel, replicas) of every case."""
    from kavier.models.library import gpu_library, llm_library
    llms, gpus = llm_library(), gpu_library()
    out = []
    for name in llms.names():
        moe = llms.get(name).n_experts > 1
        for gpu in gpus.names():
            out += [(requests_file, name, gpu, tp, pp, False, 1) for tp, pp in LAYOUTS]
            if moe:
                out += [(requests_file, name, gpu, tp, 1, True, 2) for tp in (1, 2)]
    return out


def _non_finite(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(f"{prefix}.{k}", v)]
    return [prefix] if isinstance(value, float) and not math.isfinite(value) else []


def run_case(case: tuple) -> dict:
    """One simulation: its exit code, the problems found, and its median TPOT and
    collective share."""
    from click.testing import CliRunner

    from kavier.cli import main
    trace, llm, gpu, tp, pp, ep, replicas = case
    record = dict(llm=llm, gpu=gpu, tp=tp, pp=pp, ep=ep, replicas=replicas, problems=[])
    with tempfile.TemporaryDirectory() as out:
        args = ["simulate", "--trace", str(trace), "--llm", llm, "--gpu", gpu,
                "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                "--replicas", str(replicas), "--output-folder", out, "--no-fragments",
                "--no-opendc"] + (["--enable-expert-parallel"] if ep else [])
        result = CliRunner().invoke(main, args)
        record["exit_code"] = result.exit_code
        if result.exit_code != 0:
            if result.exit_code != 2 or not isinstance(result.exception, SystemExit):
                record["problems"].append("".join(traceback.format_exception(
                    result.exception))[-800:] if result.exception else result.output[-800:])
            return record
        summary = json.loads((Path(out) / "summary.json").read_text())
        requests = pd.read_parquet(Path(out) / "requests.parquet")
    record["problems"] += _non_finite("summary", summary)
    for column in ("ttft_s", "tpot_s", "e2e_s"):
        values = requests[column].to_numpy(float)
        if (values[np.isfinite(values)] < 0).any():
            record["problems"].append(f"negative {column}")
    if int((~np.isfinite(requests.ttft_s.to_numpy(float))).sum()) != summary["n_failed"]:
        record["problems"].append("requests without a first token != n_failed")
    from kavier.models.library import gpu_library, llm_library
    model = llm_library().get(llm)
    floor_s = model.resident_weight_bytes(tp) / (
        gpu_library().get(gpu).memory_bandwidth_gbps * 1e9)
    if model.n_experts <= 1 and summary["p50_tpot_s"] < floor_s:
        record["problems"].append(f"p50 TPOT {summary['p50_tpot_s']:.3g} s below one weight "
                                  f"read, {floor_s:.3g} s")
    record.update(p50_tpot_s=summary["p50_tpot_s"], comm_share=summary["comm_share"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from archive.datasets import dataset_dir
    trace = pd.read_parquet(dataset_dir("azure-llm-inference-2023-conv") / "workload.parquet")
    with tempfile.TemporaryDirectory() as folder:
        requests_file = Path(folder) / "trace.parquet"
        trace.iloc[:args.requests].to_parquet(requests_file)
        todo = cases(requests_file)
        with multiprocessing.Pool(args.workers) as pool:
            records = list(pool.imap_unordered(run_case, todo, chunksize=4))
    print(f"{len(records)} cases: " + ", ".join(
        f"exit {code}: {n}" for code, n in sorted(Counter(r["exit_code"] for r in records)
                                                   .items())))
    bad = [r for r in records if r["problems"]]
    print(f"{len(bad)} with problems")
    for r in bad:
        print(f"  {r['llm']} on {r['gpu']} TP {r['tp']} PP {r['pp']} EP {r['ep']}:")
        for problem in r["problems"]:
            print("    " + problem.replace("\n", "\n    "))
    done = {(r["llm"], r["gpu"], r["tp"], r["pp"], r["ep"]): r
            for r in records if r["exit_code"] == 0}
    slower = [(key, done[(*key[:2], key[2] // 2, 1, False)], r) for key, r in done.items()
              if key[3] == 1 and not key[4] and key[2] > 1
              and (*key[:2], key[2] // 2, 1, False) in done
              and r["p50_tpot_s"] > 1.02 * done[(*key[:2], key[2] // 2, 1, False)]["p50_tpot_s"]]
    print(f"{len(slower)} cases where doubling TP lengthened the median TPOT:")
    for (llm, gpu, tp, _, _), before, after in sorted(slower, key=lambda s: s[0]):
        print(f"  {llm:18s} {gpu:15s} TP {tp // 2}→{tp}: {1e3 * before['p50_tpot_s']:8.1f} → "
              f"{1e3 * after['p50_tpot_s']:8.1f} ms, comm_share {after['comm_share']:.2f}")


if __name__ == "__main__":
    main()
