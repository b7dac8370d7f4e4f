"""The engine: vLLM V1's iteration-level scheduler on one or more GPU replicas.

Every replica runs this loop (``vllm/v1/core/sched/scheduler.py``):

* **Running requests first.** Each gets its next tokens — one decode token, or the next chunk
  of its prompt — while the step's token budget (``max_num_batched_tokens``) lasts. A request
  whose next tokens need a KV block when none is free preempts the newest running request
  (recompute: its blocks are freed, it goes back to the head of the waiting queue with its
  prompt plus the tokens generated so far as its new prompt), until it fits or is itself the
  one preempted.
* **Then waiting requests, first come first served,** while the budget, ``max_num_seqs`` and
  the KV pool allow; none in a step that preempted (vLLM's rule). With chunked prefill a
  prompt may be split across steps; without it a prompt must fit the rest of the budget whole
  (a lone prompt larger than the budget still runs, alone).
* Requests catch their computed tokens up to their tokens; there are no separate prefill and
  decode phases. The step that computes a prompt's last token emits the first output token
  (TTFT); every later step one token (ITL).
* **One KV pool** (:class:`~kavier.sim.kvpool.BlockPool`) holds running requests' blocks and
  cached prompt blocks; at admission a request reuses the longest cached run of its leading
  prompt blocks (vLLM's automatic prefix caching), also after a preemption.

Time: a step lasts :meth:`~kavier.models.timing.RooflineTiming.step_costs` of its batch.
Requests are sent at their trace times (or, back to back, when the previous one finishes); the
front end (``request_overhead_s``: HTTP, tokenization, streaming) delays each one's arrival at
the engine and never occupies the GPU.

Data parallelism with expert parallelism (``enable_expert_parallel`` over several replicas):
the replicas are vLLM's data-parallel ranks and step **in lockstep**. Every expert layer
exchanges the tokens of all ranks (all-gather and reduce-scatter), so no rank's step ends
before the slowest rank's; a rank with nothing to run executes a dummy one-token batch
meanwhile (vLLM's ``execute_dummy_batch``), and a request reaching an idle rank while the
others step waits for the next common step boundary. Each step of the group lasts the longest
of its ranks' steps (``vllm/v1/engine/core.py``, ``DPEngineCoreProc``).

Async scheduling (``async_scheduling``, vLLM's ``--async-scheduling``, its default since 0.14;
vLLM PR 19970): the scheduler builds step N+1's batch when step N starts, one step ahead of the
GPU. A running request loses nothing (its next token is a placeholder), but a request that
reaches a busy engine during step N missed that scheduling and joins step N+2: admission
considers only requests that reached the engine before the step that is ending began. An idle
engine schedules an arrival at once.

Pipeline parallelism (``pipeline_parallel_size`` PP > 1): a replica is PP stages of TP GPUs
and keeps up to PP batches in flight (vLLM V1's batch queue, ``step_with_batch_queue``). When
the queue has room the scheduler builds another batch at once from the requests not in
flight — a decoding request waits for its token, a prompt's next chunk may follow the last —
and computed tokens advance at scheduling, as vLLM's do; otherwise the engine waits for the
oldest batch (an arrival meanwhile is scheduled when it returns). A batch passes the stages in
order, each taking the batch's stage time (:meth:`RooflineTiming.step_costs` of one stage's
layers), with :meth:`RooflineTiming.p2p_s` between them, and enters a stage when the batch
before it has left it: bubbles appear when batches differ in size or the queue runs dry. The
timeline has one row per batch and stage (GPU group ``replica × PP + stage``). Requests in
flight are neither preempted nor timed out until their batch returns.

Speed: once a step holds only decode tokens and nothing can be admitted, the batch stays the
same until a request finishes, a block runs short, an arrival may be admitted or a client
times out; that run of steps is computed at once
(:meth:`~kavier.models.timing.RooflineTiming.decode_run`) and recorded as one timeline interval.
Where :func:`kavier.sim.compiled.applies`, runs step in :mod:`kavier.sim.compiled`, this loop
compiled, with identical results.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from kavier.models.timing import Costs, ExpertGroup
from kavier.sim.kvpool import BlockPool
from kavier.sim.prefix import PrefixCache, first_block
from kavier.sim.routers import Router
from kavier.sim.stats import QuantileSketch

MAX_RUN_STEPS = 1 << 20
"""Longest decode run computed at once (a longer one continues as the next run): memory stays
bounded by the batch, not by one answer's length (a 10^8-token answer would need 4 GB)."""


