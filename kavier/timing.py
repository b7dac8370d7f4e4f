"""Timing models: how long prefill and decode take for a request on one GPU.

Two models share one interface, both vectorized over requests (numpy arrays in, arrays out,
seconds):

``thesis``
    Exactly equations 4.2–4.6 of the Kavier thesis (chapter 4.5).
``roofline``
    A per-forward-pass roofline: every pass costs ``max(compute time, memory time)``, where
    compute counts the matrix multiplies *and* the attention term that grows with context, and
    memory counts the weights plus the KV cache read so far. It fixes three things the thesis
    model gets wrong; see :class:`RooflineTiming`.

Both take a :class:`TimingParams` of hyperparameters that ``calibrate`` fits to measurements.
Conventions: ``n_in`` is the number of prompt (prefill) tokens, ``n_out`` the number of
generated tokens, counting the first token, which the prefill pass itself produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from kavier.library import GPUSpec, LLMSpec


@dataclass(frozen=True)
class TimingParams:
    """Hyperparameters of the timing models (the quantities ``calibrate`` fits).

    Attributes
    ----------
    compute_efficiency : float
        ``C_e``, achieved fraction of the GPU's dense FP16 peak (thesis default 0.30, eq. 4.2,
        4.5; Recasens et al. 2025 report at most 30–35 %).
    memory_efficiency : float
        ``M_e``, achieved fraction of peak DRAM bandwidth (thesis default 0.60, eq. 4.6;
        Recasens et al. measure 57.6 % on average).
    request_overhead_s : float
        ``O``, fixed time per request outside the GPU passes: HTTP, tokenization, scheduling
        (thesis default 25 ms, eq. 4.2).
    token_overhead_s : float
        Roofline only: fixed time per decode step (sampling, detokenization, streaming).
    prefill_floor_s : float or None
        Roofline only: the shortest a forward pass can take. ``None`` means the time to stream
        the weights once, ``weight_bytes / (bandwidth × M_e)``.
    attention_efficiency : float or None
        Roofline only: achieved fraction of the FP16 peak in the attention kernels
        (``QKᵀ``, ``AV``). Fused attention kernels (FlashAttention, Dao et al. 2022) reach a
        different fraction of peak than the weight GEMMs, so it is a parameter of its own;
        ``None`` means ``compute_efficiency``.
    prefill_sharpness : float or None
        Roofline only: exponent ``p >= 1`` of the soft maximum
        ``(compute^p + floor^p)^(1/p)`` for prefill passes; ``None`` is the hard ``max``.
        Real kernels do not switch sharply from memory- to compute-bound at the ridge point;
        prefill passes of 64–512 tokens sit right there (ridge of an A10 at the thesis
        efficiencies: about 100 tokens), and a soft maximum with ``p ≈ 1.7`` matches the A10
        measurements where the hard maximum misses by up to 16 %. Decode steps (one token,
        about 1 FLOP per byte) sit far below the ridge and keep the hard maximum, which has a
        closed-form sum.
    batch_step_overhead_s, batch_seq_overhead_s : float
        Continuous batching only: extra time of a step that batches two or more sequences, and
        per sequence beyond the first (scheduling, sampling, kernels less efficient on ragged
        batches). Both vanish for one sequence, so batch size 1 equals the sequential model;
        ``calibrate`` fits them to measurements taken with requests in flight together.
    """

    compute_efficiency: float = 0.30
    memory_efficiency: float = 0.60
    request_overhead_s: float = 0.025
    token_overhead_s: float = 0.0
    prefill_floor_s: float | None = None
    attention_efficiency: float | None = None
    prefill_sharpness: float | None = None
    batch_step_overhead_s: float = 0.0
    batch_seq_overhead_s: float = 0.0

    def to_dict(self) -> dict:
        """Plain dict of the parameters (for profiles and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **changes) -> TimingParams:
        """A copy with some parameters changed."""
        return replace(self, **changes)


