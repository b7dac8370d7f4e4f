"""The stepped engine, compiled: :class:`~kavier.sim.engine.SteppedEngine`'s event loop in
machine code (numba) for the configurations most runs use.

It is the same scheduler, step for step — vLLM V1's iteration-level loop of
:mod:`kavier.sim.engine` (running requests first, FCFS admissions within the token budget,
``max_num_seqs`` and the KV pool, recompute preemption of the newest with no admissions in
that step, chunked prefill on or off, async scheduling, client timeouts, decode runs computed
at once and cut by arrivals; data-parallel ranks with expert parallelism stepping in
lockstep, with dummy batches on idle ranks), the same KV pool
(:class:`~kavier.sim.kvpool.BlockPool`: plain and cached blocks, reference counts, lazy LRU
eviction, the ``blocks`` prefix cache with its chained block keys, found again after a
preemption), the same routers — and the same
arithmetic: the step costs of :meth:`RooflineTiming.step_costs` and
:meth:`RooflineTiming.decode_run` term by term in the same order, the functions of a step's
token count (weights a mixture of experts streams, their floor, the collectives) tabulated by
the timing itself, and sums in numpy's pairwise order. ``tests/test_compiled.py`` runs both
engines over many configurations and requires equal request records, timelines and summaries.

It applies (:func:`applies`) with the roofline timing and the KV cache on, one pipeline stage,
no exact-match prompt cache (``prefill``/``full``), and requests sent at their trace times;
every other run steps in Python. The only difference is speed: the
Python loop costs about 80 µs per scheduled step, this one about 3 µs
(``benchmarks/bench_engine.py``).

The loop keeps all its state in arrays and returns whenever its buffer of timeline intervals
is full, so the timeline streams out (and a crash loses nothing written) while memory stays
bounded by the buffer and the per-request state, not by the run's length. Inter-token
latencies are binned into the same log-spaced histogram as
:class:`~kavier.sim.stats.QuantileSketch`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kavier.models.timing import RooflineTiming
from kavier.sim.engine import MAX_RUN_STEPS
from kavier.sim.prefix import first_block
from kavier.sim.routers import Router
from kavier.sim.stats import QuantileSketch

# request columns (int): tokens and state
N_IN, N_OUT, PROMPT, COMPUTED, GENERATED, BLOCKS, PREEMPT, ADMITTED, REPLICA, TIMED_OUT, \
    NEXT, REUSED, REGISTERED, HASHED = range(14)
# request columns (float): times, s
ARRIVAL, DEADLINE, SCHEDULED, FIRST, LAST, END = range(6)
# replica columns (int)
FREE, PLAIN, NRUN, HEAD, TAIL, NWAIT, LAGGED, BUSY, NSTEPS, ISRUN, NB, SUMC = range(12)
# replica columns (float)
BUSY_UNTIL, CUTOFF, T0, C_DUR, C_FLOPS, C_BYTES, C_COMP, C_MEM = range(8)
# global counters
NEXT_ARRIVAL, ROUTED, ROWS, ZEROS, QUERIES, HITS, EVICTIONS = range(7)
# the KV pool's cached blocks: per slot, per replica
SL_REF, SL_KEY, SL_PREV, SL_NEXT = range(4)
L_HEAD, L_TAIL, L_TOP = range(3)
# timeline columns
TI_REPLICA, TI_STEPS, TI_SEQS, TI_PREFILL, TI_DECODE, TI_KV = range(6)
TF_START, TF_DUR, TF_FLOPS, TF_BYTES, TF_COMP, TF_MEM = range(6)
# timing constants
K_F, K_FA, K_BKV, K_TOK, K_BSTEP, K_BSEQ, K_SHARP, K_MP2, K_LM, K_APOS, K_KVB, \
    K_FRONT, K_TIMEOUT, K_LO, K_HI, K_LOGG, K_ROUTED, K_DP = range(18)
# engine settings
S_BUDGET, S_MAXSEQS, S_CHUNKED, S_AHEAD, S_BS, S_RR, S_PREFIX, S_LOCK = range(8)

INTERVALS = 65_536
"""Timeline intervals the loop collects before it hands them on."""


def applies(timing, config, prefix) -> bool:
    """Whether the compiled loop runs this configuration (the module docstring's list)."""
    return (isinstance(timing, RooflineTiming) and timing.kv_cache
            and (prefix is None or prefix.config.policy == "blocks")
            and config.pipeline_parallel_size == 1 and not config.back_to_back)


# --- arithmetic, as numpy and the timing do it ------------------------------------------------

@njit(cache=True)
def _block(a, lo, n):
    """numpy's pairwise sum of at most 128 values (``DOUBLE_pairwise_sum``'s leaves)."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = a[lo:lo + 8].copy()
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise(a, lo, n):
    """``a[lo:lo + n].sum()`` in numpy's order: halves (multiples of 8) down to blocks of
    at most 128 (the recursion of ``DOUBLE_pairwise_sum`` with an explicit stack)."""
    if n <= 128:
        return _block(a, lo, n)
    los, ns, stage, acc = (np.empty(64, np.int64), np.empty(64, np.int64),
                           np.zeros(64, np.int64), np.empty(64))
    top, val = 0, 0.0
    los[0], ns[0] = lo, n
    while True:
        m = ns[top]
        half = m // 2 - (m // 2) % 8
        if stage[top] == 0 and m <= 128:
            val = _block(a, los[top], m)
            top -= 1
        elif stage[top] < 2:                     # descend into the left, then the right half
            if stage[top] == 1:
                acc[top] = val
            stage[top] += 1
            left = stage[top] == 1
            los[top + 1] = los[top] if left else los[top] + half
            ns[top + 1] = half if left else m - half
            stage[top + 1] = 0
            top += 1
            continue
        else:
            val = acc[top] + val
            top -= 1
        if top < 0:
            return val


@njit(cache=True)
def _batch_overhead(k, n):
    if n <= 1:
        return 0.0
    return k[K_BSTEP] + (n - 1) * k[K_BSEQ]


@njit(cache=True)
def _run_work(k, wb, floor, passc, n, sumc, steps):
    """:meth:`RooflineTiming.decode_run_work`: FLOPs, bytes, compute and memory time of a
    decode run's first ``steps`` steps, closed form."""
    kk = float(steps)
    pairs = kk * float(sumc) + n * (kk * (kk + 1.0) / 2.0)
    matmul = kk * (n * (k[K_MP2] + k[K_LM]))
    attention = k[K_APOS] * pairs
    kv = k[K_KVB] * pairs
    memory = kk * floor[n] + kv / k[K_BKV]
    compute = matmul / k[K_F] + kk * passc[n] + attention / k[K_FA]
    return matmul + attention, kk * wb[n] + kv, compute, memory


@njit(cache=True)
def _run_durations(k, floor, comm, passc, n, sumc, first, steps, into):
    """Durations of steps ``first..steps − 1`` of a decode run of ``n`` sequences with
    ``sumc`` context tokens into ``into``, term by term as :meth:`RooflineTiming.decode_run`."""
    matmul = n * (k[K_MP2] + k[K_LM])
    base = matmul / k[K_F] + passc[n]
    tokens, batch = n * k[K_TOK], _batch_overhead(k, n)
    for j in range(first, steps):
        pairs = float(sumc) + n * (j + 1.0)
        compute = base + k[K_APOS] * pairs / k[K_FA]
        memory = floor[n] + k[K_KVB] * pairs / k[K_BKV]
        into[j] = max(compute, memory) + tokens + batch + comm[n]


@njit(cache=True)
def _step_costs(k, t, new, cached, nb, n_dec, gt, grec, work, out):
    """:meth:`RooflineTiming.step_costs` of ``nb`` sequences: ``out`` ← its :class:`Costs`.
    ``gt`` and ``grec``: the :class:`ExpertGroup` of a lockstep step; negative for balanced
    ranks (``DP`` of this batch), as :meth:`~RooflineTiming.step_costs` without a group."""
    wb, floor, comm, passc, commep = t
    for i in range(nb):
        n, c = float(new[i]), float(cached[i])
        work[0, i] = k[K_MP2] * n + k[K_LM]
        work[1, i] = n * c + n * (n + 1) / 2.0
        work[2, i] = n + c
        work[3, i] = n
    matmul = _pairwise(work[0], 0, nb)
    attention = k[K_APOS] * _pairwise(work[1], 0, nb)
    kv = k[K_KVB] * _pairwise(work[2], 0, nb)
    tokens = int(_pairwise(work[3], 0, nb))
    if gt < 0:
        ranks = int(k[K_DP])
        gt, grec = tokens * ranks, tokens * (ranks - 1)
    matmul = matmul + k[K_ROUTED] * (float(gt) - float(tokens) * k[K_DP])
    compute = matmul / k[K_F] + passc[gt] + attention / k[K_FA]
    weights = wb[gt]
    memory = floor[gt] + kv / k[K_BKV]
    high = max(compute, memory)
    p = k[K_SHARP]
    if n_dec != nb and not math.isnan(p) and high > 0:
        high = high * (1.0 + (min(compute, memory) / high) ** p) ** (1.0 / p)
    out[0] = high + n_dec * k[K_TOK] + _batch_overhead(k, nb) + (comm[tokens] + commep[grec])
    out[1] = matmul + attention
    out[2] = weights + kv
    out[3] = compute
    out[4] = memory


@njit(cache=True)
def _itl(k, counts, g, gf, value, weight):
    """Add an inter-token latency ``weight`` times (:meth:`QuantileSketch.add`)."""
    if math.isnan(value) or weight < 1:
        return
    gf[0] = min(gf[0], value)
    gf[1] = max(gf[1], value)
    if value > 0:
        counts[_bin(k, value)] += weight
    else:
        g[ZEROS] += weight


@njit(cache=True)
def _bin(k, value):
    """The sketch's bin of a positive value (:attr:`QuantileSketch.bins`)."""
    v = min(max(value, k[K_LO]), k[K_HI])
    return int(math.ceil(math.log(v / k[K_LO]) / k[K_LOGG]))


@njit(cache=True)
def _itl_run(k, counts, g, gf, durations, steps, weight):
    """Add ``durations[1:steps]`` (a decode run's inter-token latencies, nondecreasing)
    ``weight`` times each, as :func:`_itl` would: a value that lies above the last one binned
    and clearly below its bin's upper edge (by 1e-9 relative, far beyond rounding) is in the
    same bin, so the logarithm is taken once per bin, not once per step."""
    b, edge, prev = -1, -np.inf, np.inf
    for j in range(1, steps):
        v = durations[j]
        if prev <= v < edge:
            counts[b] += weight
            gf[1] = max(gf[1], v)
        elif k[K_LO] < v < k[K_HI]:
            b = _bin(k, v)
            counts[b] += weight
            gf[0], gf[1] = min(gf[0], v), max(gf[1], v)
            edge = k[K_LO] * math.exp(b * k[K_LOGG]) * (1.0 - 1e-9)
        else:
            _itl(k, counts, g, gf, v, weight)
            b, edge = -1, -np.inf
        prev = v


# --- queues ---------------------------------------------------------------------------------

@njit(cache=True)
def _push(ri, pi, r, i, front):
    if pi[r, NWAIT] == 0:
        ri[i, NEXT] = -1
        pi[r, HEAD] = pi[r, TAIL] = i
    elif front:
        ri[i, NEXT] = pi[r, HEAD]
        pi[r, HEAD] = i
    else:
        ri[i, NEXT] = -1
        ri[pi[r, TAIL], NEXT] = i
        pi[r, TAIL] = i
    pi[r, NWAIT] += 1


@njit(cache=True)
def _pop(ri, pi, r):
    i = pi[r, HEAD]
    pi[r, HEAD] = ri[i, NEXT]
    pi[r, NWAIT] -= 1
    return i


@njit(cache=True)
def _remove(run, pi, r, i):
    """Take ``i`` out of replica ``r``'s running list, keeping the order (``list.remove``)."""
    n = pi[r, NRUN]
    for p in range(n):
        if run[r, p] == i:
            for q in range(p, n - 1):
                run[r, q] = run[r, q + 1]
            pi[r, NRUN] = n - 1
            return


# --- the engine -------------------------------------------------------------------------------

@njit(cache=True)
def _fail(ri, rf, i):
    ri[i, TIMED_OUT] = 1
    rf[i, END] = rf[i, DEADLINE]


# --- the KV pool (kavier.sim.kvpool.BlockPool) ---------------------------------------------
# kv = (keys, koff, held, slots, stack, lru, table): every request's chained prompt-block keys
# (keys[koff[i]:koff[i + 1]]) and which of them it holds cached; per replica the cached blocks
# in slots (reference count, key, LRU neighbours), a stack of unused slots, the LRU list of
# evictable slots (lru), and key → slot (table: open addressing with linear probing, [key,
# slot] pairs, slot -1 empty; the keys are already hashes, so their low bits place them).

@njit(cache=True)
def _find(table, r, key):
    """Position of ``key`` in replica ``r``'s table, or of the empty place it would take."""
    mask = table.shape[1] - 1
    p = key & mask
    while table[r, p, 1] >= 0 and table[r, p, 0] != key:
        p = (p + 1) & mask
    return p


@njit(cache=True)
def _forget(table, r, key):
    """Delete ``key`` (present) from the table, shifting the entries after it back so that
    every key stays reachable from its home place (backward-shift deletion)."""
    mask = table.shape[1] - 1
    p = _find(table, r, key)
    table[r, p, 1] = -1
    q = p
    while True:
        q = (q + 1) & mask
        if table[r, q, 1] < 0:
            return
        if ((q - (table[r, q, 0] & mask)) & mask) >= ((q - p) & mask):
            table[r, p, 0], table[r, p, 1] = table[r, q, 0], table[r, q, 1]
            table[r, q, 1] = -1
            p = q


@njit(cache=True)
def _unlink(slots, lru, r, slot):
    p, q = slots[r, slot, SL_PREV], slots[r, slot, SL_NEXT]
    if p >= 0:
        slots[r, p, SL_NEXT] = q
    else:
        lru[r, L_HEAD] = q
    if q >= 0:
        slots[r, q, SL_PREV] = p
    else:
        lru[r, L_TAIL] = p


@njit(cache=True)
def _append(slots, lru, r, slot):
    """Put ``slot`` at the most recently used end of replica ``r``'s evictable list."""
    t = lru[r, L_TAIL]
    slots[r, slot, SL_PREV], slots[r, slot, SL_NEXT] = t, -1
    if t >= 0:
        slots[r, t, SL_NEXT] = slot
    else:
        lru[r, L_HEAD] = slot
    lru[r, L_TAIL] = slot


@njit(cache=True)
def _take(pi, r, n):
    """:meth:`BlockPool.allocate` of ``n`` free blocks, plain ones first: returns how many
    least recently used cached blocks must be evicted for the rest (:func:`_evict`). Kept
    apart from the eviction so that the per-request calls pass no pool tables."""
    plain = min(n, pi[r, PLAIN])
    pi[r, PLAIN] -= plain
    pi[r, FREE] -= n
    return n - plain


@njit(cache=True)
def _evict(kv, g, r, n):
    """Evict the ``n`` least recently used cached blocks (their keys are forgotten)."""
    slots, stack, lru, table = kv[3], kv[4], kv[5], kv[6]
    for _ in range(n):
        slot = lru[r, L_HEAD]
        _unlink(slots, lru, r, slot)
        _forget(table, r, slots[r, slot, SL_KEY])
        stack[r, lru[r, L_TOP]] = slot
        lru[r, L_TOP] += 1
        g[EVICTIONS] += 1


@njit(cache=True)
def _give(pi, r, n):
    """Plain blocks back to the pool."""
    pi[r, PLAIN] += n
    pi[r, FREE] += n


@njit(cache=True)
def _match(kv, r, i, limit):
    """:meth:`BlockPool.match` of request ``i``'s keys: (blocks hit, of them evictable)."""
    keys, koff, slots, table = kv[0], kv[1], kv[3], kv[6]
    hit = from_free = 0
    lo = koff[i]
    for b in range(min(limit, koff[i + 1] - lo)):
        p = _find(table, r, keys[lo + b])
        if table[r, p, 1] < 0:
            break
        hit += 1
        if slots[r, table[r, p, 1], SL_REF] == 0:
            from_free += 1
    return hit, from_free


@njit(cache=True)
def _acquire(ri, pi, kv, r, i, hit):
    """:meth:`BlockPool.acquire` of request ``i``'s first ``hit`` blocks."""
    keys, koff, held, slots, lru, table = kv[0], kv[1], kv[2], kv[3], kv[5], kv[6]
    for b in range(hit):
        slot = table[r, _find(table, r, keys[koff[i] + b]), 1]
        if slots[r, slot, SL_REF] == 0:
            _unlink(slots, lru, r, slot)
            pi[r, FREE] -= 1
        slots[r, slot, SL_REF] += 1
        held[koff[i] + b] = 1
    ri[i, HASHED] = hit


@njit(cache=True)
def _register(ri, kv, r, i, bs):
    """:meth:`SteppedEngine._register`: request ``i``'s newly full prompt blocks get their
    keys, unless a block with that key is cached already."""
    keys, koff, held, slots, stack, lru, table = kv
    lo = koff[i]
    full = min(ri[i, COMPUTED] // bs, koff[i + 1] - lo)
    for b in range(ri[i, REGISTERED], full):
        p = _find(table, r, keys[lo + b])
        if table[r, p, 1] >= 0:
            continue
        lru[r, L_TOP] -= 1
        slot = stack[r, lru[r, L_TOP]]
        slots[r, slot, SL_REF], slots[r, slot, SL_KEY] = 1, keys[lo + b]
        table[r, p, 0], table[r, p, 1] = keys[lo + b], slot
        held[lo + b] = 1
        ri[i, HASHED] += 1
    ri[i, REGISTERED] = max(ri[i, REGISTERED], full)


@njit(cache=True)
def _release(ri, pi, kv, r, i):
    """:meth:`SteppedEngine._release`: request ``i``'s plain blocks back, its cached ones
    in reverse prompt order to the LRU end once nobody holds them."""
    _give(pi, r, ri[i, BLOCKS] - ri[i, HASHED])
    if ri[i, HASHED]:
        keys, koff, held, slots, lru, table = kv[0], kv[1], kv[2], kv[3], kv[5], kv[6]
        for b in range(koff[i + 1] - 1, koff[i] - 1, -1):
            if not held[b]:
                continue
            held[b] = 0
            slot = table[r, _find(table, r, keys[b]), 1]
            slots[r, slot, SL_REF] -= 1
            if slots[r, slot, SL_REF] == 0:
                _append(slots, lru, r, slot)
                pi[r, FREE] += 1
    ri[i, HASHED] = 0
    ri[i, BLOCKS] = 0


@njit(cache=True)
def _allocate(ri, pi, r, i, ahead, bs):
    """:meth:`SteppedEngine._allocate` for one request; returns the cached blocks to evict
    (:func:`_take`)."""
    target = -(-(ri[i, COMPUTED] + ahead) // bs)
    extra = target - ri[i, BLOCKS]
    ri[i, BLOCKS] = target
    if extra < 0:
        _give(pi, r, -extra)
    return _take(pi, r, extra) if extra > 0 else 0


@njit(cache=True)
def _hold(ri, pi, kv, g, r, i, ahead, bs):
    """:func:`_allocate` with its evictions, for the once-per-request calls (admission, a
    preemption pass); the per-step loops over a batch call the two apart so that they pass
    no pool tables per request (:func:`_take`)."""
    evict = _allocate(ri, pi, r, i, ahead, bs)
    if evict:
        _evict(kv, g, r, evict)


@njit(cache=True)
def _preempt(ri, pi, kv, g, run, r, i):
    _remove(run, pi, r, i)
    _release(ri, pi, kv, r, i)
    ri[i, COMPUTED] = 0
    ri[i, PROMPT] = ri[i, N_IN] + ri[i, GENERATED]
    ri[i, PREEMPT] += 1
    _push(ri, pi, r, i, True)


@njit(cache=True)
def _add(bids, bnew, bdec, r, nb, i, new, decoding):
    """Put request ``i``'s ``new`` tokens into replica ``r``'s batch of ``nb``; the new
    size."""
    bids[r, nb], bnew[r, nb], bdec[r, nb] = i, new, 1 if decoding else 0
    return nb + 1


@njit(cache=True)
def _schedule(k, s, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, r, now):
    """:meth:`SteppedEngine._schedule`: the batch into ``bids/bnew/bdec[r]``; its size."""
    bs = s[S_BS]
    if not math.isinf(k[K_TIMEOUT]):
        p = 0
        while p < pi[r, NRUN]:
            i = run[r, p]
            if rf[i, DEADLINE] <= now:
                _remove(run, pi, r, i)
                _release(ri, pi, kv, r, i)
                _fail(ri, rf, i)
            else:
                p += 1
    budget = s[S_BUDGET]
    nrun = pi[r, NRUN]
    # the running requests' work at once (_schedule_running_fast)
    before, extra = 0, 0
    for p in range(nrun):
        i = run[r, p]
        wanted = 1 if ri[i, COMPUTED] >= ri[i, PROMPT] else ri[i, PROMPT] - ri[i, COMPUTED]
        new = min(max(budget - before, 0), wanted)
        before += wanted
        extra += max(-(-(ri[i, COMPUTED] + new) // bs) - ri[i, BLOCKS], 0)
        bnew[r, p] = new
    nb = 0
    if extra <= pi[r, FREE]:
        if extra:                                # before admissions take blocks
            evict = _take(pi, r, extra)
            if evict:
                _evict(kv, g, r, evict)
        for p in range(nrun):
            i, new = run[r, p], bnew[r, p]
            ri[i, BLOCKS] = max(-(-(ri[i, COMPUTED] + new) // bs), ri[i, BLOCKS])
            if new > 0:
                nb = _add(bids, bnew, bdec, r, nb, i, new, ri[i, COMPUTED] >= ri[i, PROMPT])
                budget -= new
        return _admit(k, s, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, r, now, nb, budget)
    # one by one, preempting the newest (_schedule_running); no admissions after it
    snapshot = run[r, :nrun].copy()
    for i in snapshot:
        if budget == 0:
            continue
        here = False
        for p in range(pi[r, NRUN]):
            here = here or run[r, p] == i
        if not here:
            continue
        decoding = ri[i, COMPUTED] >= ri[i, PROMPT]
        new = 1 if decoding else min(ri[i, PROMPT] - ri[i, COMPUTED], budget)
        while -(-(ri[i, COMPUTED] + new) // bs) - ri[i, BLOCKS] > pi[r, FREE] and here:
            victim = run[r, pi[r, NRUN] - 1]
            _preempt(ri, pi, kv, g, run, r, victim)
            here = victim != i
        if not here or -(-(ri[i, COMPUTED] + new) // bs) - ri[i, BLOCKS] > pi[r, FREE]:
            continue
        _hold(ri, pi, kv, g, r, i, new, bs)
        budget -= new
        nb = _add(bids, bnew, bdec, r, nb, i, new, decoding)
    return nb


@njit(cache=True)
def _admit(k, s, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, r, now, nb, budget):
    """:meth:`SteppedEngine._admit`, with the ``blocks`` prefix cache when it is on."""
    bs = s[S_BS]
    pi[r, LAGGED] = 0
    while pi[r, NWAIT] and pi[r, NRUN] < s[S_MAXSEQS] and budget > 0:
        i = pi[r, HEAD]
        if (s[S_AHEAD] and not ri[i, ADMITTED]
                and rf[i, ARRIVAL] + k[K_FRONT] > pf[r, CUTOFF]):
            pi[r, LAGGED] = 1
            break
        if now >= rf[i, DEADLINE]:
            _pop(ri, pi, r)
            _fail(ri, rf, i)
            continue
        hit = from_free = 0
        if s[S_PREFIX]:                          # recompute at least the last token
            hit, from_free = _match(kv, r, i, (ri[i, PROMPT] - 1) // bs)
        start = hit * bs
        remaining = ri[i, PROMPT] - start
        new = min(remaining, budget)
        if new < remaining and not s[S_CHUNKED]:
            if nb:
                break
            new = remaining
        if -(-(start + new) // bs) - hit + from_free > pi[r, FREE]:
            break
        _pop(ri, pi, r)
        run[r, pi[r, NRUN]] = i
        pi[r, NRUN] += 1
        if hit:
            _acquire(ri, pi, kv, r, i, hit)
        ri[i, REGISTERED] = ri[i, BLOCKS] = hit
        ri[i, COMPUTED] = start
        if s[S_PREFIX]:
            g[QUERIES] += ri[i, PROMPT]
            g[HITS] += start
        if not ri[i, ADMITTED]:
            ri[i, ADMITTED] = 1
            rf[i, SCHEDULED] = now
            ri[i, REUSED] = start
        _hold(ri, pi, kv, g, r, i, new, bs)
        budget -= new
        nb = _add(bids, bnew, bdec, r, nb, i, new, False)
    return nb


@njit(cache=True)
def _start_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, r, now):
    """:meth:`SteppedEngine._start_step` and :meth:`~SteppedEngine._decode_run`; in
    lockstep the batch is scheduled and its blocks held, and :func:`_start_group` costs
    it."""
    floor, comm, passc = t[1], t[2], t[3]
    bs = s[S_BS]
    nb = _schedule(k, s, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, r, now)
    pi[r, NB] = nb
    if nb == 0:
        pi[r, BUSY] = 0
        return
    pf[r, T0] = now
    pi[r, BUSY] = 1
    n_dec = 0
    for b in range(nb):
        n_dec += bdec[r, b]
    if n_dec < nb or s[S_LOCK]:                  # one step (with prefill work, or a rank's)
        for b in range(nb):
            evict = _allocate(ri, pi, r, bids[r, b], bnew[r, b], bs)
            if evict:
                _evict(kv, g, r, evict)
        pi[r, ISRUN], pi[r, NSTEPS] = 0, 1
        if not s[S_LOCK]:
            out = _batch_costs(k, t, ri, bids, bnew, bdec, work, r, nb, -1, 0)
            pf[r, C_DUR:C_MEM + 1] = out
            pf[r, BUSY_UNTIL] = now + out[0]
        return
    steps = MAX_RUN_STEPS                        # a decode run
    sumc, deadline = 0, np.inf
    for b in range(nb):
        i = bids[r, b]
        steps = min(steps, ri[i, N_OUT] - ri[i, GENERATED])
        sumc += ri[i, COMPUTED]
        deadline = min(deadline, rf[i, DEADLINE])
    if pi[r, LAGGED]:
        steps = 1
    if _run_blocks(ri, bids, r, nb, steps, bs) > pi[r, FREE]:
        lo, hi = 1, steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _run_blocks(ri, bids, r, nb, mid, bs) <= pi[r, FREE]:
                lo = mid
            else:
                hi = mid - 1
        steps = lo
    _run_durations(k, floor, comm, passc, nb, sumc, 0, steps, scratch[0])
    if deadline < np.inf and steps > 1:          # stop at the first boundary past a timeout
        acc = 0.0
        for j in range(steps):
            acc += scratch[0, j]
            if now + acc >= deadline:
                steps = j + 1
                break
    for b in range(nb):
        evict = _allocate(ri, pi, r, bids[r, b], steps, bs)
        if evict:
            _evict(kv, g, r, evict)
    pi[r, ISRUN], pi[r, NSTEPS], pi[r, SUMC] = 1, steps, sumc
    pf[r, BUSY_UNTIL] = now + _pairwise(scratch[0], 0, steps)


@njit(cache=True)
def _batch_costs(k, t, ri, bids, bnew, bdec, work, r, nb, gt, grec):
    """:func:`_step_costs` of rank ``r``'s scheduled batch of ``nb`` sequences."""
    n_dec = 0
    for b in range(nb):
        n_dec += bdec[r, b]
        work[4, b] = ri[bids[r, b], COMPUTED]
    out = np.empty(5)
    _step_costs(k, t, bnew[r], work[4], nb, n_dec, gt, grec, work, out)
    return out


@njit(cache=True)
def _run_blocks(ri, bids, r, nb, steps, bs):
    """Blocks a decode run of ``steps`` steps needs beyond those its batch holds."""
    extra = 0
    for b in range(nb):
        i = bids[r, b]
        extra += max(-(-(ri[i, COMPUTED] + steps) // bs) - ri[i, BLOCKS], 0)
    return extra


@njit(cache=True)
def _interrupt(k, s, t, ri, pi, pf, bids, scratch, r, at):
    """:meth:`SteppedEngine._interrupt`: end a decode run at the first boundary at or after
    ``at``."""
    steps = pi[r, NSTEPS]
    if steps <= 1:
        return
    floor, comm, passc = t[1], t[2], t[3]
    acc, keep = 0.0, steps
    for j in range(steps):
        _run_durations(k, floor, comm, passc, pi[r, NB], pi[r, SUMC], j, j + 1, scratch[0])
        acc += scratch[0, j]
        if pf[r, T0] + acc >= at:
            keep = j + 1
            break
    if keep < steps:
        pi[r, NSTEPS] = keep
        pf[r, BUSY_UNTIL] = pf[r, T0] + acc
        for b in range(pi[r, NB]):
            _allocate(ri, pi, r, bids[r, b], keep, s[S_BS])   # gives blocks back


@njit(cache=True)
def _finish_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, counts, gf,
                 tli, tlf, num_blocks, r):
    """:meth:`SteppedEngine._finish_step`: one timeline row, the tokens, the leavers."""
    now, steps, nb = pf[r, T0], pi[r, NSTEPS], pi[r, NB]
    if pi[r, ISRUN]:
        wb, floor, comm, passc = t[0], t[1], t[2], t[3]
        _run_durations(k, floor, comm, passc, nb, pi[r, SUMC], 0, steps, scratch[0])
        end = now + _pairwise(scratch[0], 0, steps)
        pf[r, CUTOFF] = end - scratch[0, steps - 1]
        costs = _run_work(k, wb, floor, passc, nb, pi[r, SUMC], steps)
    else:
        end = now + pf[r, C_DUR]
        pf[r, CUTOFF] = end - pf[r, C_DUR]
        costs = (pf[r, C_FLOPS], pf[r, C_BYTES], pf[r, C_COMP], pf[r, C_MEM])
    row = g[ROWS]
    g[ROWS] += 1
    prefill = decode = 0
    for b in range(nb):
        if bdec[r, b]:
            decode += 1
        else:
            prefill += bnew[r, b]
    tli[row, TI_REPLICA], tli[row, TI_STEPS], tli[row, TI_SEQS] = r, steps, nb
    tli[row, TI_PREFILL], tli[row, TI_DECODE] = prefill, steps * decode
    tli[row, TI_KV] = num_blocks - pi[r, FREE]
    tlf[row, TF_START], tlf[row, TF_DUR] = now, end - now
    tlf[row, TF_FLOPS], tlf[row, TF_BYTES], tlf[row, TF_COMP], tlf[row, TF_MEM] = costs
    if steps == 1:                               # the step's tokens are computed
        for b in range(nb):
            i = bids[r, b]
            ri[i, COMPUTED] += bnew[r, b]
            if s[S_PREFIX] and not bdec[r, b]:
                _register(ri, kv, r, i, s[S_BS])
    for b in range(nb):
        i = bids[r, b]
        if steps > 1:                            # a token each step for every request
            _itl(k, counts, g, gf, (now + scratch[0, 0]) - rf[i, LAST], 1)
            ri[i, COMPUTED] += steps
            ri[i, GENERATED] += steps
            rf[i, LAST] = end
        else:
            if ri[i, COMPUTED] < ri[i, PROMPT]:
                continue
            if ri[i, GENERATED] > 0:
                _itl(k, counts, g, gf, end - rf[i, LAST], 1)
            else:
                rf[i, FIRST] = end
            ri[i, GENERATED] += 1
            rf[i, LAST] = end
        if ri[i, GENERATED] >= ri[i, N_OUT]:
            rf[i, END] = end
            _remove(run, pi, r, i)
            _release(ri, pi, kv, r, i)
    if steps > 1:
        _itl_run(k, counts, g, gf, scratch[0], steps, nb)
    pi[r, BUSY] = 0


@njit(cache=True)
def _arrive(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, route, i, now):
    """:meth:`SteppedEngine._arrive`: request ``i`` reaches the engine and is routed
    (``route[i]``: a fixed replica, or -1 for round-robin and least-outstanding)."""
    g[ROUTED] += 1
    if not math.isinf(k[K_TIMEOUT]):
        rf[i, DEADLINE] = rf[i, ARRIVAL] + k[K_TIMEOUT]
    replicas = pi.shape[0]
    if replicas == 1:
        r = 0
    elif route[i] >= 0:
        r = route[i]
    elif s[S_RR]:
        r = (g[ROUTED] - 1) % replicas
    else:
        r, best = 0, pi[0, NWAIT] + pi[0, NRUN]
        for q in range(1, replicas):
            if pi[q, NWAIT] + pi[q, NRUN] < best:
                r, best = q, pi[q, NWAIT] + pi[q, NRUN]
    ri[i, REPLICA] = r
    if now >= rf[i, DEADLINE]:
        _fail(ri, rf, i)
        return
    _push(ri, pi, r, i, False)
    if not pi[r, BUSY] and s[S_LOCK]:            # an idle group schedules at once
        pf[:, CUTOFF] = now
        _start_group(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, now)
    elif not pi[r, BUSY]:                        # an idle engine schedules at once
        pf[r, CUTOFF] = now
        _start_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, r, now)
    elif pi[r, NRUN] < s[S_MAXSEQS] and not s[S_LOCK]:
        _interrupt(k, s, t, ri, pi, pf, bids, scratch, r, now)


@njit(cache=True)
def _start_group(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, now):
    """:meth:`SteppedEngine._start_group`: every rank schedules its batch, costed with the
    group's tokens; all last as long as the slowest; a rank without work runs the dummy
    one-token batch."""
    replicas = pi.shape[0]
    gt, least = 0, np.iinfo(np.int64).max
    for r in range(replicas):
        _start_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, r,
                    now)
        tokens = 1                               # an idle rank's dummy token
        if pi[r, BUSY]:
            tokens = 0
            for b in range(pi[r, NB]):
                tokens += bnew[r, b]
        gt += tokens
        least = min(least, tokens)
    longest = -np.inf
    for r in range(replicas):
        if pi[r, BUSY]:
            out = _batch_costs(k, t, ri, bids, bnew, bdec, work, r, pi[r, NB], gt, gt - least)
            pf[r, C_DUR:C_MEM + 1] = out
            longest = max(longest, out[0])
    if longest == -np.inf:
        return
    one, none = np.ones(1, np.int64), np.zeros(1)
    for r in range(replicas):
        if not pi[r, BUSY]:                      # vLLM's execute_dummy_batch
            out = np.empty(5)
            _step_costs(k, t, one, none, 1, 1, gt, gt - least, work, out)
            pi[r, BUSY], pi[r, ISRUN], pi[r, NSTEPS], pi[r, NB] = 1, 0, 1, 0
            pf[r, T0] = now
            pf[r, C_FLOPS:C_MEM + 1] = out[1:5]
        pf[r, C_DUR] = longest
        pf[r, BUSY_UNTIL] = now + longest


@njit(cache=True)
def _loop_lockstep(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, order,
                   route, counts, gf, tli, tlf, num_blocks):
    """:meth:`SteppedEngine._run_lockstep`, returning as :func:`_loop` does."""
    n, replicas = order.size, pi.shape[0]
    while True:
        if g[ROWS] + replicas > tli.shape[0]:
            return False
        ready = np.inf
        if g[NEXT_ARRIVAL] < n:
            ready = rf[order[g[NEXT_ARRIVAL]], ARRIVAL] + k[K_FRONT]
        until = pf[0, BUSY_UNTIL]
        if ready < np.inf and (not pi[0, BUSY] or ready <= until):
            i = order[g[NEXT_ARRIVAL]]
            g[NEXT_ARRIVAL] += 1
            _arrive(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, route,
                    i, ready)
        elif pi[0, BUSY]:
            for r in range(replicas):
                _finish_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch,
                             counts, gf, tli, tlf, num_blocks, r)
            _start_group(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work,
                         until)
        else:
            return True


@njit(cache=True)
def _loop(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, order, route,
          counts, gf, tli, tlf, num_blocks):
    """The event loop until every request is served (True) or the timeline buffer is full
    (False; call again after emptying it)."""
    n = order.size
    while True:
        if g[ROWS] >= tli.shape[0]:
            return False
        best, br = np.inf, -1
        for r in range(pi.shape[0]):
            if pi[r, BUSY] and pf[r, BUSY_UNTIL] < best:
                best, br = pf[r, BUSY_UNTIL], r
        ready = np.inf
        if g[NEXT_ARRIVAL] < n:
            ready = rf[order[g[NEXT_ARRIVAL]], ARRIVAL] + k[K_FRONT]
        if ready <= best and ready < np.inf:
            i = order[g[NEXT_ARRIVAL]]
            g[NEXT_ARRIVAL] += 1
            _arrive(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, route,
                    i, ready)
        elif br >= 0:
            _finish_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, counts,
                         gf, tli, tlf, num_blocks, br)
            _start_step(k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, br,
                        best)
        else:
            return True


class CompiledEngine:
    """:class:`~kavier.sim.engine.SteppedEngine` compiled (module docstring); same
    constructor, :meth:`run`, ``itl`` and :meth:`cache_counters`.

    Raises
    ------
    ValueError
        When :func:`applies` is false for the configuration.
    """

    def __init__(self, timing, config, num_blocks: int, block_size: int, prefix,
                 timeline) -> None:
        if not applies(timing, config, prefix):
            raise ValueError("the compiled engine does not run this configuration")
        self.timing, self.config, self.timeline = timing, config, timeline
        self.num_blocks, self.block_size, self.prefix = num_blocks, block_size, prefix
        self.itl = QuantileSketch()
        self._counters = np.zeros(7, np.int64)

    def _constants(self) -> np.ndarray:
        t, p, cfg = self.timing, self.timing.params, self.config
        k = np.zeros(K_DP + 1)
        k[[K_F, K_FA, K_BKV, K_TOK, K_BSTEP, K_BSEQ]] = (
            t._flops_per_s, t._attention_flops_per_s, t._kv_bytes_per_s,
            p.token_overhead_s, p.batch_step_overhead_s, p.batch_seq_overhead_s)
        k[K_SHARP] = np.nan if p.prefill_sharpness is None else p.prefill_sharpness
        k[[K_MP2, K_LM, K_APOS, K_KVB, K_FRONT]] = (
            2.0 * t._matmul_params, t._lm_head_flops, t._attention_flops_per_position,
            t.kv_bytes_per_token, p.request_overhead_s)
        k[K_TIMEOUT] = np.inf if cfg.request_timeout_s is None else cfg.request_timeout_s
        k[[K_LO, K_HI, K_LOGG]] = self.itl.bins[:3]
        k[K_ROUTED] = t._routed_flops_per_token if t.llm.n_experts else 0.0
        k[K_DP] = t.data_parallel_size
        return k

    def _tables(self, most_tokens: int) -> tuple[np.ndarray, ...]:
        """Weight bytes, their floor, the tensor-parallel collectives, the GEMM ramp
        (:meth:`RooflineTiming.pass_compute_s`) and the expert-parallel collectives of a step:
        all but the third over the tokens the expert layers see (0..``DP`` × most), the third
        over a rank's own tokens (0..most), the last over the tokens the busiest GPU
        receives."""
        timing = self.timing
        tokens = np.arange(most_tokens + 1, dtype=np.float64)
        seen = np.arange(most_tokens * timing.data_parallel_size + 1, dtype=np.float64)
        if timing.llm.n_experts:
            # each count alone, as a step asks for it: numpy's pow over an array can differ
            # from its pow of one value in the last bit
            wb = np.array([timing.weight_bytes(float(n), float(n)) for n in seen])
            passc = np.array([timing.pass_compute_s(float(n), float(n)) for n in seen])
        else:
            wb = np.broadcast_to(timing.weight_bytes(seen), seen.shape)
            passc = np.broadcast_to(timing.pass_compute_s(seen), seen.shape)
        floor = np.broadcast_to(timing._floor_of(wb), seen.shape)
        comm = (timing.tp_comm_s(tokens) if timing.tensor_parallel_size > 1
                else np.zeros_like(tokens))
        commep = (timing.ep_comm_s(seen) if timing.data_parallel_size > 1
                  else np.zeros_like(seen))
        return tuple(np.ascontiguousarray(a, np.float64)
                     for a in (wb, floor, comm, passc, commep))

    def run(self, n_in: np.ndarray, n_out: np.ndarray, arrival: np.ndarray,
            sessions=None) -> dict:
        """Serve every request; the per-request arrays of :meth:`SteppedEngine.run`."""
        cfg, n, replicas = self.config, n_in.size, self.config.replicas
        seqs = cfg.max_num_seqs
        ri = np.zeros((n, 14), np.int64)
        ri[:, N_IN], ri[:, N_OUT] = n_in, n_out
        ri[:, PROMPT], ri[:, REPLICA] = n_in, -1
        rf = np.full((n, 6), np.nan)
        rf[:, ARRIVAL], rf[:, DEADLINE] = arrival, np.inf
        pi = np.zeros((replicas, 12), np.int64)
        pi[:, FREE] = pi[:, PLAIN] = self.num_blocks
        pf = np.zeros((replicas, 8))
        order = np.argsort(rf[:, ARRIVAL], kind="stable")
        route = np.full(n, -1, np.int64)         # prefix-affinity's fixed replicas
        if cfg.router == "prefix-affinity" and replicas > 1:
            router = Router(cfg.router, replicas, sessions,
                            first_block(self.prefix, self.block_size))
            route[:] = [-1 if (r := router.fixed(i)) is None else r for i in range(n)]
        s = np.array([cfg.max_num_batched_tokens, seqs, bool(cfg.chunked_prefill),
                      bool(cfg.async_scheduling), self.block_size,
                      cfg.router == "round-robin", self.prefix is not None,
                      cfg.enable_expert_parallel and replicas > 1], np.int64)
        kv = self._pool(n_in, replicas)
        most = int(max(cfg.max_num_batched_tokens, (n_in + n_out).max(initial=0))) + seqs
        t = self._tables(most)
        longest = int(min(n_out.max(initial=1), MAX_RUN_STEPS))
        scratch, work = np.empty((1, longest + 1)), np.empty((5, seqs))
        counts = np.zeros(int(self.itl.bins[3]), np.int64)
        g, gf = self._counters, np.array([np.inf, -np.inf])
        tli, tlf = np.empty((INTERVALS, 6), np.int64), np.empty((INTERVALS, 6))
        run = np.zeros((replicas, seqs), np.int64)
        bids, bnew, bdec = (np.zeros((replicas, seqs), np.int64) for _ in range(3))
        k = self._constants()
        done = False
        while not done:
            g[ROWS] = 0
            done = (_loop_lockstep if s[S_LOCK] else _loop)(
                k, s, t, ri, rf, pi, kv, g, pf, run, bids, bnew, bdec, scratch, work, order,
                route, counts, gf, tli, tlf, self.num_blocks)
            self._emit(tli[:g[ROWS]], tlf[:g[ROWS]])
        self.timeline.flush()
        self.itl.add_counts(counts, int(g[ZEROS]), float(gf[0]), float(gf[1]))
        front = self.timing.params.request_overhead_s
        return {"replica": ri[:, REPLICA], "arrival_s": rf[:, ARRIVAL],
                "scheduled_s": rf[:, SCHEDULED],
                "queue_s": rf[:, SCHEDULED] - (rf[:, ARRIVAL] + front),
                "first_token_s": rf[:, FIRST], "end_s": rf[:, END],
                "n_cached_tokens": ri[:, REUSED], "preemptions": ri[:, PREEMPT],
                "timed_out": ri[:, TIMED_OUT].astype(bool)}

    def _emit(self, tli: np.ndarray, tlf: np.ndarray) -> None:
        self.timeline.add_arrays({
            "replica": tli[:, TI_REPLICA], "start_s": tlf[:, TF_START],
            "duration_s": tlf[:, TF_DUR], "n_steps": tli[:, TI_STEPS],
            "n_seqs": tli[:, TI_SEQS], "prefill_tokens": tli[:, TI_PREFILL],
            "decode_tokens": tli[:, TI_DECODE], "kv_blocks_used": tli[:, TI_KV],
            "flops": tlf[:, TF_FLOPS], "dram_bytes": tlf[:, TF_BYTES],
            "compute_s": tlf[:, TF_COMP], "memory_s": tlf[:, TF_MEM]})

    def _pool(self, n_in: np.ndarray, replicas: int) -> tuple:
        """Every replica's empty KV pool and every request's prompt-block keys (the ``kv``
        tuple the loop takes; keys only with the ``blocks`` prefix cache)."""
        n = n_in.size
        koff, flat = np.zeros(n + 1, np.int64), np.zeros(0, np.uint64)
        if self.prefix is not None:
            keys = [self.prefix.block_keys(i, int(n_in[i]) // self.block_size)
                    for i in range(n)]
            koff[1:] = np.cumsum([len(k) for k in keys])
            flat = np.fromiter((key for k in keys for key in k), np.uint64, int(koff[-1]))
        cap = max(1, min(self.num_blocks, flat.size))   # cached blocks are pool blocks
        slots = np.full((replicas, cap, 4), -1, np.int64)
        slots[:, :, SL_REF] = 0
        stack = np.tile(np.arange(cap, dtype=np.int64), (replicas, 1))
        lru = np.full((replicas, 3), -1, np.int64)
        lru[:, L_TOP] = cap
        table = np.full((replicas, 1 << int(2 * cap - 1).bit_length(), 2), -1, np.int64)
        return (flat.view(np.int64), koff, np.zeros(flat.size, np.int64), slots, stack, lru,
                table)

    def cache_counters(self) -> dict:
        """Prefix-cache counters summed over the replicas (tokens; evicted blocks)."""
        g = self._counters
        return {"queries_tokens": int(g[QUERIES]), "hits_tokens": int(g[HITS]),
                "evictions": int(g[EVICTIONS])}
