"""Offered load: how much GPU work arrives per second of trace, against what the replicas
can do.

A queueing summary is only meaningful beside the load that produced it: the thesis's Azure run
(one request at a time on one A10) reports a 27-hour TTFT because 52.6 GPU-hours of service
arrive in 0.97 hours, not because serving is slow. :class:`OfferedLoad` states that as one
number, ``ρ = demand_s / (arrival span × replicas)``, computed from the requests alone (not
from the simulated schedule, which stretches with the queue):

- **one request at a time** (``max_num_seqs = 1``, the thesis's mode): each request's time on
  the GPU, its prefill pass and its decode (eqs. 4.2-4.6, or the roofline model's; the front
  end's ``request_overhead_s`` runs beside the GPU and is not counted), summed;
- **continuous batching**: the work at the engine's best batching — each prompt's prefill at
  its compute time (matmuls and attention over its uncached tokens: at a full token budget a
  step is compute-bound), each output token at ``t_step(b) / b``, the time per token of a pure
  decode step of ``b`` sequences of the trace's mean decode context, with ``b`` the largest
  batch ``max_num_seqs`` and the KV pool allow.

``ρ < 1`` leaves headroom; ``ρ ≥ 1`` means no schedule keeps up and the queue grows for as long
as the arrivals last. The batching figure is a lower bound on the GPU time needed (per-step
overheads of smaller batches and preemptions come on top), so queues can build a little below
``ρ = 1``. With pipeline parallelism the timing's costs are one stage's, so the demand is what
a replica needs with every stage busy; bubbles between unequal batches come on top, and queues
can build well below ``ρ = 1`` (docs/models.md, "Pipeline parallelism").
"""

from __future__ import annotations

import numpy as np

from kavier.models.timing import RooflineTiming


class OfferedLoad:
    """Accumulates service demand over the request record, chunk by chunk.

    Parameters
    ----------
    timing : ThesisTiming or RooflineTiming
        The run's timing model (per replica).
    max_num_seqs : int
        Largest batch; 1 is the one-request-at-a-time mode.
    pool_tokens : int
        KV tokens a replica's pool holds (``blocks × block_size``); bounds the decode batch.
    replicas : int
        Replicas sharing the arrivals.
    """

    def __init__(self, timing, max_num_seqs: int, pool_tokens: int, replicas: int) -> None:
        self.timing, self.replicas = timing, replicas
        self.batched = max_num_seqs > 1 and isinstance(timing, RooflineTiming)
        self.max_num_seqs, self.pool_tokens = max_num_seqs, pool_tokens
        self.demand_s = 0.0
        self.decode_tokens = 0
        self.decode_context = 0.0          # Σ over output tokens of the context they attend

    def add(self, n_in: np.ndarray, n_cached: np.ndarray, n_out: np.ndarray) -> None:
        """Add requests: prompt tokens, tokens found in the prefix cache, output tokens
        (arrays of one shape)."""
        if not self.batched:
            self.demand_s += float(np.sum(self.timing.prefill_gpu_s(n_in, n_cached)
                                          + self.timing.decode_s(n_in, n_out)))
            return
        new = np.maximum(n_in - n_cached, 1)
        self.demand_s += float(np.sum(self.timing.pass_costs(new, n_cached).compute_s))
        steps = np.maximum(n_out - 1, 0)                   # the first token comes with prefill
        self.decode_tokens += int(steps.sum())
        self.decode_context += float(np.sum(steps * (n_in + n_out / 2.0)))

    def decode_batch(self) -> int:
        """``b``: ``max_num_seqs`` or as many sequences of the mean decode context as the KV
        pool holds, at least 1."""
        if not self.decode_tokens:
            return 1
        mean_context = self.decode_context / self.decode_tokens
        fits = int(self.pool_tokens // max(mean_context, 1.0)) if self.timing.kv_cache \
            else self.max_num_seqs
        return max(1, min(self.max_num_seqs, fits))

    def total_demand_s(self) -> float:
        """GPU seconds (per replica's GPUs) the requests need at the best batching."""
        if not self.batched or not self.decode_tokens:
            return self.demand_s
        b = self.decode_batch()
        mean_context = self.decode_context / self.decode_tokens
        step = float(self.timing.decode_run(np.full(b, mean_context), 1).duration_s[0])
        return self.demand_s + self.decode_tokens * step / b

    def result(self, arrival_span_s: float) -> dict:
        """``offered_load`` (ρ; None without an arrival span: back to back, or one instant),
        ``service_demand_s`` (GPU seconds per replica's GPUs), ``arrival_span_s`` and
        ``offered_load_batched`` and ``offered_load_decode_batch`` (``b``; 1 one request at a
        time)."""
        demand = self.total_demand_s()
        rho = demand / (arrival_span_s * self.replicas) if arrival_span_s > 0 else None
        return {"offered_load": rho, "service_demand_s": demand,
                "arrival_span_s": arrival_span_s,
                "offered_load_batched": self.batched,
                "offered_load_decode_batch": self.decode_batch() if self.batched else 1}
