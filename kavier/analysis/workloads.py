"""Synthetic workloads of known shape, for benchmarks and the thesis experiments.

The thesis's speed and prefix-caching experiments (6.4, 6.6) run on the aggregated Marconi
trace: 96,870 requests of 3,000 sessions (32.29 turns each on average), about 500 A10
GPU-hours, with prompts as token lists. That trace is not redistributable, so
:func:`marconi_shaped` builds one of the same shape, deterministically, optionally with
prefix-block hashes so that prefix caching can be simulated on it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from archive.traces import PromptContent, Workload

SESSION_BLOCK_IDS = 1 << 20
"""Hash-id space per session (block ``b`` of session ``s`` gets ``s · 2²⁰ + b``)."""


def marconi_shaped(seed: int = 0, sessions: int = 3000, block_size: int | None = None
                   ) -> Workload:
    """A Marconi-shaped multi-turn chat workload, sorted by arrival.

    * ``sessions`` sessions; turns per session ``1 + Poisson(31.29)`` (mean 32.29, as the
      thesis's trace); sessions start uniformly in the first hour, turns follow after
      exponential think times (mean 60 s);
    * per turn a new prompt of ``LogNormal`` size (median 200 tokens) and an answer of
      ``LogNormal`` size (median 256, at most 4,096); each turn's input is the conversation so
      far plus the new prompt, so a turn's input is a prefix of the next turn's.

    With 3,000 sessions: 96,584 requests, 0.96e9 input tokens, 506.4 A10 GPU-hours with the
    thesis model.

    Parameters
    ----------
    seed : int
    sessions : int
    block_size : int or None
        When given, each request carries prefix-block hashes (``hash_ids``) of that many tokens
        per block: full blocks of the conversation get a per-session id (the same in every later
        turn, since the conversation only grows); a trailing partial block gets a fresh id.

    Returns
    -------
    Workload
        Requests with ``session_id``, ``turn_id``, ``arrival_s``, ``n_input_tokens``,
        ``n_output_tokens``; content (hashes) when ``block_size`` is given.
    """
    rng = np.random.default_rng(seed)
    turns = 1 + rng.poisson(31.29, sessions)
    session = np.repeat(np.arange(sessions), turns)
    first = np.repeat(np.cumsum(turns) - turns, turns)
    turn = np.arange(session.size) - first
    prompt = np.maximum(rng.lognormal(np.log(200), 0.8, session.size).astype(np.int64), 1)
    answer = np.clip(rng.lognormal(np.log(256), 0.7, session.size).astype(np.int64), 1, 4096)
    exchanged = np.cumsum(prompt + answer)
    before_session = np.where(first > 0, exchanged[first - 1], 0)
    history = exchanged - (prompt + answer) - before_session
    waited = np.cumsum(rng.exponential(60.0, session.size))
    arrival = np.repeat(rng.uniform(0, 3600, sessions), turns) + waited - waited[first]
    order = np.argsort(arrival, kind="stable")
    columns = {"session_id": session, "turn_id": turn, "arrival_s": arrival,
               "n_input_tokens": history + prompt, "n_output_tokens": answer}
    columns = {name: values[order] for name, values in columns.items()}
    content = None if block_size is None else _block_hashes(
        columns["n_input_tokens"], columns["session_id"], block_size)
    return Workload(pa.table(columns), content,
                    f"marconi-shaped(seed={seed}, sessions={sessions})")


def _block_hashes(n_in: np.ndarray, sessions: np.ndarray, block_size: int) -> PromptContent:
    full = n_in // block_size
    blocks = -(-n_in // block_size)
    offsets = np.concatenate(([0], np.cumsum(blocks)))
    owner = np.repeat(np.arange(n_in.size), blocks)
    index = np.arange(offsets[-1]) - offsets[owner]
    session = sessions[owner]
    if (index >= SESSION_BLOCK_IDS).any():
        raise ValueError("conversation longer than the per-session hash-id space")
    values = session * SESSION_BLOCK_IDS + index
    partial = index >= full[owner]
    fresh = (int(session.max()) + 1) * SESSION_BLOCK_IDS       # beyond every session's ids
    values[partial] = fresh + np.arange(int(partial.sum()))
    return PromptContent("hashes", offsets, values, block_size)
