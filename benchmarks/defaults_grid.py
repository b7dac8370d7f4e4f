"""Score candidate library defaults (compute, weight and KV efficiencies) on the bundled
serving runs: each candidate replays both Llama-3.1-8B runs uncalibrated and prints the
per-request MAPE of TTFT, TPOT and E2E on every request, and the worst of the six.

The compute axis is the library-wide factor that :func:`kavier.models.timing.default_params`
multiplies by each GPU's measured GEMM share (``gemm_tflops / fp16_tflops``), so a candidate
gives each run's GPU its own compute efficiency, as the library does. The library's
:data:`kavier.models.timing.ROOFLINE_DEFAULTS` were picked from this grid.
Run: ``python benchmarks/defaults_grid.py [--step 0.05] [--span 1]`` (about 3 s per candidate).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from archive.serving import read_serving
from calibrate.serving import METRICS, measured, replay_for, score
from kavier.models.timing import ROOFLINE_DEFAULTS, default_params

RUNS = ("vllm-serving-rtxpro6000-llama3.1-8b", "vllm-serving-rtx4090-llama3.1-8b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--span", type=int, default=1, help="grid points each side")
    args = parser.parse_args()
    runs = [read_serving(name) for name in RUNS]
    replays = [replay_for(run) for run in runs]
    base = ROOFLINE_DEFAULTS
    axes = [[round(v + k * args.step, 3) for k in range(-args.span, args.span + 1)]
            for v in (base.compute_efficiency, base.memory_efficiency,
                      base.kv_memory_efficiency)]
    print("compute weights kv   worst  " + "  ".join(
        f"{r.split('-')[2]}:{m[:-2]}" for r in RUNS for m in METRICS))
    for ce, me, kv in itertools.product(*axes):
        mapes = []
        for run, replay in zip(runs, replays, strict=True):
            own = default_params("roofline", replay.timing.gpu).compute_efficiency
            params = base.with_(compute_efficiency=ce * own / base.compute_efficiency,
                                memory_efficiency=me, kv_memory_efficiency=kv)
            predicted, _, _ = replay.with_params(params).predict()
            s = score(measured(run), predicted, np.ones(len(predicted), bool))
            mapes += [s[m]["mape_pct"] for m in METRICS]
        print(f"{ce:7.2f} {me:7.2f} {kv:4.2f} {max(mapes):7.1f}  "
              + "  ".join(f"{v:12.1f}" for v in mapes))


if __name__ == "__main__":
    main()
