"""How far the library defaults are from each bundled serving run, and which way: replays every
run uncalibrated and prints, per run, the per-request MAPE of TTFT, TPOT and E2E over all
requests and the median (p10, p90) of predicted / measured — a ratio under 1 is a model faster
than the GPU. With ``--param NAME=V1,V2,...`` it repeats the replays with that timing parameter
(:class:`kavier.models.timing.TimingParams`) set to each value, to see whether one physical
term explains a run's miss or needs others beside it; ``--param`` given twice sweeps every pair
of the two lists. ``--held-out`` scores only the requests ``kavier calibrate`` holds out (the
second half of the arrivals), ``--runs`` picks runs by name. With ``--windows S`` it also prints the
defaults' median ratio per window of ``S`` seconds of arrivals, to see whether a miss is the
same for all requests or grows with the load they met.

Run: ``python benchmarks/serving_defaults.py [--param allreduce_latency_s=1.5e-5,3e-5]
[--param link_efficiency=0.2,0.25] [--held-out] [--runs qwen3] [--windows 5]``
(about a second per replay; the MoE run's lockstep ranks are the slowest).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from archive.serving import read_serving
from calibrate.serving import METRICS, fit_mask, measured, replay_for, score

RUNS = ("vllm-serving-rtxpro6000-llama3.1-8b", "vllm-serving-rtx4090-llama3.1-8b",
        "vllm-serving-rtxpro6000-qwen3-32b-tp2", "vllm-serving-rtxpro6000-qwen3-30b-a3b")


def ratios(run, predicted) -> dict[str, np.ndarray]:
    """Predicted / measured per request, for each of :data:`METRICS`."""
    truth = measured(run)
    return {m: np.asarray(predicted[m], float) / np.asarray(truth[m], float) for m in METRICS}


def line(run, predicted, label: str, mask: np.ndarray) -> str:
    """One run's MAPE and ratio percentiles over the requests of ``mask``, as one line."""
    s = score(measured(run), predicted, mask)
    cells = []
    for m, ratio in ratios(run, predicted).items():
        p10, p50, p90 = np.nanpercentile(ratio[mask], [10, 50, 90])
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
    parser.add_argument("--param", action="append", default=[],
                        help="NAME=V1,V2,... : a timing parameter to sweep (twice: every pair)")
    parser.add_argument("--held-out", action="store_true",
                        help="score the held-out half of each run only")
    parser.add_argument("--runs", help="only the runs whose names contain this")
    parser.add_argument("--windows", type=float, metavar="S",
                        help="also print the defaults' median ratios per S s of arrivals")
    args = parser.parse_args()
    if len(args.param) > 2:
        parser.error("--param is given at most twice")
    axes = []
    for spec in args.param:
        name, _, values = spec.partition("=")
        axes.append([(name, float(v)) for v in values.split(",")])
    sweep = list(itertools.product(*axes)) if axes else []
    runs = [name for name in RUNS if args.runs is None or args.runs in name]
    if not runs:
        parser.error(f"--runs {args.runs!r} matches none of {', '.join(RUNS)}")
    print(f"per run: MAPE over {'the held-out' if args.held_out else 'all'} requests (median "
          "predicted/measured, p10–p90) for " + ", ".join(METRICS))
    for name in runs:
        run = read_serving(name)
        replay = replay_for(run)
        mask = ~fit_mask(run, 0.5) if args.held_out else np.ones(len(run.requests), bool)
        print(f"{name} ({int(mask.sum())} requests)", flush=True)
        base = replay.timing.params
        predicted, _, _ = replay.predict()
        print(line(run, predicted, "library defaults", mask), flush=True)
        if args.windows:
            windows(run, predicted, args.windows)
        for point in sweep:
            predicted, _, _ = replay.with_params(base.with_(**dict(point))).predict()
            label = " ".join(f"{key}={value:g}" for key, value in point)
            print(line(run, predicted, label, mask), flush=True)


if __name__ == "__main__":
    main()
