"""Which data-parallel rank served each request, as far as a serving run's engine timestamps
tell, against the replay's router; and where the replay's per-request TTFT error lies against
the step-phase floor.

vLLM's engine core stamps the outputs of one step with one clock reading, so in a run with
engine timestamps two requests whose first- or last-token times are equal were on one rank,
and two different times less than ``--gap`` apart (well under a step) are the two ranks of
one lockstep step. With two data-parallel ranks these relations 2-colour the timestamps: each
connected set splits into two rank classes (which one is rank 0 is unknown). The script prints
the relations found, the independent cycles among them (each a test of the reading) and the
conflicts (0 if the reading holds), the gaps between distinct timestamps that fit neither
reading (from ``--gap`` to 5 ms, shorter than any step), the pairs of requests whose relation
is known, how often the replay's routing agrees with them (half at random), and for
consecutive arrivals less than 2 ms apart how often both went to one rank, measured and
replayed.

Then the replay's held-out TTFT MAPE for the requests that waited for a slot (measured TTFT
over 1 s) and for the rest, each beside its step-phase floor
(:func:`calibrate.serving.phase_floor`).

Run: ``python benchmarks/dp_routing.py [RUN] [--profile FILE] [--gap 0.001]`` (the bundled
Qwen3-30B-A3B run by default; a few seconds).
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict

import numpy as np
import pandas as pd

from archive.serving import read_serving
from calibrate.profile import Profile
from calibrate.serving import fit_mask, measured, phase_floor, replay_for, score

RUN = "vllm-serving-rtxpro6000-qwen3-30b-a3b"


def rank_classes(requests: pd.DataFrame, gap_s: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per request: the connected set of timestamps it belongs to and its rank class in it
    (0 or 1), from the first- and last-token times; and counts of the relations, cycles,
    conflicts and ambiguous gaps (between ``gap_s`` and 5 ms: too long for one step's two
    ranks, too short for two steps)."""
    stamps = np.unique(np.r_[requests.first_token_s, requests.last_token_s])
    index = {t: k for k, t in enumerate(stamps)}
    edges = defaultdict(list)                    # (neighbour, 0 same rank / 1 other rank)
    same = 0
    for first, last in zip(requests.first_token_s, requests.last_token_s, strict=True):
        a, b = index[first], index[last]
        if a != b:
            edges[a].append((b, 0))
            edges[b].append((a, 0))
            same += 1
    gaps = np.diff(stamps)
    close = np.flatnonzero(gaps < gap_s)
    for k in close:
        edges[k].append((k + 1, 1))
        edges[k + 1].append((k, 1))
    colour, component, conflicts = np.full(stamps.size, -1), np.full(stamps.size, -1), 0
    for start in range(stamps.size):
        if colour[start] >= 0:
            continue
        colour[start], component[start], todo = 0, start, [start]
        while todo:
            u = todo.pop()
            for v, other in edges[u]:
                if colour[v] < 0:
                    colour[v], component[v] = colour[u] ^ other, start
                    todo.append(v)
                elif colour[v] != colour[u] ^ other:
                    conflicts += 1
    first = requests.first_token_s.map(index).to_numpy()
    counts = {"timestamps": stamps.size, "same_rank": same, "other_rank": int(close.size),
              "cycles": same + int(close.size) - stamps.size + len(set(component)),
              "conflicts": conflicts // 2,
              "ambiguous": int(((gaps >= gap_s) & (gaps < 5e-3)).sum())}
    return component[first], colour[first], counts


def agreement(component: np.ndarray, rank: np.ndarray, replica: np.ndarray) -> tuple[int, int]:
    """(pairs of requests with a known relation, pairs where the replay's ranks agree)."""
    known = agree = 0
    for c in np.unique(component):
        members = np.flatnonzero(component == c)
        for a, b in itertools.combinations(members, 2):
            known += 1
            agree += (rank[a] == rank[b]) == (replica[a] == replica[b])
    return known, agree


def burst_same_share(arrival: np.ndarray, component: np.ndarray, rank: np.ndarray,
                     replica: np.ndarray) -> tuple[float, int, float]:
    """Consecutive arrivals under 2 ms apart: the measured share on one rank (over pairs whose
    relation is known), the count of such pairs, and the replay's share (over all of them)."""
    order = np.argsort(arrival, kind="stable")
    pairs = [(a, b) for a, b in itertools.pairwise(order) if arrival[b] - arrival[a] < 2e-3]
    known = [(a, b) for a, b in pairs if component[a] == component[b]]
    measured_share = np.mean([rank[a] == rank[b] for a, b in known]) if known else np.nan
    replay_share = np.mean([replica[a] == replica[b] for a, b in pairs]) if pairs else np.nan
    return float(measured_share), len(known), float(replay_share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=RUN)
    parser.add_argument("--profile", help="calibrated profile (default: library defaults)")
    parser.add_argument("--gap", type=float, default=1e-3,
                        help="largest gap between the two ranks' stamps of one step, s")
    args = parser.parse_args()
    run = read_serving(args.run)
    if (run.engine.get("data_parallel_size") or 1) != 2 or run.engine["timestamps"] != "engine":
        raise SystemExit(f"{args.run}: needs two data-parallel ranks and engine timestamps")
    params = Profile.read(args.profile).params if args.profile else None
    replay = replay_for(run, params)
    predicted, _, steps = replay.predict()
    r = run.requests.reset_index(drop=True)
    component, rank, counts = rank_classes(r, args.gap)
    print(f"{args.run}: {2 * len(r)} first/last-token times in {counts['timestamps']} "
          f"distinct timestamps (equal ones: one rank's step), "
          f"{counts['same_rank']} same-rank and {counts['other_rank']} other-rank relations, "
          f"{counts['cycles']} independent cycles, {counts['conflicts']} conflicts; "
          f"{counts['ambiguous']} gaps between {1e3 * args.gap:g} and 5 ms")
    replica = predicted.replica.to_numpy()
    known, agree = agreement(component, rank, replica)
    print(f"  {known} pairs of requests with a known relation; the replay's routing agrees on "
          f"{agree} ({100 * agree / max(known, 1):.1f} %; 50 % at random)")
    share, pairs, replayed = burst_same_share(r.arrival_s.to_numpy(), component, rank, replica)
    print(f"  consecutive arrivals < 2 ms apart on one rank: measured {100 * share:.0f} % "
          f"({pairs} known pairs), replay {100 * replayed:.0f} %")
    truth, held = measured(run), ~fit_mask(run, 0.5)
    waited = truth.ttft_s.to_numpy() > 1.0
    for label, mask in (("waited for a slot", held & waited), ("the rest", held & ~waited)):
        model = score(truth, predicted, mask)["ttft_s"]["mape_pct"]
        floor = phase_floor(replay, predicted, steps, mask)["ttft_s"]["mape_pct"]
        print(f"  held out, {label} ({int(mask.sum())} requests): TTFT MAPE {model:.1f} %, "
              f"step-phase floor {floor:.1f} %")


if __name__ == "__main__":
    main()
