"""Decode steps of one request alone, measured in a serving run's engine log and modelled.

For each bundled multi-GPU run, prints the seconds of the engine's once-a-second log in which
exactly one request decoded for the whole second (its generation throughput is then one token
per step), and the model's step for one sequence at 1,500 tokens of context with the library
defaults: at the link's collective latency and at the latency the calibration fitted
(docs/models.md). These steps bound the per-collective cost a fit may claim.
Run: ``python benchmarks/lone_steps.py``.
"""

from __future__ import annotations

import numpy as np

from archive.serving import read_serving
from calibrate.serving import replay_for

RUNS = {"vllm-serving-rtxpro6000-qwen3-32b-tp2": 5.513e-05,
        "vllm-serving-rtxpro6000-qwen3-30b-a3b": 7.091e-05}
"""Run → the per-collective latency its calibration fitted, s (docs/models.md)."""


def main() -> None:
    for name, fitted in RUNS.items():
        run = read_serving(name)
        r = run.requests
        for _, row in run.timeseries.iterrows():
            start, end = row.t_s - 1.0, row.t_s
            active = r[(r.first_token_s < end) & (r.last_token_s > start)]
            if (len(active) == 1 and active.first_token_s.iloc[0] <= start
                    and active.last_token_s.iloc[0] >= end):
                tokens = row.generation_throughput_tok_s
                print(f"{name} second {end:.0f}: {tokens:.0f} tokens, "
                      f"{1e3 / tokens:.2f} ms a step")
        replay = replay_for(run)
        for latency in (None, fitted):
            timing = replay.with_params(
                replay.timing.params.with_(allreduce_latency_s=latency)).timing
            step = timing.step_costs(np.ones(1), np.array([1500.0]), 1).duration_s
            label = "the link's" if latency is None else f"{latency * 1e6:.0f} µs"
            print(f"  model, one sequence, collective latency {label}: {step * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
