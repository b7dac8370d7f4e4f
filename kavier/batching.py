"""Serving under load: continuous (iteration-level) batching on N GPU replicas.

Each replica runs a scheduler in the style of vLLM V1:

* every step it first gives each running request its next work (one decode token, or the next
  chunk of its prompt), then admits waiting requests first-come first-served while the token
  budget (``max_num_batched_tokens``), the sequence limit (``max_num_seqs``) and the KV pool
  allow; with chunked prefill a prompt may be split across steps, without it a prompt must fit
  the budget whole;
* the KV pool holds ``pool_blocks`` blocks of ``block_size`` tokens; a request holds the
  blocks of every token it has computed. When a running request needs a block and none is
  free, the newest running request is preempted (recompute: its blocks are freed, and it
  restarts with its prompt plus the tokens generated so far as the new prompt);
* the step's duration comes from :meth:`kavier.timing.RooflineTiming.step_s` (sum of the
  sequences' compute, one weight streaming plus every sequence's KV reads, overheads);
* a prompt's last chunk emits the first token (TTFT); each decode step one token (ITL);
* with a prefix cache, each replica has its own (its GPU's KV blocks), consulted when a
  request is admitted.

Requests arrive at their trace times (optionally rescaled, or replaced by a Poisson process)
and a router picks a replica: ``round-robin``, ``least-outstanding`` (fewest requests
waiting or running), or ``prefix-affinity`` (same session or same first prompt block → same
replica, so its prefix cache can hit). With one replica, ``max_num_seqs = 1``, a budget that
fits every prompt and no arrival times the results equal the sequential engine's exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from archive.errors import InputError
from kavier.cache import PrefixCache
from kavier.stats import QuantileSketch
from kavier.timing import RooflineTiming

if TYPE_CHECKING:
    import pandas as pd

ROUTERS = ("round-robin", "least-outstanding", "prefix-affinity")


@dataclass(frozen=True)
class BatchingConfig:
    """Scheduler settings of every replica (vLLM's names).

    Attributes
    ----------
    replicas : int
    max_num_seqs : int
        Requests running at once per replica (vLLM default 256).
    max_num_batched_tokens : int
        Tokens per step (vLLM V1 default 8,192 with chunked prefill).
    chunked_prefill : bool
    block_size : int
        Tokens per KV block (vLLM default 16).
    pool_blocks : int
        KV blocks per replica.
    router : str
        One of :data:`ROUTERS`.
    """

    replicas: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    block_size: int = 16
    pool_blocks: int = 100_000
    router: str = "round-robin"


class _Replica:
    def __init__(self, index: int, config: BatchingConfig) -> None:
        self.index, self.config = index, config
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.free_blocks = config.pool_blocks
        self.busy_until = None                 # end of the step in progress, or None
        self.step: tuple | None = None
        self.busy_s = 0.0
        self.block_seconds = 0.0

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)


class BatchSimulator:
    """Simulate a workload on ``config.replicas`` replicas with continuous batching.

    Parameters
    ----------
    timing : RooflineTiming
        The per-pass model, extended to batches by its ``step_s``.
    config : BatchingConfig
    cache : PrefixCache or None
        Block-level prefix reuse at admission (the prompt's reused tokens are not computed);
        each replica gets its own cache with these settings.

    Raises
    ------
    InputError
        For a timing model without batch steps (the thesis model), an unknown router, or a
        request whose KV cannot fit in an empty pool (reported, not simulated).
    """

    def __init__(self, timing, config: BatchingConfig, cache: PrefixCache | None = None):
        if not isinstance(timing, RooflineTiming):
            raise InputError("continuous batching needs the roofline timing model "
                             "(--timing-model roofline or a calibrated profile)",
                             field="timing-model")
        if config.router not in ROUTERS:
            raise InputError(f"unknown router {config.router!r}; known: {', '.join(ROUTERS)}",
                             field="router")
        self.timing, self.config, self.cache = timing, config, cache
        # one prefix cache per replica (each GPU keeps its own KV blocks), same settings
        self.caches = [] if cache is None else [cache] + [
            PrefixCache(cache.config, cache.content, cache.sessions)
            for _ in range(config.replicas - 1)]

    def run(self, requests: pd.DataFrame, rows: np.ndarray | None = None,
            steps: list | None = None) -> tuple[pd.DataFrame, dict]:
        """Serve ``requests`` (``n_input_tokens``, ``n_output_tokens``, optional ``arrival_s``
        and ``session_id``; ``rows`` are their trace rows, for the prefix cache).

        Returns
        -------
        DataFrame, dict
            Per request: ``id, replica, arrival_s, start_s, queue_s, ttft_s, tpot_s, e2e_s,
            end_s, n_input_tokens, n_output_tokens, n_cached_tokens, preemptions``; and a
            summary with p50/p90/p99 of TTFT, TPOT, ITL, E2E, throughput, busy fraction and
            mean KV occupancy per replica. ``steps`` (a list), when given, receives one
            ``(replica, start_s, duration_s, n_seqs, prefill_tokens, decode_tokens,
            kv_blocks)`` per step.
        """
        self._setup(requests, rows)
        self._steps = steps
        while True:
            busy = [(r.busy_until, r.index) for r in self.replicas if r.busy_until is not None]
            next_step = min(busy) if busy else (np.inf, -1)
            if self.next_arrival < len(self.order) and (
                    self.arrival[self.order[self.next_arrival]] <= next_step[0]):
                i = self.order[self.next_arrival]
                self.next_arrival += 1
                replica = self._route(i)
                replica.waiting.append(i)
                if replica.busy_until is None:
                    self._start_step(replica, self.arrival[i])
                else:
                    self._interrupt(replica, self.arrival[i])
            elif busy:
                replica = self.replicas[next_step[1]]
                self._finish_step(replica)
                self._start_step(replica, next_step[0])
            else:
                break
        return self._results()

    # --- set-up and routing ------------------------------------------------------------

    def _setup(self, requests: pd.DataFrame, rows) -> None:
        n = len(requests)
        self.n_in = requests["n_input_tokens"].to_numpy(np.int64)
        self.n_out = np.maximum(requests["n_output_tokens"].to_numpy(np.int64), 1)
        self.arrival = (requests["arrival_s"].to_numpy(np.float64) if "arrival_s" in requests
                        else np.zeros(n))
        self.order = np.argsort(self.arrival, kind="stable")
        self.rows = np.arange(n) if rows is None else np.asarray(rows)
        self.sessions = (requests["session_id"].to_numpy() if "session_id" in requests
                         else None)
        self.next_arrival = 0
        self.prompt = self.n_in.copy()          # tokens to compute before the next token
        self.reused = np.zeros(n, np.int64)
        self.computed = np.zeros(n, np.int64)   # tokens in the KV cache
        self.generated = np.zeros(n, np.int64)
        self.blocks = np.zeros(n, np.int64)
        self.preemptions = np.zeros(n, np.int64)
        self.started = np.zeros(n, bool)
        self.looked_up = np.zeros(n, bool)
        self.start = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.last = np.full(n, np.nan)
        self.end = np.full(n, np.nan)
        self.replica_of = np.full(n, -1, np.int64)
        self.replicas = [_Replica(k, self.config) for k in range(self.config.replicas)]
        self.itl = QuantileSketch()
        too_big = (np.ceil((self.n_in + self.n_out) / self.config.block_size)
                   > self.config.pool_blocks)
        if too_big.any():
            i = int(np.argmax(too_big))
            raise InputError(f"request {i} needs {self.n_in[i] + self.n_out[i]} tokens of KV, "
                             f"more than a replica's pool of {self.config.pool_blocks} blocks",
                             field="n_input_tokens")

    def _route(self, i: int) -> _Replica:
        self.replica_of[i] = k = self._pick(i)
        return self.replicas[k]

    def _pick(self, i: int) -> int:
        n = self.config.replicas
        if n == 1:
            return 0
        if self.config.router == "round-robin":
            return (self.next_arrival - 1) % n       # requests routed before this one
        if self.config.router == "prefix-affinity":
            if self.sessions is not None:
                return hash(self.sessions[i]) % n
            if self.cache is not None and (prompt := self.cache.content.row(self.rows[i])).size:
                return hash(int(prompt[0])) % n
        return min(range(n), key=lambda k: (self.replicas[k].outstanding, k))

    # --- one step ----------------------------------------------------------------------------

    def _blocks_for(self, ids, ahead):
        """Blocks that requests ``ids`` hold once ``ahead`` more tokens are computed."""
        return -(-(self.computed[ids] + ahead) // self.config.block_size)

    def _blocks_needed(self, i: int, new: int) -> int:
        return self._blocks_for(i, new) - self.blocks[i]

    def _preempt(self, replica: _Replica, i: int) -> None:
        """Recompute preemption: free ``i``'s blocks; it restarts with its prompt plus the
        tokens generated so far as the new prompt, first in line."""
        replica.running.remove(i)
        replica.free_blocks += self.blocks[i]
        self.blocks[i] = 0
        self.computed[i] = 0
        self.prompt[i] = self.n_in[i] + self.generated[i]
        self.reused[i] = 0
        self.preemptions[i] += 1
        replica.waiting.appendleft(i)

    def _schedule(self, replica: _Replica) -> list[tuple[int, int, bool]]:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        batch = self._schedule_running_fast(replica)
        if batch is not None:
            budget -= sum(b[1] for b in batch)
        else:
            batch, budget = self._schedule_running(replica, budget)
        return self._admit(replica, batch, budget)

    def _schedule_running_fast(self, replica: _Replica) -> list | None:
        """The running requests' work for the next step, vectorized; None when the pool
        cannot hold it (then :meth:`_schedule_running` preempts one by one)."""
        ids = np.array(replica.running, np.int64)
        if not ids.size:
            return []
        decoding = self.computed[ids] >= self.prompt[ids]
        wanted = np.where(decoding, 1, self.prompt[ids] - self.computed[ids])
        before = np.cumsum(wanted) - wanted
        new = np.clip(self.config.max_num_batched_tokens - before, 0, wanted)
        need = np.maximum(self._blocks_for(ids, new) - self.blocks[ids], 0)
        if need.sum() > replica.free_blocks:
            return None
        keep = new > 0
        return list(zip(ids[keep].tolist(), new[keep].tolist(), decoding[keep].tolist(),
                        strict=True))

    def _schedule_running(self, replica: _Replica, budget: int) -> tuple[list, int]:
        batch = []
        for i in list(replica.running):
            if budget == 0 or i not in replica.running:
                continue
            decoding = self.computed[i] >= self.prompt[i]
            new = 1 if decoding else min(self.prompt[i] - self.computed[i], budget)
            while self._blocks_needed(i, new) > replica.free_blocks and i in replica.running:
                self._preempt(replica, replica.running[-1])       # the newest goes first
            if i not in replica.running:
                continue
            budget -= new
            batch.append((i, new, bool(decoding)))
        return batch, budget

    def _admit(self, replica: _Replica, batch: list, budget: int) -> list:
        cfg = self.config
        while replica.waiting and len(replica.running) < cfg.max_num_seqs and budget > 0:
            i = replica.waiting[0]
            if not self.looked_up[i] and self.caches:
                self.looked_up[i] = True
                self.reused[i] = int(self.caches[replica.index].serve(
                    np.array([self.rows[i]]), self.n_in[i:i + 1])[0])
                self.computed[i] = self.reused[i]
            remaining = self.prompt[i] - self.computed[i]
            new = min(remaining, budget)
            if new < remaining and not cfg.chunked_prefill:
                if batch:
                    break
                new = remaining          # a lone prompt larger than the budget still runs
            if self._blocks_needed(i, new) > replica.free_blocks:
                break
            replica.waiting.popleft()
            replica.running.append(i)
            budget -= new
            batch.append((i, new, False))
        return batch

    def _start_step(self, replica: _Replica, now: float) -> None:
        batch = self._schedule(replica)
        if not batch:
            replica.busy_until = None
            return
        ids = np.array([b[0] for b in batch])
        new = np.array([b[1] for b in batch], np.int64)
        decoding = np.array([b[2] for b in batch])
        if decoding.all():
            durations = self._decode_run(replica, ids)
        else:
            starting = ~self.started[ids]
            self.started[ids] = True
            self.start[ids[starting]] = now
            self._allocate(replica, ids, new)
            durations = np.array([self.timing.step_s(new, self.computed[ids], decoding,
                                                     int(starting.sum()))])
        replica.step = [now, durations, ids, new, decoding]
        replica.busy_until = now + float(durations.sum())

    def _decode_run(self, replica: _Replica, ids: np.ndarray) -> np.ndarray:
        """A run of pure-decode steps with the same batch, until a request finishes or the
        pool runs short: nothing else can change the schedule before then (admission has
        just failed and only gets harder while decoding fills blocks), so the steps are
        computed at once; an arrival routed here ends the run early (:meth:`_interrupt`).
        Returns the steps' durations; blocks for all of them are allocated now."""
        k = int((self.n_out[ids] - self.generated[ids]).min())
        held = self.blocks[ids]

        def blocks_for(steps: int) -> int:
            return int(np.maximum(self._blocks_for(ids, steps) - held, 0).sum())

        if blocks_for(k) > replica.free_blocks:
            lo, hi = 1, k                       # the single-step path preempts at 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if blocks_for(mid) <= replica.free_blocks else (lo, mid - 1)
            k = lo
        durations = self.timing.decode_steps_s(ids.size, float(self.computed[ids].sum()), k)
        self._allocate(replica, ids, k)
        return durations

    def _allocate(self, replica: _Replica, ids: np.ndarray, ahead) -> None:
        """Hold exactly the blocks ``ids`` need once ``ahead`` more tokens are computed
        (taking blocks from the pool or giving them back)."""
        target = self._blocks_for(ids, ahead)
        replica.free_blocks -= int((target - self.blocks[ids]).sum())
        self.blocks[ids] = target

    def _interrupt(self, replica: _Replica, at: float) -> None:
        """End a decode run at the first step boundary at or after ``at``."""
        t0, durations, ids = replica.step[0], replica.step[1], replica.step[2]
        if durations.size <= 1:
            return
        ends = t0 + np.cumsum(durations)
        keep = min(int(np.searchsorted(ends, at)) + 1, durations.size)
        if keep < durations.size:
            replica.step[1] = durations[:keep]
            replica.busy_until = float(ends[keep - 1])
            self._allocate(replica, ids, keep)

    def _finish_step(self, replica: _Replica) -> None:
        now, durations, ids, new, decoding = replica.step
        k = durations.size
        end = now + float(durations.sum())
        replica.busy_s += end - now
        replica.block_seconds += (end - now) * (self.config.pool_blocks - replica.free_blocks)
        if self._steps is not None:
            starts = now + np.concatenate(([0.0], np.cumsum(durations)[:-1]))
            for start, duration in zip(starts, durations, strict=True):
                self._steps.append((replica.index, float(start), float(duration), len(ids),
                                    int(new[~decoding].sum()), int(decoding.sum()),
                                    self.config.pool_blocks - replica.free_blocks))
        if k > 1:                                   # a decode run: k tokens for every request
            first_end = now + durations[0]
            self.itl.add(first_end - self.last[ids])
            self.itl.add(durations[1:], weight=ids.size)
            self.computed[ids] += k
            self.generated[ids] += k
            self.last[ids] = end
            tokens = ids
        else:
            self.computed[ids] += new
            tokens = ids[self.computed[ids] >= self.prompt[ids]]
            had = tokens[self.generated[tokens] > 0]
            self.itl.add(end - self.last[had])
            self.first[tokens[self.generated[tokens] == 0]] = end
            self.generated[tokens] += 1
            self.last[tokens] = end
        done = tokens[self.generated[tokens] >= self.n_out[tokens]]
        self.end[done] = end
        for i in done:
            replica.running.remove(i)
            replica.free_blocks += self.blocks[i]
            self.blocks[i] = 0
        replica.busy_until = None

    def cache_stats(self) -> dict | None:
        """Prefix-cache counters summed over the replicas' caches (ratios recomputed)."""
        if not self.caches:
            return None
        n, tokens = len(self.n_in), int(self.n_in.sum())
        per = [c.stats(n, tokens, 0) for c in self.caches]
        out = {**per[0]}
        for key in ("lookups", "hits", "evictions", "blocks_looked_up", "blocks_hit"):
            if key in out:
                out[key] = sum(p[key] for p in per)
        out["reused_tokens"] = int(self.reused.sum())
        out["hit_ratio_lookups"] = out["hits"] / out["lookups"] if out["lookups"] else 0.0
        out["hit_ratio_requests"] = out["hits"] / n if n else 0.0
        out["token_reuse_ratio"] = out["reused_tokens"] / tokens if tokens else 0.0
        if "blocks_looked_up" in out:
            out["block_hit_ratio"] = (out["blocks_hit"] / out["blocks_looked_up"]
                                      if out["blocks_looked_up"] else 0.0)
        return out

    # --- results -----------------------------------------------------------------------------

    def _results(self) -> tuple[pd.DataFrame, dict]:
        import pandas as pd  # here: ``kavier simulate`` without batching runs without pandas

        queue = self.start - self.arrival
        ttft = self.first - self.arrival
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(self.n_out > 1, (self.end - self.first) / (self.n_out - 1), np.nan)
        out = pd.DataFrame({
            "id": self.rows, "replica": self.replica_of, "arrival_s": self.arrival,
            "start_s": self.start, "queue_s": queue, "ttft_s": ttft, "tpot_s": tpot,
            "e2e_s": self.end - self.arrival, "end_s": self.end,
            "n_input_tokens": self.n_in, "n_output_tokens": self.n_out,
            "n_cached_tokens": self.reused, "preemptions": self.preemptions})
        makespan = float(np.nanmax(self.end) - np.nanmin(self.arrival)) if len(out) else 0.0
        summary = {"n_requests": len(out), "replicas": self.config.replicas,
                   "makespan_s": makespan,
                   "output_throughput_tok_s": float(self.n_out.sum() / makespan)
                   if makespan > 0 else None,
                   "preemptions": int(self.preemptions.sum()),
                   "busy_fraction": [r.busy_s / makespan if makespan > 0 else None
                                     for r in self.replicas],
                   "mean_kv_blocks_used": [r.block_seconds / r.busy_s if r.busy_s else 0.0
                                           for r in self.replicas],
                   "mean_queue_s": float(np.nanmean(queue))}
        for name, values in (("ttft_s", ttft), ("tpot_s", tpot), ("e2e_s", out["e2e_s"])):
            sketch = QuantileSketch()
            sketch.add(np.asarray(values))
            summary.update(sketch.percentiles(name))
        summary.update(self.itl.percentiles("itl_s"))
        return out, summary


def arrivals(requests: pd.DataFrame, rate_scale: float | None = None,
             poisson_rate: float | None = None, seed: int = 0) -> pd.DataFrame:
    """The requests with arrival times rescaled (``arrival_s / rate_scale``: 2 doubles the
    load) or replaced by a Poisson process of ``poisson_rate`` requests per second (seeded)."""
    out = requests.copy()
    if poisson_rate:
        gaps = np.random.default_rng(seed).exponential(1.0 / poisson_rate, len(out))
        out["arrival_s"] = np.cumsum(gaps) - gaps[0]
    elif rate_scale and "arrival_s" in out:
        out["arrival_s"] = out["arrival_s"] / rate_scale
    return out


def energy_wh(summary: dict, power) -> float:
    """GPU energy of a batched run, Wh: each replica at ``power.power_w(1)`` while stepping and
    ``P_idle`` otherwise, over the makespan (utilization is full during a step, as in
    Listing 4.3's cap of 1)."""
    makespan = summary["makespan_s"]
    busy = np.array([b * makespan for b in summary["busy_fraction"]])
    return float((busy * power.power_w(1.0) + (makespan - busy) * power.power_w(0.0)).sum()
                 / 3600.0)


def goodput(requests: pd.DataFrame, slo_ttft_s: float | None, slo_tpot_s: float | None
            ) -> float:
    """Share of requests meeting both SLOs (TTFT ≤ ``slo_ttft_s``, TPOT ≤ ``slo_tpot_s``;
    a missing SLO is not checked)."""
    ok = np.ones(len(requests), bool)
    if slo_ttft_s is not None:
        ok &= requests["ttft_s"].to_numpy() <= slo_ttft_s
    if slo_tpot_s is not None:
        tpot = requests["tpot_s"].to_numpy()
        ok &= np.isnan(tpot) | (tpot <= slo_tpot_s)
    return float(ok.mean()) if len(ok) else 0.0