def _as_array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _sum_k(lo, hi):
    """Σ k for k = lo..hi (0 where hi < lo)."""
    return np.where(hi >= lo, (hi * (hi + 1) - (lo - 1) * lo) / 2.0, 0.0)


def _sum_k2(lo, hi):
    """Σ k² for k = lo..hi (0 where hi < lo)."""

    def s2(x):
        return x * (x + 1) * (2 * x + 1) / 6.0

    return np.where(hi >= lo, s2(hi) - s2(lo - 1), 0.0)


def sum_max_linear(g0, g1, h0, h1, m) -> np.ndarray:
    """Closed form of ``Σ_{k=1..m} max(g0 + g1·k, h0 + h1·k)``, elementwise over arrays.

    Two linear functions of k cross at most once, so the sum splits into a part where each
    dominates. Used for KV-cache-on decode, where per-step compute time and per-step memory time
    both grow linearly with the context. ``m`` may be 0 (sum is 0).
    """
    g0, g1, h0, h1, m = np.broadcast_arrays(*(_as_array(v) for v in (g0, g1, h0, h1, m)))
    base = m * h0 + h1 * _sum_k(np.ones_like(m), m)
    d0, d1 = g0 - h0, g1 - h1
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(d1 != 0, -d0 / np.where(d1 != 0, d1, 1.0), 0.0)
    lo = np.where(d1 > 0, np.maximum(1.0, np.floor(root) + 1), 1.0)
    hi = np.where(d1 < 0, np.minimum(m, np.ceil(root) - 1), m)
    hi = np.where((d1 == 0) & (d0 <= 0), 0.0, hi)
    lo, hi = np.clip(lo, 1.0, m + 1.0), np.clip(hi, 0.0, m)
    excess = np.where(hi >= lo, (hi - lo + 1) * d0 + d1 * _sum_k(lo, hi), 0.0)
    return base + excess


@dataclass(frozen=True)
class _TimingBase:
    llm: LLMSpec
    gpu: GPUSpec
    params: TimingParams = field(default_factory=TimingParams)
    kv_cache: bool = True

    name = "base"

    def e2e_s(self, n_in, n_out) -> np.ndarray:
        """End-to-end service time of each request, s: ``prefill_s + decode_s``."""
        return self.prefill_s(n_in) + self.decode_s(n_in, n_out)


@dataclass(frozen=True)
class ThesisTiming(_TimingBase):
    """The thesis timing model, equations 4.2–4.6, as written.

    * Prefill (eq. 4.2): ``T_p = n_i · 2·m_p / (F · C_e) + O``.
    * Time per token (eq. 4.5, 4.6): ``T_t = max(2·m_p / (F·C_e), b·m_p / (B·M_e))``.
    * Decode, KV cache on (eq. 4.3): ``T_d = n_o · T_t``.
    * Decode, KV cache off (eq. 4.4): ``T_d = n_o (n_o + 1) / 2 · T_t``.

    ``m_p`` parameters, ``F`` peak FLOP/s, ``B`` peak bytes/s, ``b`` bytes per parameter.
    Note that eq. 4.3 charges a decode step for every output token although the first one comes
    out of the prefill pass, and eq. 4.4 assumes a re-run over ``k`` tokens costs ``k`` times a
    KV-on step, which ignores that short passes are bound by streaming the weights, not by
    compute. :class:`RooflineTiming` models both properly.
    """

    name = "thesis"

    def prefill_s(self, n_in, n_cached=0) -> np.ndarray:
        """Prefill time per request, s (eq. 4.2); ``n_cached`` is ignored (no context term)."""
        n = _as_array(n_in)
        flops = n * self.llm.params * 2.0
        return flops / (self.gpu.flops_per_s * self.params.compute_efficiency) + (
            self.params.request_overhead_s)

    def time_per_token_s(self) -> float:
        """``T_t = max(C, M)`` of eq. 4.5 and 4.6, s."""
        compute = 2.0 * self.llm.params / (self.gpu.flops_per_s * self.params.compute_efficiency)
        memory = self.llm.weight_bytes / (self.gpu.bytes_per_s * self.params.memory_efficiency)
        return max(compute, memory)

    def decode_s(self, n_in, n_out) -> np.ndarray:
        """Decode time per request, s: eq. 4.3 (KV on) or eq. 4.4 (KV off); ``n_in`` unused."""
        n_o = _as_array(n_out)
        steps = n_o if self.kv_cache else n_o * (n_o + 1) / 2.0
        return steps * self.time_per_token_s()


