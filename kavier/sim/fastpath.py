"""The closed-form path of the engine for one request at a time (the thesis's mode).

With one replica, ``max_num_seqs = 1`` and no client timeout, the scheduler of
:mod:`kavier.sim.engine` serves requests first come first served, each alone: its prompt in
one step (or in chunks of ``max_num_batched_tokens`` with chunked prefill), then its decode as
one run of ``n_out − 1`` steps. Each request's service time then has a closed form
(:meth:`~kavier.models.timing.RooflineTiming.request_costs`), and start times follow Lindley's
recursion ``start_i = max(ready_i, end_{i−1})`` with ``ready_i = arrival_i + O`` (the front
end), evaluated with cumulative sums; back to back, ``start_i = end_{i−1} + O``. A chunk of a
million requests is a handful of numpy passes, and the timeline and request record are exactly
those the stepped engine writes (a test compares them). Only the prefix cache, whose state
depends on the order, is a loop over requests.
"""

from __future__ import annotations

import numpy as np

from kavier.models.timing import ThesisTiming
from kavier.sim.kvpool import BlockPool

ITL_BATCH_TOKENS = 1_000_000
"""Decode steps expanded at once for the inter-token-latency sketch (bounds memory)."""


def lindley_start(ready_s: np.ndarray, service_s: np.ndarray, free_s: float = 0.0) -> np.ndarray:
    """Start times of FIFO service: ``start_i = max(ready_i, start_{i−1} + service_{i−1})``,
    the server free from ``free_s``; ``ready`` non-decreasing. Computed as ``free + S_{i−1}
    + max(0, max_{j<=i}(ready_j − free − S_{j−1}))`` with ``S`` the cumulative service."""
    done_before = free_s + np.concatenate(([0.0], np.cumsum(service_s)[:-1]))
    return done_before + np.maximum(np.maximum.accumulate(ready_s - done_before), 0.0)


