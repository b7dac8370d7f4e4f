"""Parquet writer options for ``fragments.parquet``: seconds and bytes per choice.

Builds the fragments of the Marconi-shaped benchmark workload (:mod:`bench_simulate`) at 0.1 s
export, 18,279,802 rows, without and with the energy columns, and writes each table with every
option set below, single-threaded, in row groups of ``kavier.export.run.FLUSH_ROWS`` rows; prints the
best of ``--repeat`` wall times and the file size.
Run: ``python benchmarks/bench_fragment_writer.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from kavier.engine import Simulator, run

from kavier import workloads
from kavier.export.fragments import FRAGMENT_PARQUET_OPTIONS, fragment_batches
from kavier.export.run import FLUSH_ROWS
from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from kavier.sim.sustainability import Sustainability

_VARYING = ("time_s", "duration_s", "gpu_utilization", "kv_cache_bytes", "power_w",
            "energy_wh", "co2_g")
OPTION_SETS = {
    "chosen (FRAGMENT_PARQUET_OPTIONS)": FRAGMENT_PARQUET_OPTIONS,
    "same, 1,024-value write batches": {**FRAGMENT_PARQUET_OPTIONS, "write_batch_size": 1024},
    "dictionary ids, byte-stream split on all": {
        "use_dictionary": ["request_id"], "compression": "lz4",
        "column_encoding": dict.fromkeys(_VARYING, "BYTE_STREAM_SPLIT"),
        "write_statistics": ["request_id", "time_s"]},
    "plain, snappy": {"use_dictionary": False, "compression": "snappy"},
    "pyarrow defaults": {},
}


def tables() -> dict[str, pa.Table]:
    """The benchmark's fragments, 5 columns and 7 (with ``power_w`` and ``energy_wh``)."""
    gpu = gpu_library().get("A10")
    power = Sustainability(PowerModel("linear", gpu.idle_power_w, gpu.max_power_w))
    sim = Simulator(make_timing("thesis", llm_library().get("Llama-3-8B"), gpu),
                    sustainability=power)
    requests = next(run(workloads.marconi_shaped().table, sim))
    return {energy: pa.Table.from_batches(list(fragment_batches(
        requests, 0.1, sim.kv_bytes_per_token, sustainability=power if energy else None)))
        for energy in (False, True)}


def best_write(table: pa.Table, options: dict, repeat: int) -> tuple[float, int]:
    """Best wall time of ``repeat`` writes, s, and the file's size, bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fragments.parquet")
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            pq.write_table(table, path, row_group_size=FLUSH_ROWS, **options)
            best = min(best, time.perf_counter() - start)
        return best, os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    for energy, table in tables().items():
        print(f"{table.num_rows:,} rows × {table.num_columns} columns"
              f"{' (with energy)' if energy else ''}")
        for name, options in OPTION_SETS.items():
            seconds, size = best_write(table, options, repeat)
            print(f"  {name:<42}{seconds:7.3f} s {size / 1e6:8.1f} MB", flush=True)


if __name__ == "__main__":
    main()