class _Replica:
    def __init__(self, index: int, num_blocks: int, exact: PrefixCache | None) -> None:
        self.index = index
        self.waiting: deque[int] = deque()
        self.running: list[int] = []
        self.pool = BlockPool(num_blocks)
        self.exact = exact
        self.busy_until: float | None = None
        self.step: list | None = None
        self.cutoff = 0.0         # async scheduling: arrivals up to here are seen
        self.lagged = False       # async scheduling: an arrival waits for the next step
        self.flight: deque[list] = deque()       # pipeline parallelism: batches in flight
        self.stage_free: list[float] = []        # when each stage's last batch leaves it


def _unzip(batch: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A schedule's ``(request, new tokens, decoding)`` tuples as three arrays."""
    return (np.array([b[0] for b in batch], np.int64), np.array([b[1] for b in batch], np.int64),
            np.array([b[2] for b in batch], bool))


class SteppedEngine:
    """Step-by-step simulation of every replica (the general path).

    Parameters
    ----------
    timing : RooflineTiming
    config : EngineConfig
    num_blocks : int
        KV blocks per replica.
    block_size : int
        Tokens per block.
    prefix : PrefixCache or None
        Prompt content and policy; ``blocks`` reuses pool blocks, ``prefill``/``full`` use an
        exact-match cache per replica (thesis Listing 4.2).
    timeline : Timeline
        Receives every interval.
    """

    def __init__(self, timing, config, num_blocks: int, block_size: int,
                 prefix: PrefixCache | None, timeline) -> None:
        self.timing, self.config, self.timeline = timing, config, timeline
        self.block_size, self.num_blocks, self.prefix = block_size, num_blocks, prefix
        self.kv = timing.kv_cache
        self.blocks_policy = prefix is not None and prefix.config.policy == "blocks"
        self.exact_policy = prefix is not None and not self.blocks_policy
        self.front_end_s = timing.params.request_overhead_s
        self.lockstep = config.enable_expert_parallel and config.replicas > 1
        self.pp = config.pipeline_parallel_size
        self.ahead = config.async_scheduling

    # --- the run ---------------------------------------------------------------------------

    def run(self, n_in: np.ndarray, n_out: np.ndarray, arrival: np.ndarray,
            sessions=None) -> dict:
        """Serve every request; returns per-request arrays (see :meth:`_results`).

        ``arrival`` are send times (ignored back to back); ``n_out`` >= 1.
        """
        self._setup(n_in, n_out, arrival, sessions)
        if self.lockstep:
            return self._run_lockstep()
        while True:
            busy = [(r.busy_until, r.index) for r in self.replicas if r.busy_until is not None]
            next_step = min(busy) if busy else (np.inf, -1)
            ready = self._next_ready()
            if ready <= next_step[0] and ready < np.inf:
                self._arrive(self.order[self.next_arrival], ready)
            elif busy:
                replica = self.replicas[next_step[1]]
                if self.pp > 1:
                    self._finish_batch(replica)
                    self._fill(replica, next_step[0])
                else:
                    self._finish_step(replica)
                    self._start_step(replica, next_step[0])
            else:
                break
        self.timeline.flush()
        return self._results()

    def _run_lockstep(self) -> dict:
        """The event loop of data-parallel ranks stepping together (module docstring)."""
        while True:
            ready = self._next_ready()
            until = self.replicas[0].busy_until
            if ready < np.inf and (until is None or ready <= until):
                self._arrive(self.order[self.next_arrival], ready)
            elif until is not None:
                for replica in self.replicas:
                    self._finish_step(replica)
                self._start_group(until)
            else:
                break
        self.timeline.flush()
        return self._results()

    def _start_group(self, now: float) -> None:
        """One lockstep step of every rank: each schedules its own batch, whose costs follow
        the group's tokens in the expert layers (:class:`ExpertGroup`); all last as long as
        the slowest; ranks without work run a dummy one-token batch (none when no rank has
        work)."""
        batches = [self._schedule(r, now) for r in self.replicas]
        if not any(batches):
            for replica in self.replicas:
                replica.busy_until = None
            return
        tokens = [sum(b[1] for b in batch) if batch else 1 for batch in batches]
        group = ExpertGroup.of(tokens)
        steps = []
        for replica, batch in zip(self.replicas, batches, strict=True):
            if batch:
                ids, new, decoding = _unzip(batch)
                self._allocate(replica, ids, new)
                costs = self.timing.step_costs(new, self.computed[ids], int(decoding.sum()),
                                               group)
            else:                                # vLLM's execute_dummy_batch
                ids = new = np.zeros(0, np.int64)
                decoding = np.zeros(0, bool)
                costs = self.timing.step_costs(np.ones(1), np.zeros(1), 1, group)
            steps.append([now, None, ids, new, decoding, costs])
        longest = max(step[5].duration_s for step, batch in zip(steps, batches, strict=True)
                      if batch)
        for replica, step in zip(self.replicas, steps, strict=True):
            step[1] = np.array([longest])
            step[5] = step[5]._replace(duration_s=longest)
            replica.step, replica.busy_until = step, now + longest

    def _setup(self, n_in, n_out, arrival, sessions) -> None:
        n, cfg = n_in.size, self.config
        self.n_in, self.n_out = n_in.astype(np.int64), n_out.astype(np.int64)
        self.arrival = (np.full(n, np.inf) if cfg.back_to_back else
                        arrival.astype(np.float64).copy())
        self.order = (np.arange(n) if cfg.back_to_back
                      else np.argsort(self.arrival, kind="stable"))
        if cfg.back_to_back and n:
            self.arrival[0] = 0.0
        self.deadline = np.full(n, np.inf)
        self.next_arrival = 0
        self.prompt = self.n_in.copy()          # tokens to compute before the next token
        self.computed = np.zeros(n, np.int64)   # tokens computed (in the KV cache)
        self.generated = np.zeros(n, np.int64)
        self.blocks = np.zeros(n, np.int64)     # blocks held
        self.hashed: dict[int, list[int]] = {}  # cached blocks held, in prompt order
        self.keys: dict[int, list[int]] = {}
        self._registered: dict[int, int] = {}   # prompt blocks registered so far
        self.reused = np.zeros(n, np.int64)
        self.preemptions = np.zeros(n, np.int64)
        self.scheduled = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.last = np.full(n, np.nan)
        self.end = np.full(n, np.nan)
        self.timed_out = np.zeros(n, bool)
        self.admitted = np.zeros(n, bool)
        self.replica_of = np.full(n, -1, np.int64)
        exact = [None] * cfg.replicas
        if self.exact_policy:
            exact = [self.prefix] + [PrefixCache(self.prefix.config, self.prefix.content,
                                                 sessions) for _ in range(cfg.replicas - 1)]
        self.replicas = [_Replica(k, self.num_blocks, exact[k]) for k in range(cfg.replicas)]
        self.inflight = np.zeros(n, np.int64)   # tokens in batches in flight (PP > 1)
        for replica in self.replicas:
            replica.stage_free = [0.0] * self.pp
        self.router = Router(cfg.router, cfg.replicas, sessions,
                             first_block(self.prefix, self.block_size))
        self.itl = QuantileSketch()
        self.cache_queries = self.cache_hits = 0
        self.exact_queries = 0

    def _next_ready(self) -> float:
        if self.next_arrival >= self.order.size:
            return np.inf
        return float(self.arrival[self.order[self.next_arrival]]) + self.front_end_s

    def _arrive(self, i: int, now: float) -> None:
        """Request ``i`` reaches the engine (front end done) and is routed."""
        self.next_arrival += 1
        if self.config.request_timeout_s is not None:
            self.deadline[i] = self.arrival[i] + self.config.request_timeout_s
        k = self.router.pick(i, [len(r.waiting) + len(r.running) for r in self.replicas])
        self.replica_of[i] = k
        replica = self.replicas[k]
        if now >= self.deadline[i]:
            self._fail(i, now)
            return
        if replica.exact is not None:
            if self.n_in[i] >= replica.exact.config.min_tokens:
                self.exact_queries += int(self.n_in[i])
            if replica.exact.serve(int(i), int(self.n_in[i])):
                self.reused[i] = self.n_in[i] - 1
                if replica.exact.config.policy == "full":   # answered from the cache
                    self.scheduled[i] = self.first[i] = self.end[i] = now
                    self._done(i, now)
                    return
        replica.waiting.append(i)
        if replica.busy_until is None:           # an idle engine (group) schedules at once
            for r in (self.replicas if self.lockstep else (replica,)):
                r.cutoff = now
            if self.lockstep:
                self._start_group(now)
            elif self.pp > 1:
                self._fill(replica, now)
            else:
                self._start_step(replica, now)
        elif (not self.lockstep and self.pp == 1
              and len(replica.running) < self.config.max_num_seqs):
            self._interrupt(replica, now)

    def _done(self, i: int, now: float) -> None:
        """Bookkeeping when request ``i`` leaves (finished or failed): back to back, the
        client sends the next one now."""
        if self.config.back_to_back and self.next_arrival < self.order.size:
            self.arrival[self.order[self.next_arrival]] = now

    def _fail(self, i: int, now: float) -> None:
        """Client timeout: the client gave up at the deadline (its end); back to back, the
        next request goes out when the engine notices, at ``now``."""
        self.timed_out[i] = True
        self.end[i] = self.deadline[i]
        self._done(i, now)

    # --- KV blocks ------------------------------------------------------------------------

    def _blocks_for(self, ids, ahead):
        """Blocks that requests ``ids`` hold once ``ahead`` more tokens are computed."""
        if not self.kv:
            return np.zeros_like(np.asarray(ids)) if np.ndim(ids) else 0
        return -(-(self.computed[ids] + ahead) // self.block_size)

    def _release(self, replica: _Replica, i: int) -> None:
        hashed = self.hashed.pop(i, [])
        replica.pool.release(int(self.blocks[i]) - len(hashed), hashed)
        self.blocks[i] = 0

    def _preempt(self, replica: _Replica, i: int) -> None:
        """Recompute preemption of ``i``: its blocks are freed (cached ones stay findable);
        it restarts first in line with its prompt plus the tokens generated so far."""
        replica.running.remove(i)
        self._release(replica, i)
        self.computed[i] = 0
        self.prompt[i] = self.n_in[i] + self.generated[i]
        self.preemptions[i] += 1
        replica.waiting.appendleft(i)

    def _abort(self, replica: _Replica, i: int, now: float) -> None:
        if i in replica.running:
            replica.running.remove(i)
            self._release(replica, i)
        self._fail(i, now)

    def _allocate(self, replica: _Replica, ids, ahead) -> None:
        """Hold exactly the blocks ``ids`` need once ``ahead`` more tokens are computed."""
        target = self._blocks_for(ids, ahead)
        extra = int(np.sum(target - self.blocks[ids]))
        if extra > 0:
            replica.pool.allocate(extra)
        elif extra < 0:                           # a shortened decode run gives blocks back
            replica.pool.release(-extra, [])
        self.blocks[ids] = target

    def _register(self, replica: _Replica, ids: np.ndarray) -> None:
        """Give newly full prompt blocks of ``ids`` their hashes (prefix caching)."""
        for i in ids.tolist():
            keys = self.keys.get(i)
            if not keys:
                continue
            held = self.hashed.setdefault(i, [])
            full = min(int(self.computed[i]) // self.block_size, len(keys))
            done = self._registered.get(i, 0)
            for b in range(done, full):
                if replica.pool.register(keys[b]):
                    held.append(keys[b])
            self._registered[i] = max(done, full)

    # --- scheduling --------------------------------------------------------------------------

    def _schedule(self, replica: _Replica, now: float) -> list[tuple[int, int, bool]]:
        if self.config.request_timeout_s is not None:
            for i in [i for i in replica.running
                      if self.deadline[i] <= now and not self.inflight[i]]:
                self._abort(replica, i, now)
        budget = self.config.max_num_batched_tokens
        batch = self._schedule_running_fast(replica)
        preempted = False
        if batch is not None:
            budget -= sum(b[1] for b in batch)
        else:
            batch, budget = self._schedule_running(replica, budget)
            preempted = True
        if preempted:
            return batch
        return self._admit(replica, batch, budget, now)

    def _wanted(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        decoding = self.computed[ids] >= self.prompt[ids]
        wanted = np.where(decoding, 1, self.prompt[ids] - self.computed[ids])
        if self.pp > 1:                         # a decode in flight waits for its token
            wanted = np.where(decoding & (self.inflight[ids] > 0), 0, wanted)
        return decoding, wanted

    def _schedule_running_fast(self, replica: _Replica) -> list | None:
        """The running requests' work, vectorized; None when the pool cannot hold it."""
        ids = np.array(replica.running, np.int64)
        if not ids.size:
            return []
        decoding, wanted = self._wanted(ids)
        before = np.cumsum(wanted) - wanted
        new = np.minimum(np.maximum(self.config.max_num_batched_tokens - before, 0), wanted)
        held = self.blocks[ids]
        target = self._blocks_for(ids, new)
        extra = int(np.maximum(target - held, 0).sum())
        if extra > replica.pool.free:
            return None
        keep = new > 0
        if extra:                               # allocated before admissions take blocks
            replica.pool.allocate(extra)
        self.blocks[ids] = np.maximum(target, held)
        return list(zip(ids[keep].tolist(), new[keep].tolist(), decoding[keep].tolist(),
                        strict=True))

    def _schedule_running(self, replica: _Replica, budget: int) -> tuple[list, int]:
        batch, batched = [], set()
        for i in list(replica.running):
            if budget == 0 or i not in replica.running:
                continue
            decoding = self.computed[i] >= self.prompt[i]
            if decoding and self.inflight[i]:
                continue
            new = 1 if decoding else min(self.prompt[i] - self.computed[i], budget)
            while (self._blocks_for(i, new) - self.blocks[i] > replica.pool.free
                   and i in replica.running):
                victim = self._victim(replica, batched)
                if victim is None:
                    break
                self._preempt(replica, victim)
            if i not in replica.running or (self._blocks_for(i, new) - self.blocks[i]
                                            > replica.pool.free):
                continue
            self._allocate(replica, np.array([i]), new)
            budget -= new
            batch.append((i, int(new), bool(decoding)))
            batched.add(i)
        return batch, budget

    def _victim(self, replica: _Replica, batched: set[int]) -> int | None:
        """The request a block shortage preempts: the newest running one, or with batches in
        flight the newest neither in one nor in the batch being scheduled (``batched``; None
        when there is none). With one stage the newest is never batched yet: the scheduler
        walks the running requests oldest first, as vLLM's, which pops its victim from the
        end of ``running``."""
        if self.pp == 1:
            return replica.running[-1]
        return next((i for i in reversed(replica.running)
                     if not self.inflight[i] and i not in batched), None)

    def _lookup(self, replica: _Replica, i: int) -> tuple[int, int, list[int]]:
        """Prefix hit of waiting request ``i``: (tokens, blocks taken from the free ones,
        keys of the hit blocks)."""
        if not self.blocks_policy:
            return 0, 0, []
        if i not in self.keys:
            self.keys[i] = self.prefix.block_keys(i, int(self.n_in[i]) // self.block_size)
        limit = (int(self.prompt[i]) - 1) // self.block_size    # recompute the last token
        hit, from_free = replica.pool.match(self.keys[i], limit)
        return hit * self.block_size, from_free, self.keys[i][:hit]

    def _admit(self, replica: _Replica, batch: list, budget: int, now: float) -> list:
        cfg = self.config
        replica.lagged = False
        while replica.waiting and len(replica.running) < cfg.max_num_seqs and budget > 0:
            i = replica.waiting[0]
            if (self.ahead and not self.admitted[i]
                    and self.arrival[i] + self.front_end_s > replica.cutoff):
                replica.lagged = True            # missed this step's scheduling
                break
            if now >= self.deadline[i]:
                replica.waiting.popleft()
                self._fail(i, now)
                continue
            hit_tokens, from_free, hit_keys = self._lookup(replica, i)
            start = hit_tokens if self.blocks_policy else (
                int(self.reused[i]) if not self.admitted[i] else 0)
            remaining = int(self.prompt[i]) - start
            new = min(remaining, budget)
            if new < remaining and (not cfg.chunked_prefill or not self.kv):
                if batch:
                    break
                new = remaining          # a lone prompt larger than the budget still runs
            blocks_needed = (-(-(start + new) // self.block_size) - len(hit_keys)
                             if self.kv else 0)
            if blocks_needed + from_free > replica.pool.free:
                break
            replica.waiting.popleft()
            replica.running.append(i)
            if hit_keys:
                replica.pool.acquire(hit_keys)
                self.hashed[i] = list(hit_keys)
            self._registered[i] = len(hit_keys)
            self.blocks[i] = len(hit_keys)
            self.computed[i] = start
            if self.blocks_policy:
                self.cache_queries += int(self.prompt[i])
                self.cache_hits += hit_tokens
            if not self.admitted[i]:
                self.admitted[i] = True
                self.scheduled[i] = now
                if self.blocks_policy:
                    self.reused[i] = hit_tokens
            self._allocate(replica, np.array([i]), new)
            budget -= new
            batch.append((i, new, False))
        return batch

    # --- steps ---------------------------------------------------------------------------------

    def _start_step(self, replica: _Replica, now: float) -> None:
        batch = self._schedule(replica, now)
        if not batch:
            replica.busy_until = None
            return
        ids, new, decoding = _unzip(batch)
        if decoding.all() and not self.lockstep:
            durations = self._decode_run(replica, ids, now)
            replica.step = [now, durations, ids, new, decoding, None]
        else:
            self._allocate(replica, ids, new)
            if self.kv:
                costs = self.timing.step_costs(new, self.computed[ids], int(decoding.sum()))
            else:                     # every pass recomputes the whole context
                full = np.where(decoding, self.computed[ids] + 1, new)
                costs = self.timing.step_costs(full, np.zeros(ids.size), int(decoding.sum()))
            durations = np.array([costs.duration_s])
            replica.step = [now, durations, ids, new, decoding, costs]
        replica.busy_until = now + float(durations.sum())

    def _decode_run(self, replica: _Replica, ids: np.ndarray, now: float):
        """Durations of a run of pure-decode steps with this batch (see the module
        docstring); blocks for all of them are allocated now."""
        k = min(int((self.n_out[ids] - self.generated[ids]).min()), MAX_RUN_STEPS)
        if replica.lagged:                      # a waiting request is seen after one step
            k = 1
        held = self.blocks[ids]

        def blocks_for(steps: int) -> int:
            return int(np.maximum(self._blocks_for(ids, steps) - held, 0).sum())

        if self.kv and blocks_for(k) > replica.pool.free:
            lo, hi = 1, k                       # the scheduler has checked that 1 fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if blocks_for(mid) <= replica.pool.free else (lo, mid - 1)
            k = lo
        durations = self.timing.decode_run(self.computed[ids], k).duration_s
        deadline = float(self.deadline[ids].min())
        if deadline < np.inf and k > 1:         # stop at the first boundary past a timeout
            ends = now + np.cumsum(durations)
            k = min(int(np.searchsorted(ends, deadline)) + 1, k)
            durations = durations[:k]
        self._allocate(replica, ids, k)
        return durations

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
        now, durations, ids, new, decoding, costs = replica.step
        k = durations.size
        end = now + float(durations.sum())
        replica.cutoff = end - float(durations[-1])      # the last step's scheduling time
        if costs is None:                         # a decode run: the first k of its steps
            costs = Costs(end - now, *self.timing.decode_run_work(self.computed[ids], k))
        self.timeline.add(replica.index, now, end - now, k, ids.size,
                          int(new[~decoding].sum()), int(k * decoding.sum()),
                          replica.pool.used, costs)
        if k > 1:                                 # k tokens for every request
            self.itl.add(np.array([now + durations[0]]) - self.last[ids])
            self.itl.add(durations[1:], weight=ids.size)
            self.computed[ids] += k
            self.generated[ids] += k
            self.last[ids] = end
            tokens = ids
        else:
            self.computed[ids] += new
            if self.blocks_policy:
                self._register(replica, ids[~decoding])
            tokens = ids[self.computed[ids] >= self.prompt[ids]]
            self._next_tokens(tokens, end)
        self._leave_if_done(replica, tokens, end)
        replica.busy_until = None

    def _next_tokens(self, tokens: np.ndarray, end: float) -> None:
        """Requests ``tokens`` get one output token at ``end`` (the first: TTFT)."""
        had = tokens[self.generated[tokens] > 0]
        self.itl.add(end - self.last[had])
        self.first[tokens[self.generated[tokens] == 0]] = end
        self.generated[tokens] += 1
        self.last[tokens] = end

    def _leave_if_done(self, replica: _Replica, tokens: np.ndarray, end: float) -> None:
        done = tokens[self.generated[tokens] >= self.n_out[tokens]]
        self.end[done] = end
        for i in done.tolist():
            replica.running.remove(i)
            self._release(replica, i)
            self._done(i, end)

    # --- pipeline parallelism ---------------------------------------------------------------

    def _fill(self, replica: _Replica, now: float) -> None:
        """Schedule batches while the pipeline has room and there is work (module
        docstring)."""
        while len(replica.flight) < self.pp:
            batch = self._schedule(replica, now)
            if not batch:
                break
            self._start_batch(replica, batch, now)
        replica.busy_until = replica.flight[0][-1] if replica.flight else None

    def _start_batch(self, replica: _Replica, batch: list, now: float) -> None:
        """Put ``batch`` into the pipeline: computed tokens advance now; each stage takes it
        when the batch before has left, after the activations' hop from the stage before."""
        ids, new, decoding = _unzip(batch)
        self._allocate(replica, ids, new)
        costs = self.timing.step_costs(new, self.computed[ids], int(decoding.sum()))
        emits = self.computed[ids] + new >= self.prompt[ids]
        self.computed[ids] += new
        self.inflight[ids] += new
        stage, hop = float(costs.duration_s), float(self.timing.p2p_s(new.sum()))
        starts, t = [], now - hop
        for s in range(self.pp):
            start = max(t + hop, replica.stage_free[s])
            starts.append(start)
            t = replica.stage_free[s] = start + stage
        replica.flight.append([starts, stage, ids, new, decoding, costs, emits, t])

    def _finish_batch(self, replica: _Replica) -> None:
        """The oldest batch leaves the last stage: its stages' intervals go to the timeline,
        and its requests get their tokens."""
        starts, stage, ids, new, decoding, costs, emits, end = replica.flight.popleft()
        prefill, decode = int(new[~decoding].sum()), int(decoding.sum())
        for s, start in enumerate(starts):
            self.timeline.add(replica.index * self.pp + s, start, stage, 1, ids.size, prefill,
                              decode, replica.pool.used, costs)
        self.inflight[ids] -= new
        if self.blocks_policy:
            self._register(replica, ids[~decoding])
        tokens = ids[emits]
        self._next_tokens(tokens, end)
        self._leave_if_done(replica, tokens, end)
        replica.busy_until = None

    # --- results ----------------------------------------------------------------------------

    def _results(self) -> dict:
        queue = self.scheduled - (self.arrival + self.front_end_s)
        return {"replica": self.replica_of, "arrival_s": self.arrival,
                "scheduled_s": self.scheduled, "queue_s": queue, "first_token_s": self.first,
                "end_s": self.end, "n_cached_tokens": self.reused,
                "preemptions": self.preemptions, "timed_out": self.timed_out}

    def cache_counters(self) -> dict:
        """Prefix-cache counters summed over the replicas (tokens and requests)."""
        if self.blocks_policy:
            return {"queries_tokens": self.cache_queries, "hits_tokens": self.cache_hits,
                    "evictions": sum(r.pool.evictions for r in self.replicas)}
        exact = [r.exact for r in self.replicas if r.exact is not None]
        return {"queries_tokens": self.exact_queries, "hits_tokens": int(self.reused.sum()),
                "evictions": sum(c.evictions for c in exact),
                "lookups": sum(c.lookups for c in exact), "hits": sum(c.hits for c in exact)}