@dataclass(frozen=True)
class RooflineTiming(_TimingBase):
    """Per-forward-pass roofline model.

    Let ``F' = F · C_e`` and ``B' = B · M_e`` be the achieved FLOP/s and bytes/s, ``P_mm`` the
    parameters used in a matrix multiply for every token (all but embeddings), ``L`` layers,
    ``d_attn = n_heads × head_dim``, ``W`` weight bytes and ``kv`` KV bytes per token
    (eq. 4.1 with KV heads).

    * Forward FLOPs for ``n`` new tokens after ``c`` cached ones (attention FLOPs run at the
      attention efficiency, the rest at ``C_e``):
      ``2·P_mm·n + 2·V·d + 4·L·d_attn·(n·c + n(n+1)/2)``. The first term is the weight matmuls
      (Kaplan et al. 2020), the second the LM head, evaluated once per pass because engines
      only compute logits where they sample; the third is ``QKᵀ`` and ``AV`` under a causal
      mask, which grows with n² (Chowdhery et al. 2022, PaLM, appendix B: ``4·L·d_attn`` per
      token per context position, halved on average by the causal mask).
    * Memory time of a pass attending to ``c`` positions: ``floor + kv·c/B'``; ``floor`` is
      the shortest a pass can take, by default one streaming of the weights ``W/B'`` (a pass
      cannot finish before every weight has been read), fittable as ``prefill_floor_s``.
    * Prefill: ``max(FLOPs/F', memory) + O`` (or a soft maximum, see
      ``TimingParams.prefill_sharpness``).
    * Decode with KV cache, one step per token after the first (the first token comes out of
      prefill), at context ``c = n_in + k``:
      ``max((2·P_mm + 2·V·d + 4·L·d_attn·c)/F', floor + kv·c/B') + token_overhead`` (Williams
      et al. 2009, roofline; Recasens et al. 2025 for decode being bound by weights and KV
      reads). Summed in closed form (:func:`sum_max_linear`).
    * Decode without KV cache: every step re-runs a full forward pass over the ``c`` tokens so
      far, ``max(FLOPs(c, 0)/F', floor + kv·c/B') + token_overhead``, summed in closed form
      (the re-run writes and reads the K and V of all ``c`` positions, so it is never faster
      than a KV-cache step). Unlike the
      thesis's ``n(n+1)/2 · T_t``, short re-runs cost a weight streaming, not ``c`` decode
      steps, while long ones grow with ``c²`` through attention.
    """

    name = "roofline"

    @property
    def _flops_per_s(self) -> float:
        return self.gpu.flops_per_s * self.params.compute_efficiency

    @property
    def _attention_flops_per_s(self) -> float:
        efficiency = self.params.attention_efficiency or self.params.compute_efficiency
        return self.gpu.flops_per_s * efficiency

    @property
    def _bytes_per_s(self) -> float:
        return self.gpu.bytes_per_s * self.params.memory_efficiency

    @property
    def _attention_flops_per_position(self) -> float:
        """``4·L·d_attn``: FLOPs of ``QKᵀ`` and ``AV`` per (query, key) pair."""
        return 4.0 * self.llm.n_layers * self.llm.attention_dim

    def floor_s(self) -> float:
        """Shortest forward pass, s: ``prefill_floor_s`` or the weight-streaming time."""
        if self.params.prefill_floor_s is not None:
            return self.params.prefill_floor_s
        return self.llm.weight_bytes / self._bytes_per_s

    def forward_compute_s(self, n_new, n_cached=0) -> np.ndarray:
        """Compute time of one forward pass over ``n_new`` tokens after ``n_cached`` cached
        ones, s: weight matmuls and LM head at ``C_e``, attention at the attention efficiency.
        """
        n, c = _as_array(n_new), _as_array(n_cached)
        matmul = 2.0 * self.llm.matmul_params * n + self.llm.lm_head_flops
        pairs = n * c + n * (n + 1) / 2.0
        return (matmul / self._flops_per_s
                + self._attention_flops_per_position * pairs / self._attention_flops_per_s)

    def forward_memory_s(self, n_context) -> np.ndarray:
        """Memory time of one forward pass that attends to ``n_context`` positions, s: the
        floor (one weight streaming) plus reading or writing their K and V."""
        return self.floor_s() + self.llm.kv_bytes_per_token * _as_array(n_context) / (
            self._bytes_per_s)

    def prefill_s(self, n_in, n_cached=0) -> np.ndarray:
        """Prefill time per request, s, including the request overhead ``O``.

        ``n_cached`` tokens already in the KV cache (a prefix-cache hit) are not recomputed
        but are attended to.
        """
        compute = self.forward_compute_s(n_in, n_cached)
        memory = self.forward_memory_s(_as_array(n_in) + _as_array(n_cached))
        high = np.maximum(compute, memory)
        p = self.params.prefill_sharpness
        forward = high if p is None else high * (1.0 + (np.minimum(compute, memory) / high)**p
                                                 ) ** (1.0 / p)
        return forward + self.params.request_overhead_s

    def step_s(self, n_new: np.ndarray, n_cached: np.ndarray, decoding: np.ndarray,
               n_starting: int = 0) -> float:
        """One engine step over a batch of sequences, s (iteration-level batching).

        Sequence ``i`` computes ``n_new[i]`` tokens after ``n_cached[i]`` in the KV cache;
        ``decoding[i]`` says whether that is a decode token (else a prefill chunk). The
        batch's compute is the sum of the sequences' (weight matmuls per token, LM head per
        sequence, attention per pair); its memory is one streaming of the weights plus every
        sequence's KV; the step takes their maximum (the soft maximum of
        ``prefill_sharpness`` when a prefill chunk is in the batch), plus the request overhead
        ``O`` for each of the ``n_starting`` requests whose first chunk this is and
        ``token_overhead_s`` per decode token. For one sequence this is exactly
        :meth:`prefill_s` or one decode step of :meth:`decode_s`.
        """
        n_new, n_cached = _as_array(n_new), _as_array(n_cached)
        compute = float(np.sum(self.forward_compute_s(n_new, n_cached)))
        memory = float(self.forward_memory_s(np.sum(n_new + n_cached)))
        high = max(compute, memory)
        n_decoding = int(np.count_nonzero(decoding))
        p = self.params.prefill_sharpness
        if p is not None and n_decoding < n_new.size:
            high = high * (1.0 + (min(compute, memory) / high) ** p) ** (1.0 / p)
        return (high + n_starting * self.params.request_overhead_s
                + n_decoding * self.params.token_overhead_s + self._batch_overhead_s(n_new.size))

    def _batch_overhead_s(self, n_seqs: int) -> float:
        """``batch_step_overhead_s`` plus ``batch_seq_overhead_s`` per sequence beyond the
        first; 0 for one sequence."""
        if n_seqs <= 1:
            return 0.0
        return (self.params.batch_step_overhead_s
                + (n_seqs - 1) * self.params.batch_seq_overhead_s)

    def decode_steps_s(self, n_seqs: int, n_cached: float, n_steps: int) -> np.ndarray:
        """Durations of ``n_steps`` consecutive pure-decode steps of one batch, s: ``n_seqs``
        sequences holding ``n_cached`` KV tokens together before the first step, one token
        each per step. Each is :meth:`step_s` of that step (the same sums, in closed form
        over the sequences)."""
        j = np.arange(1, n_steps + 1, dtype=np.float64)
        compute = (n_seqs * float(self.forward_compute_s(1, 0))
                   + self._attention_flops_per_position * (n_cached + n_seqs * (j - 1))
                   / self._attention_flops_per_s)
        memory = self.forward_memory_s(n_cached + n_seqs * j)
        return (np.maximum(compute, memory) + n_seqs * self.params.token_overhead_s
                + self._batch_overhead_s(n_seqs))

    def decode_s(self, n_in, n_out) -> np.ndarray:
        """Decode time per request, s: ``n_out − 1`` steps after the prefill's token."""
        n_in = _as_array(n_in)
        steps = np.maximum(_as_array(n_out) - 1.0, 0.0)
        body = self._decode_kv_on(n_in, steps) if self.kv_cache else self._decode_kv_off(
            n_in, steps)
        return body + steps * self.params.token_overhead_s

    def _decode_kv_on(self, n_in, steps):
        llm = self.llm
        attn = self._attention_flops_per_position / self._attention_flops_per_s
        g0 = (2.0 * llm.matmul_params + llm.lm_head_flops) / self._flops_per_s + attn * n_in
        m1 = llm.kv_bytes_per_token / self._bytes_per_s
        return sum_max_linear(g0, attn, self.forward_memory_s(n_in), m1, steps)

    def _decode_kv_off(self, n_in, steps):
        # step k re-runs a pass over c = n_in + k tokens:
        #   compute q(k) = p·c + lm + a·(c² + c),  memory r(k) = floor + m1·c
        llm = self.llm
        p = 2.0 * llm.matmul_params / self._flops_per_s
        lm = llm.lm_head_flops / self._flops_per_s
        a = self._attention_flops_per_position / self._attention_flops_per_s / 2.0
        m1 = llm.kv_bytes_per_token / self._bytes_per_s
        qa = p * n_in + lm + a * (n_in**2 + n_in)
        qb = p + a * (2.0 * n_in + 1.0)
        qc = a
        r0 = self.forward_memory_s(n_in)
        # q − r is a convex quadratic in k, increasing for k >= 0 (qb > m1: a pass's matmul
        # time per token dwarfs reading one token's KV); find the first compute-bound step
        da, db = qa - r0, qb - m1
        disc = np.maximum(db**2 - 4.0 * qc * da, 0.0)
        root = (-db + np.sqrt(disc)) / (2.0 * qc)
        first = np.where(da + db + qc >= 0, 1.0, np.clip(np.ceil(root), 1.0, steps + 1.0))
        bound = np.minimum(first - 1.0, steps)
        memory = bound * r0 + m1 * _sum_k(np.ones_like(bound), bound)
        lo, hi = first, steps
        compute = np.where(
            hi >= lo, (hi - lo + 1) * qa + qb * _sum_k(lo, hi) + qc * _sum_k2(lo, hi), 0.0)
        return memory + compute


TIMING_MODELS = {"thesis": ThesisTiming, "roofline": RooflineTiming}


def make_timing(name: str, llm: LLMSpec, gpu: GPUSpec, params: TimingParams | None = None,
                kv_cache: bool = True) -> ThesisTiming | RooflineTiming:
    """Build the timing model called ``name`` (``thesis`` or ``roofline``).

    Raises
    ------
    ValueError
        For an unknown model name.
    """
    try:
        cls = TIMING_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown timing model '{name}'; known: {', '.join(TIMING_MODELS)}"
                         ) from None
    return cls(llm=llm, gpu=gpu, params=params or TimingParams(), kv_cache=kv_cache)