class FastPath:
    """One request at a time on one GPU, chunk by chunk (see the module docstring).

    Parameters
    ----------
    timing : ThesisTiming or RooflineTiming
    config : EngineConfig
    num_blocks, block_size : int
    prefix : PrefixCache or None
    timeline : Timeline
    itl : QuantileSketch
        Receives every inter-token latency.
    """

    def __init__(self, timing, config, num_blocks: int, block_size: int, prefix, timeline,
                 itl) -> None:
        self.timing, self.config, self.prefix = timing, config, prefix
        self.block_size, self.timeline, self.itl = block_size, timeline, itl
        self.pool = BlockPool(num_blocks)
        self.front_end_s = timing.params.request_overhead_s
        self.free_s = 0.0
        self.cache_queries = self.cache_hits = 0

    def step(self, rows: np.ndarray, n_in: np.ndarray, n_out: np.ndarray,
             arrival: np.ndarray | None) -> dict:
        """Serve the next requests (in service order); returns per-request arrays."""
        reused, answered = self._prefix(rows, n_in, n_out)
        gpu = ~answered
        prefill, decode, chunks = self._costs(n_in, reused, n_out)
        service = np.where(gpu, prefill.duration_s + decode.duration_s, 0.0)
        o = self.front_end_s
        if arrival is None:                                  # back to back, one client
            end = self.free_s + np.cumsum(o + service)
            send = np.concatenate(([self.free_s], end[:-1]))
            start = send + o
        else:
            send = arrival
            start = send + o
            start[gpu] = lindley_start(send[gpu] + o, service[gpu], self.free_s)
            end = start + service
        first = np.where(gpu, start + prefill.duration_s, start)
        if arrival is None and n_in.size:
            self.free_s = float(end[-1])                     # the next request goes then
        elif gpu.any():
            self.free_s = float(end[gpu][-1])                # the GPU is free then
        self._timeline(gpu, start, first, n_in, n_out, decode, chunks)
        self._itl(n_in[gpu], n_out[gpu])
        return {"replica": np.zeros(n_in.size, np.int64), "arrival_s": send,
                "scheduled_s": start, "queue_s": start - (send + o), "first_token_s": first,
                "end_s": end, "n_cached_tokens": reused,
                "preemptions": np.zeros(n_in.size, np.int64),
                "timed_out": np.zeros(n_in.size, bool)}

    # --- prefix cache -------------------------------------------------------------------

    def _prefix(self, rows, n_in, n_out) -> tuple[np.ndarray, np.ndarray]:
        """Reused prompt tokens per request, and which requests the ``full`` policy answers
        from the cache (no GPU work)."""
        reused = np.zeros(n_in.size, np.int64)
        answered = np.zeros(n_in.size, bool)
        if self.prefix is None:
            return reused, answered
        policy = self.prefix.config.policy
        for k, (i, n, m) in enumerate(zip(rows.tolist(), n_in.tolist(), n_out.tolist(),
                                          strict=True)):
            if policy == "blocks":
                reused[k] = self._blocks(i, n, m)
            elif self.prefix.serve(i, n):
                reused[k] = n - 1
                answered[k] = policy == "full"
        if policy != "blocks":
            self.cache_queries += int(n_in[n_in >= self.prefix.config.min_tokens].sum())
            self.cache_hits += int(reused.sum())
        return reused, answered

    def _blocks(self, i: int, n_in: int, n_out: int) -> int:
        """One request through the pool: reuse its cached head, hold its blocks to the end,
        register its full prompt blocks, free everything (as the stepped engine does)."""
        size, pool = self.block_size, self.pool
        keys = self.prefix.block_keys(i, n_in // size)
        hit, _ = pool.match(keys, (n_in - 1) // size)
        pool.acquire(keys[:hit])
        held = -(-(n_in + n_out - 1) // size)
        pool.allocate(held - hit)
        hashed = keys[:hit] + [k for k in keys[hit:] if pool.register(k)]
        pool.release(held - len(hashed), hashed)
        self.cache_queries += n_in
        self.cache_hits += hit * size
        return hit * size

    # --- time ---------------------------------------------------------------------------

    def _costs(self, n_in, reused, n_out):
        """Prefill and decode costs per request, and the prefill chunks (owner, tokens,
        cached before, costs) of the timeline."""
        timing = self.timing
        if isinstance(timing, ThesisTiming):
            prefill, decode = timing.request_costs(n_in, reused, n_out)
            owner = np.arange(n_in.size)
            return prefill, decode, (owner, n_in - reused, reused, prefill)
        budget = self.config.max_num_batched_tokens
        todo = n_in - reused
        if self.config.chunked_prefill and timing.kv_cache:
            counts = np.maximum(-(-todo // budget), 1)
        else:
            counts = np.ones(n_in.size, np.int64)
        owner = np.repeat(np.arange(n_in.size), counts)
        within = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
        size = np.where(counts[owner] > 1, np.minimum(budget, todo[owner] - within * budget),
                        todo[owner])
        before = reused[owner] + np.where(counts[owner] > 1, within * budget, 0)
        costs = timing.pass_costs(size, before)
        prefill = type(costs)(*(np.bincount(owner, c, minlength=n_in.size) for c in costs))
        return prefill, timing.decode_costs(n_in, n_out), (owner, size, before, costs)

    def _timeline(self, gpu, start, first, n_in, n_out, decode, chunks) -> None:
        """The requests' intervals: their prefill chunks, then one decode run each."""
        owner, size, before, costs = chunks
        keep = gpu[owner]
        owner, size, before = owner[keep], size[keep], before[keep]
        costs = [np.asarray(c)[keep] for c in costs]
        cum = np.cumsum(costs[0]) - costs[0]
        heads = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if owner.size else owner
        offset = cum - np.repeat(cum[heads], np.diff(np.r_[heads, owner.size]))
        if isinstance(self.timing, ThesisTiming):                # eqs. 4.3 and 4.4
            steps = n_out if self.timing.kv_cache else n_out * (n_out + 1) // 2
        else:
            steps = np.maximum(n_out - 1, 0)
        d = gpu & (decode.duration_s > 0)
        kv, bs = self.timing.kv_cache, self.block_size
        pre_blocks = -(-(before + size) // bs) if kv else np.zeros(size.size, np.int64)
        dec_blocks = -(-(n_in + n_out - 1) // bs) if kv else np.zeros(n_in.size, np.int64)
        columns = {
            "replica": np.zeros(size.size + int(d.sum()), np.int64),
            "start_s": np.concatenate((start[owner] + offset, first[d])),
            "duration_s": np.concatenate((costs[0], decode.duration_s[d])),
            "n_steps": np.concatenate((np.ones(size.size, np.int64), steps[d])),
            "n_seqs": np.ones(size.size + int(d.sum()), np.int64),
            "prefill_tokens": np.concatenate((size, np.zeros(int(d.sum()), np.int64))),
            "decode_tokens": np.concatenate((np.zeros(size.size, np.int64), steps[d])),
            "kv_blocks_used": np.concatenate((pre_blocks, dec_blocks[d])),
            "flops": np.concatenate((costs[1], np.asarray(decode.flops)[d])),
            "dram_bytes": np.concatenate((costs[2], np.asarray(decode.bytes)[d])),
            "compute_s": np.concatenate((costs[3], np.asarray(decode.compute_s)[d])),
            "memory_s": np.concatenate((costs[4], np.asarray(decode.memory_s)[d])),
        }
        order = np.argsort(columns["start_s"], kind="stable")
        self.timeline.add_arrays({k: v[order] for k, v in columns.items()})

    def _itl(self, n_in, n_out) -> None:
        """Every decode step's latency into the ITL sketch, at most about
        ``2 × ITL_BATCH_TOKENS`` steps at a time however long one answer is."""
        n_in, n_out = _itl_pieces(n_in, n_out, ITL_BATCH_TOKENS)
        m = n_out - 1
        bounds = np.searchsorted(np.cumsum(m), np.arange(ITL_BATCH_TOKENS, int(m.sum()),
                                                         ITL_BATCH_TOKENS))
        for part in np.split(np.arange(n_in.size), bounds + 1):
            if part.size:
                self.itl.add_weighted(*self.timing.inter_token_latencies(n_in[part],
                                                                         n_out[part]))


def _itl_pieces(n_in: np.ndarray, n_out: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Requests cut into pieces of at most ``size`` decode steps, as ``(n_in, n_out)`` of
    equivalent requests: the piece of steps ``k0 … k0 + L − 1`` of a request decodes at
    contexts ``n_in + k0 + 1 …``, exactly the steps of a request ``(n_in + k0, L + 1)``."""
    m = np.maximum(n_out - 1, 0)
    pieces = np.maximum(-(-m // size), 1)
    owner = np.repeat(np.arange(n_in.size), pieces)
    first = np.arange(owner.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = first * size
    return n_in[owner] + start, np.minimum(size, m[owner] - start) + 1


def eligible(config) -> bool:
    """Whether :class:`FastPath` gives the stepped engine's results for this configuration
    (one replica of one pipeline stage, one request at a time, no client timeout, synchronous
    scheduling; any timing model)."""
    return (config.replicas == 1 and config.max_num_seqs == 1
            and config.request_timeout_s is None and config.pipeline_parallel_size == 1
            and not config.async_scheduling)
