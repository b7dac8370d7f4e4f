"""Per-request MAPE of one replay against the expected latency over arrival phases, for every
shipped serving profile on the run it was fitted on (and for the library defaults).

A step-level replay cannot know where in the engine's step each real request arrived; one
replay predicts one such phase (:meth:`calibrate.serving.Replay.expected`). For each bundled
serving run the script prints the held-out TTFT / TPOT / E2E MAPE (the requests ``kavier
calibrate`` holds out) with one replay and with the mean over ``--draws`` replays whose
arrivals move within a step, for the run's shipped profile and for the library defaults,
each beside the step-phase floor of that prediction (:func:`calibrate.serving.phase_floor`).

Run: ``python benchmarks/phase_draws.py [--draws 16] [--runs a3b]`` (under a minute).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from archive.serving import read_serving
from calibrate.profile import Profile, profile_path, shipped_profiles
from calibrate.serving import METRICS, fit_mask, measured, phase_floor, replay_for, score


def profile_of(run_name: str) -> Profile | None:
    """The shipped profile fitted on ``run_name``, or None."""
    for name in shipped_profiles():
        path = profile_path(name)
        if run_name in json.loads(path.read_text()).get("datasets", []):
            return Profile.read(path)
    return None


def cells(s: dict) -> str:
    return " / ".join(f"{s[m]['mape_pct']:5.2f}" for m in METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--runs", default="", help="only runs whose name contains this")
    args = parser.parse_args()
    from archive.datasets import kind_of, list_datasets
    runs = [n for n in list_datasets() if kind_of(n) == "serving" and args.runs in n]
    print("held-out per-request MAPE %, TTFT / TPOT / E2E (step-phase floor of the same "
          "prediction in brackets)")
    for name in runs:
        run = read_serving(name)
        truth, held = measured(run), ~fit_mask(run, 0.5)
        profile = profile_of(name)
        for label, params in (("profile", profile.params if profile else None),
                              ("defaults", None)):
            if label == "profile" and profile is None:
                continue
            base = replay_for(run, params)
            for draws in (1, args.draws):
                replay = replace(base, phase_draws=draws)
                predicted, _, steps = replay.predict()
                floor = phase_floor(replay, predicted, steps, held)
                print(f"{name:40s} {label:8s} {draws:3d} draw{'s' if draws > 1 else ' '}: "
                      f"{cells(score(truth, predicted, held))}  ({cells(floor)})")


if __name__ == "__main__":
    main()
