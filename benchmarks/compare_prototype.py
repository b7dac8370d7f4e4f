"""Whole-command speed against the published Kavier prototype, on the same file and machine.

Writes the Marconi-shaped benchmark workload
(:func:`kavier.analysis.workloads.marconi_shaped`, 96,584 requests) as the CSV
the prototype reads (``session_id, turn_id, ts, num_input_tokens, num_output_tokens``) and as
Parquet, then runs, ``--rounds`` times and interleaved, each as a fresh process timed from
launch to exit:

* the prototype: ``kavier inference --llm Llama-3-8B --gpu A10 --trace CSV --export_rate R``;
* ``kavier simulate --trace CSV --export-rate R`` (the same file) in the prototype's mode:
  ``--timing-model thesis --max-num-seqs 1 --back-to-back`` (one request at a time, the
  engine's closed-form path);
* the same with ``--trace PARQUET``.

``sync`` runs before every timed command, so that none pays for writing back the previous one's
output. Prints each run's wall time and peak RSS, the medians, and the prototype's median over
ours. The prototype is not a dependency of this project; install it in a separate environment
(``python3 -m venv /tmp/protoenv && /tmp/protoenv/bin/pip install kavier==0.5.3``) and run:
``python benchmarks/compare_prototype.py --prototype /tmp/protoenv/bin/kavier``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from kavier.analysis import workloads

PROTOTYPE_COLUMNS = {"session_id": "session_id", "turn_id": "turn_id", "arrival_s": "ts",
                     "n_input_tokens": "num_input_tokens",
                     "n_output_tokens": "num_output_tokens"}


THESIS_MODE = ["--timing-model", "thesis", "--max-num-seqs", "1", "--back-to-back",
               "--num-gpu-blocks", "1000000000"]
"""The prototype's mode: thesis timing, one request at a time, back to back, KV not limiting."""


def write_traces(folder: Path) -> tuple[Path, Path]:
    """The benchmark workload as the prototype's CSV and as Parquet (same columns)."""
    table = workloads.marconi_shaped().table
    table = table.select(list(PROTOTYPE_COLUMNS)).rename_columns(list(
        PROTOTYPE_COLUMNS.values()))
    csv, parquet = folder / "marconi_shaped.csv", folder / "marconi_shaped.parquet"
    pa_csv.write_csv(table, csv)
    pq.write_table(table, parquet)
    return csv, parquet


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds from launch to exit and peak RSS (GiB) of one fresh process."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()}")
    process.stderr.close()
    return wall, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prototype", required=True, help="the prototype's kavier executable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--export-rate", default="0.1")
    args = parser.parse_args()
    ours = str(Path(sys.executable).with_name("kavier"))
    with tempfile.TemporaryDirectory() as tmp:
        csv, parquet = write_traces(Path(tmp))
        out = str(Path(tmp) / "out")
        commands = {
            "prototype (CSV)": [args.prototype, "inference", "--llm", "Llama-3-8B", "--gpu",
                                "A10", "--trace", str(csv), "--output_folder", out,
                                "--export_rate", args.export_rate],
            "kavier simulate (CSV)": [ours, "simulate", "--trace", str(csv), "--export-rate",
                                      args.export_rate, "--output-folder", out, *THESIS_MODE],
            "kavier simulate (Parquet)": [ours, "simulate", "--trace", str(parquet),
                                          "--export-rate", args.export_rate, *THESIS_MODE,
                                          "--output-folder", out],
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(1, args.rounds + 1):
            for name, command in commands.items():
                wall, rss = timed(command)
                walls[name].append(wall)
                print(f"round {round_}  {name:<27}{wall:8.2f} s  {rss:5.2f} GiB", flush=True)
    medians = {name: statistics.median(values) for name, values in walls.items()}
    base = medians["prototype (CSV)"]
    for name, median in medians.items():
        print(f"median {name:<27}{median:8.2f} s  prototype / this = {base / median:5.1f}×")


if __name__ == "__main__":
    main()
