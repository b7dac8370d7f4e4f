"""Time the README's main job in-process: calibrate on the A10 data, simulate the Azure trace.

Run: ``python benchmarks/bench_main_job.py``. Prints wall seconds per stage (after imports).
"""

import tempfile
import time

from click.testing import CliRunner

from kavier.cli import main


def timed(args):
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return time.perf_counter() - start


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        cal = timed(["calibrate", "--output-folder", f"{tmp}/cal"])
        for rate in ("1", "0.1"):
            sim = timed(["simulate", "--trace", "azure-llm-inference-2023-conv", "--profile",
                         f"{tmp}/cal/profile.json", "--output-folder", f"{tmp}/sim",
                         "--export-rate", rate])
            print(f"simulate azure conv (19,366 requests), export rate {rate} s: {sim:.2f} s")
        print(f"calibrate (A10, 200 requests, 10 leave-one-size-out folds): {cal:.2f} s")
