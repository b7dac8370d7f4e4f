"""How far the library defaults are from each bundled serving run, and which way: replays every
run uncalibrated and prints, per run, the per-request MAPE of TTFT, TPOT and E2E over all
requests and the median (p10, p90) of predicted / measured — a ratio under 1 is a model faster
than the GPU. With ``--param NAME=V1,V2,...`` it repeats the replays with that timing parameter
(:class:`kavier.models.timing.TimingParams`) set to each value, to see whether one physical
term explains a run's miss or needs others beside it. With ``--windows S`` it also prints the
defaults' median ratio per window of ``S`` seconds of arrivals, to see whether a miss is the
same for all requests or grows with the load they met.

Run: ``python benchmarks/serving_defaults.py [--param allreduce_latency_s=1.5e-5,3e-5]
[--windows 5]``
(about a second per replay; the MoE run's lockstep ranks are the slowest).
"""

from __future__ import annotations

import argparse

import numpy as np

from archive.serving import read_serving
from calibrate.serving import METRICS, measured, replay_for, score

RUNS = ("vllm-serving-rtxpro6000-llama3.1-8b", "vllm-serving-rtx4090-llama3.1-8b",
        "vllm-serving-rtxpro6000-qwen3-32b-tp2", "vllm-serving-rtxpro6000-qwen3-30b-a3b")


def ratios(run, predicted) -> dict[str, np.ndarray]:
    """Predicted / measured per request, for each of :data:`METRICS`."""
    truth = measured(run)
    return {m: np.asarray(predicted[m], float) / np.asarray(truth[m], float) for m in METRICS}


def line(run, predicted, label: str) -> str:
    """One run's MAPE and ratio percentiles over all requests, as one line."""
    s = score(measured(run), predicted, np.ones(len(predicted), bool))
    cells = []
    for m, ratio in ratios(run, predicted).items():
        p10, p50, p90 = np.nanpercentile(ratio, [10, 50, 90])
        cells.append(f"{s[m]['mape_pct']:6.2f} % ({p50:.3f}, {p10:.2f}–{p90:.2f})")
    return f"  {label:<28}" + "  ".join(cells)


def windows(run, predicted, width: float) -> None:
    """Median predicted / measured per window of ``width`` s of arrivals, one line each."""
    ratio = ratios(run, predicted)
    window = np.floor(run.requests["arrival_s"].to_numpy() / width).astype(int)
    for k in np.unique(window):
        m = window == k
        cells = "  ".join(f"{x} {np.nanmedian(ratio[x][m]):.3f}" for x in METRICS)
        print(f"    arrivals {k * width:g}–{(k + 1) * width:g} s ({m.sum()}): {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--param", help="NAME=V1,V2,... : a timing parameter to sweep")
    parser.add_argument("--windows", type=float, metavar="S",
                        help="also print the defaults' median ratios per S s of arrivals")
    args = parser.parse_args()
    sweep = []
    if args.param:
        name, _, values = args.param.partition("=")
        sweep = [(name, float(v)) for v in values.split(",")]
    print("per run: MAPE over all requests (median predicted/measured, p10–p90) for "
          + ", ".join(METRICS))
    for name in RUNS:
        run = read_serving(name)
        replay = replay_for(run)
        print(f"{name} ({len(measured(run))} requests)", flush=True)
        base = replay.timing.params
        predicted, _, _ = replay.predict()
        print(line(run, predicted, "library defaults"), flush=True)
        if args.windows:
            windows(run, predicted, args.windows)
        for key, value in sweep:
            predicted, _, _ = replay.with_params(base.with_(**{key: value})).predict()
            print(line(run, predicted, f"{key}={value:g}"), flush=True)


if __name__ == "__main__":
    main()
