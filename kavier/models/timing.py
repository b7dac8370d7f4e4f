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
from functools import cached_property
from typing import NamedTuple

import numpy as np

from archive.errors import InputError
from kavier.models.library import GPUSpec, LLMSpec


@dataclass(frozen=True)
class TimingParams:
    """Hyperparameters of the timing models (the quantities ``calibrate`` fits).

    Attributes
    ----------
    compute_efficiency : float
        ``C_e``, achieved fraction of the GPU's dense FP16 peak (thesis default 0.30, eq. 4.2,
        4.5; Recasens et al. 2025 report at most 30–35 %).
    memory_efficiency : float
        ``M_e``, achieved fraction of peak DRAM bandwidth when streaming the weights (thesis
        default 0.60, eq. 4.6; Recasens et al. measure 57.6 % on average).
    kv_memory_efficiency : float or None
        Roofline only: ``M_kv``, achieved fraction of peak bandwidth when reading and writing
        the KV cache. Paged-attention kernels stream many sequences' KV blocks at once and
        reach a different (under batched decode, higher) fraction of peak than the weight
        GEMVs of a small batch, so one efficiency cannot fit both (vLLM serving runs under
        load, docs/calibration.md); ``None`` means ``memory_efficiency``.
    request_overhead_s : float
        ``O``, fixed time per request outside the GPU passes: HTTP, tokenization,
        detokenization and streaming (thesis default 25 ms, eq. 4.2). The simulator charges it
        in the front end, beside the GPU (vLLM V1's API server runs in its own process): it
        adds to the request's TTFT and E2E latency, never to an engine step.
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
        measurements where the hard maximum misses by up to 16 %. In a batched step it
        applies when a prefill chunk is in the batch (a mixed step). Decode steps (one token,
        about 1 FLOP per byte) sit far below the ridge and keep the hard maximum, which has a
        closed-form sum. The library default (:data:`ROOFLINE_DEFAULTS`) is 2.
    allreduce_latency_s : float or None
        Tensor and expert parallelism only: fixed time of one collective step over the link
        in use (NCCL's launch and synchronisation), s; a collective takes
        :attr:`Link.hops` of them. ``None`` (the default) takes the link's own figure,
        :data:`LINK_LATENCY_S`: NVLink 6 µs, PCIe 40 µs per ring hop, network 20 µs.
    link_efficiency : float or None
        Tensor and expert parallelism only: achieved share of the interconnect's bandwidth in
        one of the engine's collectives. ``None`` (the default) takes the link's own figure,
        :data:`LINK_EFFICIENCY`: NVLink and network 0.7, PCIe 0.25.
    compute_half_tokens : float
        Roofline only: ``n½``, the tokens of a forward pass at which its weight matmuls reach
        half of ``C_e``; over ``T`` tokens they run at ``F · C_e · T / (T + n½)``. GEMM
        efficiency grows with the token (M) dimension until the tiles fill every SM, so short
        prefill chunks and small batches achieve less of the peak than long prompts
        (Sarathi-Serve, Agrawal et al., OSDI 2024: prefill throughput saturates with chunk
        size; the saturating form is our assumption). The pass's matmul time is then
        ``2·P·(T + n½) / (F·C_e)``: a constant ``2·P·n½ / (F·C_e)`` more per pass for a dense
        model, and per expert touched for a mixture of experts, whose expert GEMMs each see a
        share of the tokens (:meth:`RooflineTiming.pass_compute_s`). Default 0: one efficiency
        at every size (the thesis's eq. 4.2).
    batch_step_overhead_s, batch_seq_overhead_s : float
        Continuous batching only: extra time of a step that batches two or more sequences, and
        per sequence beyond the first (scheduling, sampling, kernels less efficient on ragged
        batches). Both vanish for one sequence, so batch size 1 equals the sequential model;
        ``calibrate`` fits them to measurements taken with requests in flight together.
    """

    compute_efficiency: float = 0.30
    memory_efficiency: float = 0.60
    kv_memory_efficiency: float | None = None
    request_overhead_s: float = 0.025
    token_overhead_s: float = 0.0
    prefill_floor_s: float | None = None
    attention_efficiency: float | None = None
    prefill_sharpness: float | None = None
    batch_step_overhead_s: float = 0.0
    batch_seq_overhead_s: float = 0.0
    allreduce_latency_s: float | None = None
    link_efficiency: float | None = None
    compute_half_tokens: float = 0.0

    def to_dict(self) -> dict:
        """Plain dict of the parameters (for profiles and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **changes) -> TimingParams:
        """A copy with some parameters changed."""
        return replace(self, **changes)


class Costs(NamedTuple):
    """What GPU work costs: each field a float or an array (one value per request or step).

    Attributes
    ----------
    duration_s : wall time on the GPU, s
    flops : floating-point operations (for MFU = flops / (peak FLOP/s × duration))
    bytes : DRAM bytes read or written (for MBU = bytes / (peak B/s × duration))
    compute_s : time the FLOPs take at the achieved rate ``F · C_e``, s
    memory_s : time the bytes take at the achieved rate ``B · M_e``, s
    """

    duration_s: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray
    compute_s: np.ndarray
    memory_s: np.ndarray


class ExpertGroup(NamedTuple):
    """The tokens of one step of the data-parallel ranks of an expert-parallel group, which
    step together (:mod:`kavier.sim.engine`, lockstep). Every rank's expert layers see all
    of them: the expert layer gathers every rank's hidden states (vLLM's default
    ``allgather_reducescatter`` backend), so a rank's expert work and expert weight traffic
    follow the group's tokens, not its own.

    Attributes
    ----------
    tokens : float
        Tokens of every rank in the step (an idle rank's dummy batch counts its one token):
        ``T``, the ``expert_tokens`` of :meth:`LLMSpec.weight_bytes_read`.
    received : float
        Tokens the rank that receives the most gets in one all-gather, ``T − min_r n_r``
        (over a ring every link but one carries each rank's tokens; ``(DP − 1)·n`` when
        balanced).
    """

    tokens: float
    received: float

    @classmethod
    def of(cls, rank_tokens) -> ExpertGroup:
        """The group of ranks computing ``rank_tokens`` tokens each (ints, one per rank)."""
        total = sum(rank_tokens)
        return cls(float(total), float(total - min(rank_tokens)))


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
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # ±inf roots clip
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
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    pipeline_parallel_size: int = 1

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
        """Prefill time of ``n_in`` computed tokens, s (eq. 4.2), front-end overhead ``O``
        included; ``n_cached`` (tokens already in the KV cache) is ignored: eq. 4.2 has no
        context term."""
        return self.prefill_gpu_s(n_in) + self.params.request_overhead_s

    def prefill_gpu_s(self, n_in, n_cached=0) -> np.ndarray:
        """GPU part of eq. 4.2, ``n_i · 2·m_p / (F · C_e)``, s (``n_cached`` ignored)."""
        return _as_array(n_in) * self.llm.params * 2.0 / self._flops_per_s

    @property
    def _flops_per_s(self) -> float:
        return self.gpu.flops_per_s * self.params.compute_efficiency

    def request_costs(self, n_in, n_cached, n_out) -> tuple[Costs, Costs]:
        """Prefill (of the ``n_in − n_cached`` tokens computed) and decode :class:`Costs`
        per request (eqs. 4.2–4.6).

        Prefill is compute-bound by construction (eq. 4.2 has no memory term); a decode token
        costs ``T_t = max(C, M)`` with ``C`` and ``M`` the two terms of eqs. 4.5–4.6.
        """
        n_i, n_o = _as_array(n_in) - _as_array(n_cached), _as_array(n_out)
        w = self.llm.weight_bytes
        prefill_flops = 2.0 * self.llm.params * n_i
        prefill_s = prefill_flops / self._flops_per_s
        prefill = Costs(prefill_s, prefill_flops, np.full(n_i.shape, w), prefill_s,
                        np.full(n_i.shape, w / (self.gpu.bytes_per_s
                                                * self.params.memory_efficiency)))
        steps = n_o if self.kv_cache else n_o * (n_o + 1) / 2.0
        compute = 2.0 * self.llm.params / self._flops_per_s
        memory = w / (self.gpu.bytes_per_s * self.params.memory_efficiency)
        decode = Costs(steps * max(compute, memory), steps * 2.0 * self.llm.params, steps * w,
                       steps * compute, steps * memory)
        return prefill, decode

    def inter_token_latencies(self, n_in, n_out) -> tuple[np.ndarray, np.ndarray]:
        """Inter-token latencies of requests alone on the GPU as (values, counts): eq. 4.3
        has no per-step detail, so each request's ``n_out − 1`` gaps are its mean
        ``decode_s / (n_out − 1)``, s."""
        n_out = np.asarray(n_out, np.int64)
        m = np.maximum(n_out - 1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(m > 0, self.decode_s(n_in, n_out) / m, 0.0)
        return mean, m

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

    Let ``F' = F · C_e`` be the achieved FLOP/s, ``B' = B · M_e`` the achieved bytes/s of
    weight streaming and ``B'_kv = B · M_kv`` that of KV-cache traffic
    (``kv_memory_efficiency``), ``P_mm`` the
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
    * Memory time of a pass attending to ``c`` positions: ``floor + kv·c/B'_kv``; ``floor`` is
      the shortest a pass can take, by default one streaming of the weights ``W/B'`` (a pass
      cannot finish before every weight has been read), fittable as ``prefill_floor_s``.
    * Prefill: ``max(FLOPs/F', memory) + O`` (or a soft maximum, see
      ``TimingParams.prefill_sharpness``).
    * Decode with KV cache, one step per token after the first (the first token comes out of
      prefill), at context ``c = n_in + k``:
      ``max((2·P_mm + 2·V·d + 4·L·d_attn·c)/F', floor + kv·c/B'_kv) + token_overhead`` (Williams
      et al. 2009, roofline; Recasens et al. 2025 for decode being bound by weights and KV
      reads). Summed in closed form (:func:`sum_max_linear`).
    * Decode without KV cache: every step re-runs a full forward pass over the ``c`` tokens so
      far, ``max(FLOPs(c, 0)/F', floor + kv·c/B'_kv) + token_overhead``, summed in closed form
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

    def pass_compute_s(self, n_tokens=1.0, expert_tokens=None):
        """Matmul time a forward pass over ``n_tokens`` tokens costs beyond its tokens' FLOPs,
        s: ``2·n½·P_g(n) / (F·C_e)`` (``compute_half_tokens``; 0 by default), ``P_g`` the
        parameters of the distinct weight GEMMs the pass runs on one rank
        (:meth:`LLMSpec.gemm_params`, of one stage; ``expert_tokens`` as
        :meth:`weight_bytes`).

        The ramp ``m / (m + n½)`` holds per GEMM, ``m`` the tokens that GEMM multiplies:
        summed over GEMMs ``g`` of ``P_g`` weights, ``Σ 2·P_g·(m_g + n½)`` is the pass's matmul
        FLOPs plus ``2·n½·Σ P_g``. A dense model's GEMMs all see the pass's ``T`` tokens, so
        this is the constant ``2·P·n½``; a mixture of experts runs one GEMM per expert touched,
        each on its share of the routed tokens (``T·k/E`` on average, a few dozen in a 512-token
        chunk of Qwen3-30B-A3B, where a dense GEMM sees all 512), so the term grows with the
        experts touched — the fused-MoE kernel's short expert GEMMs run further below the
        peak than a dense GEMM of the same FLOPs. One token touches ``k`` experts, which is
        the dense constant with the active parameters."""
        return (2.0 * self._gemm_params(n_tokens, expert_tokens)
                * self.params.compute_half_tokens / self._flops_per_s)

    def _gemm_params(self, n_tokens, expert_tokens=None):
        if not self.llm.n_experts:
            return self._matmul_params
        return (self.llm.gemm_params(self._expert_tokens(n_tokens, expert_tokens),
                                     self.tensor_parallel_size, self.expert_parallel_size)
                * self.stage_share)

    @cached_property
    def data_parallel_size(self) -> int:
        """Data-parallel ranks of the expert-parallel group, ``EP / TP`` (1 without expert
        parallelism): the ranks whose tokens the expert layers gather."""
        ep = self.expert_parallel_size
        return ep // self.tensor_parallel_size if ep > 1 else 1

    def _expert_tokens(self, n_tokens, expert_tokens):
        """Tokens a GPU's expert layer sees in a pass over ``n_tokens`` tokens per rank:
        ``expert_tokens`` when given (a lockstep step's :class:`ExpertGroup`), else those of
        ``DP`` balanced ranks, ``DP × n``."""
        if expert_tokens is not None:
            return expert_tokens
        return _as_array(n_tokens) * self.data_parallel_size

    @cached_property
    def _routed_flops_per_token(self) -> float:
        """Routed-expert FLOPs one GPU spends per token its expert layer sees, ``2·L_e·k·
        expert / split`` of one stage (:meth:`LLMSpec.expert_split`)."""
        llm = self.llm
        split = llm.expert_split(self.tensor_parallel_size, self.expert_parallel_size)
        return (2.0 * llm.n_expert_layers * llm.n_experts_per_token * llm.expert_params
                / split * self.stage_share)

    def _compute_s(self, matmul_flops, attention_flops, pass_s):
        """Compute time of forward passes doing these FLOPs, s: the weight matmuls (and LM
        head) at ``F·C_e`` plus ``pass_s`` (their :meth:`pass_compute_s`, summed), the
        attention at the attention efficiency."""
        return (matmul_flops / self._flops_per_s + pass_s
                + attention_flops / self._attention_flops_per_s)

    @property
    def _bytes_per_s(self) -> float:
        return self.gpu.bytes_per_s * self.params.memory_efficiency

    @property
    def _kv_bytes_per_s(self) -> float:
        efficiency = self.params.kv_memory_efficiency or self.params.memory_efficiency
        return self.gpu.bytes_per_s * efficiency

    @cached_property
    def stage_share(self) -> float:
        """Share of the layers on the slowest pipeline stage, ``ceil(L / PP) / L`` (vLLM
        splits the layers as evenly as it can; 1 without pipeline parallelism). Every
        per-rank quantity below is one stage's: with ``PP`` stages a step's costs are those of
        one stage's GPUs, and the embedding and LM head are spread over the stages with the
        layers (an approximation: vLLM puts them on the first and last stage)."""
        layers = self.llm.n_layers
        return -(-layers // self.pipeline_parallel_size) / layers

    @property
    def _attention_flops_per_position(self) -> float:
        """``4·L·d_attn / TP``: FLOPs of ``QKᵀ`` and ``AV`` per (query, key) pair on one
        tensor-parallel rank (the heads are split across ranks) of one stage."""
        return (4.0 * self.llm.n_layers * self.llm.attention_dim / self.tensor_parallel_size
                * self.stage_share)

    @property
    def _matmul_params(self) -> float:
        """Weight-matmul parameters per token on one rank: active, non-embedding, ``/ TP``,
        of one stage."""
        return self.llm.matmul_params / self.tensor_parallel_size * self.stage_share

    @property
    def _lm_head_flops(self) -> float:
        """One logits computation on one rank (the vocabulary is split across ranks)."""
        return self.llm.lm_head_flops / self.tensor_parallel_size * self.stage_share

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token on one rank of one stage: eq. 4.1 with the rank's KV
        heads, ``n_kv_heads / TP``, or one replicated head when there are fewer heads than
        ranks (vLLM replicates them)."""
        return (kv_bytes_per_token_per_rank(self.llm, self.tensor_parallel_size)
                * self.stage_share)

    @cached_property
    def _dense_weight_bytes(self) -> float:
        return self.llm.streamed_weight_bytes / self.tensor_parallel_size * self.stage_share

    def weight_bytes(self, n_tokens=1.0, expert_tokens=None):
        """Weight bytes one rank of one stage streams in a pass over ``n_tokens`` tokens: its
        weights but the untied input embedding, whose lookup gathers rows
        (:attr:`LLMSpec.streamed_weight_bytes` ``/ TP``, a float) for a dense model; the
        shared ones plus its experts that the expert layer's tokens are routed to for a
        mixture of experts (:meth:`LLMSpec.weight_bytes_read`): ``expert_tokens`` when given
        (a lockstep step's group), else ``DP × n`` (:attr:`data_parallel_size` balanced
        ranks). The thesis model (eq. 4.6) streams them all."""
        if not self.llm.n_experts:
            return self._dense_weight_bytes
        return (self.llm.weight_bytes_read(self._expert_tokens(n_tokens, expert_tokens),
                                           self.tensor_parallel_size, self.expert_parallel_size)
                * self.stage_share)

    def floor_s(self, n_tokens=1.0):
        """Shortest forward pass over ``n_tokens`` tokens, s: ``prefill_floor_s`` or the time
        to stream the weights it reads, ``weight_bytes(n) / B'`` (a constant for a dense
        model)."""
        return self._floor_of(self.weight_bytes(n_tokens))

    def _floor_of(self, weight_bytes):
        """:meth:`floor_s` of a pass that streams ``weight_bytes`` (computed once per pass by
        the callers that also report the bytes)."""
        if self.params.prefill_floor_s is not None:
            return self.params.prefill_floor_s
        return weight_bytes / self._bytes_per_s

    @cached_property
    def tp_link(self) -> Link:
        """The link the tensor-parallel all-reduces run over (:func:`collective_link`)."""
        return collective_link(self.gpu, self.tensor_parallel_size)

    @cached_property
    def ep_link(self) -> Link:
        """The link the expert-parallel all-gathers and reduce-scatters run over: that of the
        group's ``EP`` GPUs, around a ring of its :attr:`data_parallel_size` ranks."""
        return collective_link(self.gpu, self.expert_parallel_size,
                               ring=self.data_parallel_size)

    def _collective_s(self, link: Link, size, volume: float, hops: int | None = None):
        """One collective (or point-to-point send, ``hops=1``) moving ``volume × size`` bytes
        per GPU over ``link``, s: ``hops`` latency steps (default the link's), the fitted
        ``allreduce_latency_s`` or the link's own."""
        latency, efficiency = self.params.allreduce_latency_s, self.params.link_efficiency
        latency = link.latency_s if latency is None else latency
        efficiency = link.efficiency if efficiency is None else efficiency
        return latency * (link.hops if hops is None else hops) + volume * size / (
            link.gbps * 1e9 * efficiency)

    @cached_property
    def stage_link(self) -> Link:
        """The link activations cross between pipeline stages: within a node when the
        replica's ``TP × PP`` GPUs fit one, else the network."""
        return collective_link(self.gpu, self.tensor_parallel_size * self.pipeline_parallel_size,
                               "pipeline-parallel-size")

    def p2p_s(self, n_tokens) -> float:
        """Sending the hidden states of ``n_tokens`` tokens to the next pipeline stage, s:
        one hop's latency plus ``n × hidden × bytes / TP`` per GPU over :attr:`stage_link`
        (each tensor-parallel rank sends its slice; vLLM's ``send_tensor_dict``)."""
        size = (float(n_tokens) * self.llm.hidden_dim * self.llm.bytes_per_param
                / self.tensor_parallel_size)
        return self._collective_s(self.stage_link, size, 1.0, hops=1)

    def comm_s(self, n_tokens, received=None):
        """Collective communication of one pass over ``n_tokens`` tokens, s; linear in ``n``.

        * Tensor parallelism: two ring all-reduces per layer (after attention and after the
          MLP; Shoeybi et al. 2019, Megatron-LM) of ``n × hidden × bytes``, each ``hops ×
          latency + 2·(TP − 1)/TP × bytes / (link × η)`` over :attr:`tp_link`.
        * Expert parallelism over ``DP > 1`` data-parallel ranks (:attr:`data_parallel_size`):
          per expert layer (:attr:`LLMSpec.n_expert_layers`) an all-gather of the hidden
          states of all ranks' tokens and a reduce-scatter of the expert outputs (vLLM's
          default ``allgather_reducescatter`` all-to-all backend), each ``hops × latency +
          received × hidden × bytes / (link × η)`` over :attr:`ep_link`, ``received`` the
          tokens the busiest GPU receives (:class:`ExpertGroup`; ``(DP − 1)·n`` with balanced
          ranks). With one data-parallel rank the tokens are already on every GPU of the
          group and the experts' outputs join the tensor-parallel all-reduce: no exchange.

        0 without either. ``η`` is ``link_efficiency`` or the link's own
        (:data:`LINK_EFFICIENCY`), the latency ``allreduce_latency_s`` or the link's own
        (:data:`LINK_LATENCY_S`).
        """
        total = 0.0
        if self.tensor_parallel_size > 1:
            total = total + self.tp_comm_s(n_tokens)
        if self.data_parallel_size > 1:
            if received is None:
                received = _as_array(n_tokens) * (self.data_parallel_size - 1)
            total = total + self.ep_comm_s(received)
        return total

    def tp_comm_s(self, n_tokens):
        """The tensor-parallel all-reduces of :meth:`comm_s`, s."""
        tp = self.tensor_parallel_size
        size = _as_array(n_tokens) * self.llm.hidden_dim * self.llm.bytes_per_param
        return 2.0 * self.llm.n_layers * self.stage_share * self._collective_s(
            self.tp_link, size, 2.0 * (tp - 1) / tp)

    def ep_comm_s(self, received):
        """The expert-parallel all-gathers and reduce-scatters of :meth:`comm_s` when the
        busiest GPU receives ``received`` tokens in each, s."""
        size = _as_array(received) * self.llm.hidden_dim * self.llm.bytes_per_param
        return 2.0 * self.llm.n_expert_layers * self.stage_share * self._collective_s(
            self.ep_link, size, 1.0)

    def forward_compute_s(self, n_new, n_cached=0) -> np.ndarray:
        """Compute time of one forward pass over ``n_new`` tokens after ``n_cached`` cached
        ones, s: weight matmuls and LM head at ``C_e``, attention at the attention efficiency.
        """
        n, c = _as_array(n_new), _as_array(n_cached)
        matmul = 2.0 * self._matmul_params * n + self._lm_head_flops
        pairs = n * c + n * (n + 1) / 2.0
        return self._compute_s(matmul, self._attention_flops_per_position * pairs,
                               self.pass_compute_s(n))

    def forward_memory_s(self, n_context) -> np.ndarray:
        """Memory time of one forward pass that attends to ``n_context`` positions, s: the
        floor (one weight streaming) plus reading or writing their K and V."""
        return self.floor_s() + self.kv_bytes_per_token * _as_array(n_context) / (
            self._kv_bytes_per_s)

    def prefill_s(self, n_in, n_cached=0) -> np.ndarray:
        """Prefill time per request, s, including the front-end overhead ``O``.

        ``n_cached`` tokens already in the KV cache (a prefix-cache hit) are not recomputed
        but are attended to.
        """
        return self.prefill_gpu_s(n_in, n_cached) + self.params.request_overhead_s

    def prefill_gpu_s(self, n_in, n_cached=0) -> np.ndarray:
        """One prefill forward pass on the GPU computing ``n_in`` tokens after ``n_cached``
        in the KV cache, s (no front-end overhead)."""
        return self.pass_costs(n_in, n_cached).duration_s

    def _soft_max(self, compute, memory):
        high = np.maximum(compute, memory)
        p = self.params.prefill_sharpness
        if p is None:
            return high
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(high > 0, np.minimum(compute, memory) / high, 0.0)
        return high * (1.0 + ratio**p) ** (1.0 / p)

    def _matmul_flops(self, n_new):
        return 2.0 * self._matmul_params * _as_array(n_new) + self._lm_head_flops

    def pass_costs(self, n_new, n_cached=0) -> Costs:
        """:class:`Costs` of one prefill pass per element (one sequence alone on the GPU):
        ``n_new`` tokens computed after ``n_cached`` in the KV cache; arrays broadcast."""
        n, c = _as_array(n_new), _as_array(n_cached)
        matmul = self._matmul_flops(n)
        attention = self._attention_flops_per_position * (n * c + n * (n + 1) / 2.0)
        compute = self._compute_s(matmul, attention, self.pass_compute_s(n))
        kv = self.kv_bytes_per_token * (n + c)
        weights = self.weight_bytes(n)
        memory = self._floor_of(weights) + kv / self._kv_bytes_per_s
        return Costs(self._soft_max(compute, memory) + self.comm_s(n), matmul + attention,
                     weights + kv, compute, memory)

    def step_costs(self, n_new: np.ndarray, n_cached: np.ndarray, n_decoding: int,
                   group: ExpertGroup | None = None) -> Costs:
        """:class:`Costs` of one engine step over a batch of sequences (iteration-level
        batching), floats.

        Sequence ``i`` computes ``n_new[i]`` tokens after ``n_cached[i]`` in the KV cache; the
        last ``n_decoding`` entries... no: ``n_decoding`` of them are decode tokens, the rest
        prefill chunks. The batch's compute is the sum of the sequences' (weight matmuls per
        token, LM head per sequence, attention per pair); its memory one streaming of the
        weights plus every sequence's KV; the step takes their maximum (the soft maximum of
        ``prefill_sharpness`` when a prefill chunk is in the batch), plus ``token_overhead_s``
        per decode token and the batch overheads. For one sequence it is exactly a pass of
        :meth:`pass_costs` or one decode step of :meth:`decode_s`.

        ``group``: the step of one data-parallel rank of an expert-parallel group
        (:class:`ExpertGroup`): the routed experts' FLOPs, GEMM ramp and weight traffic follow
        the group's tokens, the all-gathers the most any GPU receives; the rest (attention,
        shared weights, LM head, KV) the rank's own batch. Without it the ranks are taken as
        balanced (``DP`` ranks of this batch).
        """
        n, c = _as_array(n_new), _as_array(n_cached)
        matmul = float(np.sum(self._matmul_flops(n)))
        attention = self._attention_flops_per_position * float(np.sum(n * c + n * (n + 1) / 2.0))
        tokens = float(np.sum(n))
        expert, received = (None, None) if group is None else group
        if group is not None:           # the routed experts run on the group's tokens
            matmul = matmul + self._routed_flops_per_token * (
                expert - tokens * self.data_parallel_size)
        compute = self._compute_s(matmul, attention,
                                  float(self.pass_compute_s(tokens, expert)))
        kv = self.kv_bytes_per_token * float(np.sum(n + c))
        weights = float(self.weight_bytes(tokens, expert))
        memory = float(self._floor_of(weights)) + kv / self._kv_bytes_per_s
        high = max(compute, memory)
        p = self.params.prefill_sharpness
        if n_decoding != n.size and p is not None and high > 0:   # _soft_max, on floats
            high = high * (1.0 + (min(compute, memory) / high) ** p) ** (1.0 / p)
        duration = (high + n_decoding * self.params.token_overhead_s
                    + self._batch_overhead_s(n.size) + float(self.comm_s(tokens, received)))
        return Costs(duration, matmul + attention, weights + kv,
                     compute, memory)

    def _batch_overhead_s(self, n_seqs: int) -> float:
        """``batch_step_overhead_s`` plus ``batch_seq_overhead_s`` per sequence beyond the
        first; 0 for one sequence."""
        if n_seqs <= 1:
            return 0.0
        return (self.params.batch_step_overhead_s
                + (n_seqs - 1) * self.params.batch_seq_overhead_s)

    def decode_run(self, context: np.ndarray, n_steps: int) -> Costs:
        """``n_steps`` consecutive pure-decode steps of one batch.

        ``context[i]`` is the number of tokens sequence ``i`` has computed before the run
        (prompt plus generated tokens but the last). With the KV cache each step computes one
        token per sequence after its context; without it each step re-runs a forward pass
        over the whole context plus the new token (:meth:`decode_s`'s KV-off model). Each
        step is :meth:`step_costs` of that step, in closed form over the sequences.

        Returns
        -------
        Costs
            Of each step, arrays of shape ``(n_steps,)``; a run cut short after ``k`` steps
            costs the sums of the first ``k``.
        """
        c = _as_array(context)
        n = c.size
        j = np.arange(n_steps, dtype=np.float64)             # steps already done
        a_pos = self._attention_flops_per_position
        if self.kv_cache:
            matmul = n * (2.0 * self._matmul_params + self._lm_head_flops)
            pairs = float(c.sum()) + n * (j + 1)                # Σ (c_i + j + 1)
            attention = a_pos * pairs
            kv = self.kv_bytes_per_token * pairs
        else:                                   # sequence i re-runs m_i = c_i + j + 1 tokens
            s1, s2 = float(c.sum()), float((c * c).sum())
            m1 = s1 + n * (j + 1)                               # Σ m_i
            m2 = s2 + 2 * (j + 1) * s1 + n * (j + 1) ** 2       # Σ m_i²
            matmul = 2.0 * self._matmul_params * m1 + n * self._lm_head_flops
            attention = a_pos * (m2 + m1) / 2.0
            kv = self.kv_bytes_per_token * m1
        tokens = float(n)           # one per sequence (MoE and TP need the KV cache)
        compute = self._compute_s(matmul, attention, self.pass_compute_s(tokens))
        weights = self.weight_bytes(tokens)
        memory = self._floor_of(weights) + kv / self._kv_bytes_per_s
        durations = (np.maximum(compute, memory) + n * self.params.token_overhead_s
                     + self._batch_overhead_s(n) + self.comm_s(tokens))
        return Costs(durations, matmul + attention, weights + kv, compute, memory)

    def decode_run_work(self, context: np.ndarray, n_steps: int) -> tuple[float, ...]:
        """FLOPs, bytes, compute and memory time of the first ``n_steps`` steps of
        :meth:`decode_run` (the fields of its :class:`Costs` after the duration, summed).

        With the KV cache in closed form over the steps (``Σ_j (c + n·(j + 1)) = k·c +
        n·k(k + 1)/2`` context positions for ``c = Σ context``), so that a run's work costs
        the same in every engine and no more than its first step; without it the sums of
        :meth:`decode_run`'s arrays.
        """
        if not self.kv_cache:
            return tuple(float(a.sum()) for a in self.decode_run(context, n_steps)[1:])
        n, k = _as_array(context).size, float(n_steps)
        pairs = k * float(_as_array(context).sum()) + n * (k * (k + 1.0) / 2.0)
        matmul = k * (n * (2.0 * self._matmul_params + self._lm_head_flops))
        attention = self._attention_flops_per_position * pairs
        kv = self.kv_bytes_per_token * pairs
        weights = float(self.weight_bytes(float(n)))
        memory = k * float(self._floor_of(weights)) + kv / self._kv_bytes_per_s
        return (matmul + attention, k * weights + kv,
                float(self._compute_s(matmul, attention, k * self.pass_compute_s(float(n)))),
                memory)

    def decode_costs(self, n_in, n_out) -> Costs:
        """:class:`Costs` of each request's decode alone on the GPU (``n_out − 1`` steps after
        the prefill's token), closed form; ``duration_s`` equals :meth:`decode_s`."""
        n_in = _as_array(n_in)
        m = np.maximum(_as_array(n_out) - 1.0, 0.0)
        k1 = _sum_k(np.ones_like(m), m)                      # Σ k, k = 1..m
        a_pos, kvb = self._attention_flops_per_position, self.kv_bytes_per_token
        if self.kv_cache:                                    # step k: context n_in + k
            matmul = m * float(self._matmul_flops(1))
            attention = a_pos * (m * n_in + k1)
            kv = kvb * (m * n_in + k1)
        else:                                                # step k re-runs n_in + k tokens
            k2 = _sum_k2(np.ones_like(m), m)
            s1 = m * n_in + k1                               # Σ (n_in + k)
            s2 = m * n_in**2 + 2 * n_in * k1 + k2            # Σ (n_in + k)²
            matmul = 2.0 * self._matmul_params * s1 + m * self._lm_head_flops
            attention = a_pos * (s2 + s1) / 2.0
            kv = kvb * s1
        compute = self._compute_s(matmul, attention, m * self.pass_compute_s())
        memory = m * self.floor_s() + kv / self._kv_bytes_per_s
        return Costs(self.decode_s(n_in, n_out), matmul + attention,
                     m * self.weight_bytes() + kv, compute, memory)

    def inter_token_latencies(self, n_in, n_out) -> tuple[np.ndarray, np.ndarray]:
        """Every decode step's duration, request after request (``n_out − 1`` each, at
        context ``n_in + k``), flattened — the inter-token latencies of requests alone on the
        GPU, s — and their counts (all 1)."""
        n_in, n_out = np.asarray(n_in, np.int64), np.asarray(n_out, np.int64)
        m = np.maximum(n_out - 1, 0)
        first = np.cumsum(m) - m
        c = (np.repeat(n_in, m) + np.arange(int(m.sum())) - np.repeat(first, m) + 1.0)
        a_pos, kvb = self._attention_flops_per_position, self.kv_bytes_per_token
        if self.kv_cache:
            compute = float(self._matmul_flops(1)) / self._flops_per_s + a_pos * c / (
                self._attention_flops_per_s)
        else:
            compute = self._matmul_flops(c) / self._flops_per_s + a_pos * c * (c + 1) / 2.0 / (
                self._attention_flops_per_s)
        compute = compute + self.pass_compute_s()
        memory = self.floor_s() + kvb * c / self._kv_bytes_per_s
        durations = (np.maximum(compute, memory) + self.params.token_overhead_s
                     + self.comm_s(1.0))
        return durations, np.ones(durations.size, np.int64)

    def request_costs(self, n_in, n_cached, n_out) -> tuple[Costs, Costs]:
        """Prefill (one pass over ``n_in − n_cached`` tokens after ``n_cached``) and decode
        :class:`Costs` per request alone on the GPU."""
        n_in = _as_array(n_in)
        return self.pass_costs(n_in - n_cached, n_cached), self.decode_costs(n_in, n_out)

    def decode_s(self, n_in, n_out) -> np.ndarray:
        """Decode time per request, s: ``n_out − 1`` steps after the prefill's token."""
        n_in = _as_array(n_in)
        steps = np.maximum(_as_array(n_out) - 1.0, 0.0)
        body = self._decode_kv_on(n_in, steps) if self.kv_cache else self._decode_kv_off(
            n_in, steps)
        comm = steps * self.comm_s(1.0)      # one token per step (TP needs the KV cache)
        return body + steps * self.params.token_overhead_s + comm

    def _decode_kv_on(self, n_in, steps):
        attn = self._attention_flops_per_position / self._attention_flops_per_s
        g0 = ((2.0 * self._matmul_params + self._lm_head_flops) / self._flops_per_s
              + self.pass_compute_s() + attn * n_in)
        m1 = self.kv_bytes_per_token / self._kv_bytes_per_s
        return sum_max_linear(g0, attn, self.forward_memory_s(n_in), m1, steps)

    def _decode_kv_off(self, n_in, steps):
        # step k re-runs a pass over c = n_in + k tokens:
        #   compute q(k) = p·c + lm + a·(c² + c),  memory r(k) = floor + m1·c
        p = 2.0 * self._matmul_params / self._flops_per_s
        lm = self._lm_head_flops / self._flops_per_s
        a = self._attention_flops_per_position / self._attention_flops_per_s / 2.0
        m1 = self.kv_bytes_per_token / self._kv_bytes_per_s
        qa = p * n_in + lm + self.pass_compute_s() + a * (n_in**2 + n_in)
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

ROOFLINE_DEFAULTS = TimingParams(compute_efficiency=0.80, memory_efficiency=0.85,
                                 kv_memory_efficiency=0.50, prefill_sharpness=2.0)
"""The library's roofline parameters for a GPU without a profile (``request_overhead_s``
stays the thesis's 25 ms, the overheads 0); :func:`default_params` scales the compute
efficiency by the GPU's measured GEMM share.

Re-derived from measurements rather than the thesis's 0.30 / 0.60, which describe one A10
under eager PyTorch and leave current GPUs far too slow (an uncalibrated run overloads where
the real GPU keeps up).

* **Compute.** A GPU's dense peak is not what its GEMMs reach, and the shortfall differs by
  board: published PyTorch BF16 matmul benchmarks reach 1.00 of the data-sheet peak on an RTX
  4090 and 0.78 on an RTX PRO 6000 Blackwell (0.74–0.85 on data-centre GPUs; ``gemm_tflops``
  in the GPU library, with sources). Serving runs reach a share of that measured rate; the
  bundled vLLM 0.19 runs, fitted by ``kavier calibrate --dataset vllm-serving-…``
  (docs/calibration.md), give 0.76–0.82 (RTX PRO 6000) and 0.90–0.91 (RTX 4090). The default is
  ``compute_efficiency = 0.80 × gemm_share``: one library-wide 0.80 times the board's
  measured share (:attr:`~kavier.models.library.GPUSpec.gemm_share`).
* **Memory.** Weight streaming 0.85 and KV streaming 0.50 of peak DRAM bandwidth, inside the
  fitted ranges (weights 0.78–0.93, KV 0.36–0.81, when the roofline streamed the input
  embedding too; 0.81–0.86 and 0.41–0.75 for the four shipped serving profiles since it
  gathers its rows, docs/calibration.md "Current figures"); KV below weights on every fit, as
  paged attention gathers scattered blocks. Recasens et al. 2025 measure 0.6–0.8 of peak bandwidth
  in batched decode on an H100.

* **Mixed steps.** ``prefill_sharpness = 2``: a step with a prefill chunk costs
  ``(compute² + memory²)^½``, not the larger of the two. A step is a sequence of kernels, each
  compute- or memory-bound on its own (the chunk's GEMMs and attention against the decodes'
  KV reads), so its time lies between the maximum and the sum of the totals. Fits free to
  choose the exponent put it near 2 on four of five datasets: the A10 prefill sweep 1.96
  (thesis data, shipped profile ``a10-llama-3-8b-vllm``) and the RTX PRO 6000 Llama, RTX 4090
  Llama and Qwen3-30B-A3B serving runs 2.02, 2.37 and 2.02; the Qwen3-32B TP = 2 run alone
  prefers the sum, 1.0 (``kavier calibrate --dataset … --fit …,prefill_sharpness``;
  docs/calibration.md).

The three efficiencies are round ones picked on a coarse grid (0.05 steps,
``benchmarks/defaults_grid.py``) for the smallest worst per-request MAPE over both Llama runs
with the hard maximum, not fitted to either; they were kept when the soft maximum came in
(docs/calibration.md, "Library defaults", says why)."""


def default_params(name: str, gpu: GPUSpec | None = None) -> TimingParams:
    """The parameters of timing model ``name`` when no profile is given.

    ``thesis``: the thesis's (eqs. 4.2–4.6: 0.30, 0.60, 25 ms). ``roofline``:
    :data:`ROOFLINE_DEFAULTS`, with the compute efficiency multiplied by ``gpu``'s measured
    GEMM share (``gemm_tflops / fp16_tflops``, capped at 1) when a GPU is given.
    """
    if name != "roofline":
        return TimingParams()
    if gpu is None:
        return ROOFLINE_DEFAULTS
    share = min(gpu.gemm_share, 1.0)
    return ROOFLINE_DEFAULTS.with_(
        compute_efficiency=ROOFLINE_DEFAULTS.compute_efficiency * share)


TIMING_REVISION = 4
"""Revision of what the roofline model's parameters mean, which a calibrated profile records
(``calibrate.profile.Profile.timing_revision``): a profile fitted against another revision gives
other step times than those its MAPE was measured with. Bumped whenever a change moves the
roofline's predictions for the same parameters:

1. Profiles written before profiles recorded it.
2. PCIe collectives cost 40 µs a ring hop (:data:`LINK_LATENCY_S`, was 7 µs), and a pass no
   longer streams an untied input embedding (:attr:`LLMSpec.streamed_weight_bytes`).
3. A mixture of experts pays ``compute_half_tokens``' GEMM ramp once per expert a pass touches
   (:meth:`RooflineTiming.pass_compute_s`), not once for the ``k`` experts of one token. A
   dense model's profile, or one with ``compute_half_tokens`` 0, predicts as under 2.
4. Expert parallelism follows the tokens each GPU's experts see: the data-parallel ranks of a
   group, stepping together, run their expert layers on the group's tokens
   (:class:`ExpertGroup`: routed FLOPs, GEMM ramp, weight traffic), and the all-gather lasts
   as long as the most any GPU receives; with tensor parallelism a GPU holds ``E / EP``
   whole experts (was ``1 / TP`` of those) and sees its rank's tokens once, and a group of
   one data-parallel rank exchanges nothing beyond the all-reduce. Dense models, and
   expert parallelism over balanced ranks of one GPU each, predict as under 3."""


LINK_LATENCY_S = {"NVLink": 6e-6, "PCIe": 4e-5, "network": 2e-5}
"""Fixed time of one collective step per kind of link, s:

* ``NVLink``: 6 µs for 2 H100 SXM over NVLink SHARP (NVIDIA/nccl issue 1259); an NVSwitch
  reaches every GPU in one hop, so it does not grow with the GPUs.
* ``PCIe``: 40 µs per ring hop, what NCCL costs over PCIe at the message sizes of decode
  (tens to hundreds of KB), not the few-KB floor of nccl-tests (8.3–12 µs for 2 PCIe GPUs,
  flashinfer PR 5023; 45 µs for 4 KB over 8 RTX 6000D, sgl-project/sglang PR 32479). At decode
  shapes the same sources give 344 µs for 64 KB over 8 PCIe Blackwell GPUs (49 µs a hop, sglang
  PR 32479) and 292 µs a call profiled in vLLM decode on 8 × A800 PCIe (42 µs a hop,
  vllm-project/vllm PR 50941); the bundled 2 × RTX PRO 6000 runs (vLLM 0.19) leave 4.3 ms (TP =
  2, 128 all-reduces) and 4.6 ms (DP = 2 with experts, 96 collectives) a decode step over the
  model at 7 µs, flat in the batch size (``benchmarks/decode_steps.py``): 41–55 µs a
  collective. Nodes where vLLM's custom all-reduce runs (peer-to-peer over one PCIe switch) are
  faster, about 20 µs for 4 GPUs inside a CUDA graph (haohervchb/sglang-V100 PR 2), and a
  16-GPU PCIe-switch host takes 36–40 µs a collective at decode sizes (local-inference-lab/b12x
  PR 139) where the ring's 15 hops give 600 µs: calibrate ``allreduce_latency_s`` there.
* ``network``: 19.9 µs for one A100 in each of two nodes over HDR InfiniBand (NVIDIA/nccl-tests
  issue 150), per node hop."""


LINK_EFFICIENCY = {"NVLink": 0.7, "PCIe": 0.25, "network": 0.7}
"""Achieved share of a link's bandwidth in the engine's collectives, per kind of link (the
default of ``TimingParams.link_efficiency``):

* ``NVLink`` and ``network``: 0.7, nccl-tests' bus bandwidth on large messages (0.7–0.85 of
  the link).
* ``PCIe``: 0.25, set from vLLM serving under load, where nccl-tests' large-message figure does
  not hold. The two 2-GPU runs over PCIe 5.0 x16 in the bundled data (2 × RTX PRO 6000, vLLM
  0.19: Qwen3-32B at TP = 2 and Qwen3-30B-A3B at DP = 2 with expert parallelism), replayed with
  every other term at its library default, run about 30 % too fast at 0.7 (median predicted /
  measured TPOT 0.72 and 0.75) in every regime: a 2,048-token prefill step of the TP run is
  about 340 ms measured (prompt throughput) against 271 ms modelled, 61 ms of it all-reduces,
  and decode steps of 128 sequences 56–59 ms against 47 ms. One value fits both runs — an
  all-reduce per layer pair and an all-gather/reduce-scatter per expert layer: 0.20–0.25 on a
  0.05 grid (``benchmarks/serving_defaults.py --param link_efficiency=...``), the rounder kept.
  The direction matches what is reported of PCIe-only nodes: GPUs without peer-to-peer
  (GeForce) stage collectives through host memory; vLLM turns its custom all-reduce off past
  two PCIe GPUs (``custom_all_reduce.py``); NCCL takes 344 µs for a 64 KB all-reduce over 8
  PCIe Blackwell (SM120) GPUs (sgl-project/sglang PR 32479) and all-reduce was 68.6 % of
  decode GPU time on 8 × A800 PCIe (vllm-project/vllm PR 50941); and two-GPU workstations
  often run each GPU at x8 (local-inference-lab/rtx6kpro issue 15), half the x16 bandwidth the
  library lists, which shows here as efficiency. It rests on one machine: calibrate
  ``link_efficiency`` (``kavier calibrate --fit ...,link_efficiency``) where a node's
  collectives are known to be faster (peer-to-peer with vLLM's custom all-reduce)."""


@dataclass(frozen=True)
class Link:
    """The link one collective runs over.

    Attributes
    ----------
    kind : str
        ``NVLink``, ``PCIe`` or ``network`` (a key of :data:`LINK_LATENCY_S` and
        :data:`LINK_EFFICIENCY`).
    name : str
        As the GPU library names it (``NVLink 4``, ``PCIe 5.0 x16``, ``network``).
    gbps : float
        Bandwidth per GPU and direction, GB/s.
    hops : int
        Latency steps of one collective: 1 over an NVSwitch, GPUs − 1 around a PCIe ring,
        nodes − 1 across the network.
    """

    kind: str
    name: str
    gbps: float
    hops: int

    @property
    def latency_s(self) -> float:
        """Measured time of one collective step over this kind of link, s."""
        return LINK_LATENCY_S[self.kind]

    @property
    def efficiency(self) -> float:
        """Achieved share of this kind of link's bandwidth in the engine's collectives."""
        return LINK_EFFICIENCY[self.kind]


def collective_link(gpu: GPUSpec, n_gpus: int, field: str = "tensor-parallel-size",
                    ring: int | None = None) -> Link:
    """The link a collective over ``n_gpus`` GPUs runs over, chosen by the node's topology.

    Within one node (``n_gpus <= gpus_per_node``, or no node size known) it is the GPU's
    interconnect (``interconnect_gbps``): NVLink when its name says so, else PCIe, ``ring − 1``
    latency steps around a PCIe ring of ``ring`` GPUs (default ``n_gpus``; the
    expert-parallel exchange runs between the data-parallel ranks only). Past one node, the
    ring's slowest hop is the network (``network_gbps`` per GPU), crossed ``nodes − 1``
    times.

    Raises
    ------
    InputError
        When the GPU entry lacks the bandwidth of the link the layout needs.
    """
    per_node = gpu.gpus_per_node
    if per_node is not None and n_gpus > per_node:
        if gpu.network_gbps is None:
            raise InputError(f"{n_gpus} GPUs span nodes of {per_node}, and the {gpu.name} entry "
                             "has no network_gbps for the link between them", field=field)
        return Link("network", "network", gpu.network_gbps, -(-n_gpus // per_node) - 1)
    if gpu.interconnect_gbps is None:
        raise InputError(f"the {gpu.name} entry has no interconnect_gbps for collectives over "
                         f"{n_gpus} GPUs", field=field)
    kind = "NVLink" if gpu.interconnect.startswith("NVLink") else "PCIe"
    return Link(kind, gpu.interconnect or kind, gpu.interconnect_gbps,
                1 if kind == "NVLink" else (ring or n_gpus) - 1)


def kv_bytes_per_token_per_rank(llm: LLMSpec, tensor_parallel_size: int = 1) -> float:
    """KV-cache bytes per token on one tensor-parallel rank: eq. 4.1 (GQA-aware) with
    ``n_kv_heads / TP`` heads, or one replicated head when ``TP > n_kv_heads`` (vLLM)."""
    heads = max(llm.n_kv_heads // tensor_parallel_size, 1)
    return llm.kv_bytes_per_token * heads / llm.n_kv_heads


def check_parallel(llm: LLMSpec, gpu: GPUSpec, tensor_parallel_size: int,
                   expert_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> None:
    """Reject a parallel layout vLLM would refuse, or one the GPU has no link for.

    Raises
    ------
    InputError
        When ``n_heads`` is not divisible by TP, KV heads neither divide nor are a multiple of
        it, expert parallelism is asked of a dense model or of other than data-parallel ranks
        of TP GPUs, or
        the GPU entry lacks the link a collective needs (:func:`collective_link`), or
        pipeline stages outnumber the layers or meet expert parallelism (not modelled).
    """
    tp, ep, pp = tensor_parallel_size, expert_parallel_size, pipeline_parallel_size
    if tp < 1 or ep < 1:
        raise InputError(f"must be >= 1, got {min(tp, ep)}", field="tensor-parallel-size")
    if not 1 <= pp <= llm.n_layers:
        raise InputError(f"{pp} pipeline stages for {llm.name}'s {llm.n_layers} layers; "
                         "every stage needs a layer", field="pipeline-parallel-size")
    if pp > 1 and ep > 1:
        raise InputError("pipeline parallelism with expert parallelism is not modelled",
                         field="pipeline-parallel-size")
    if pp > 1:
        collective_link(gpu, tp * pp, "pipeline-parallel-size")
    if ep > 1 and ep % tp:
        raise InputError(f"expert parallelism over {ep} GPUs with tensor parallel size {tp}: "
                         "the group is data-parallel ranks of TP GPUs each",
                         field="enable-expert-parallel")
    if ep > 1 and not llm.n_experts:
        raise InputError(f"expert parallelism over {ep} GPUs needs a mixture of experts "
                         f"({llm.name} is dense)", field="enable-expert-parallel")
    if ep > 1:
        collective_link(gpu, ep, "enable-expert-parallel")
    if tp == 1:
        return
    kv = llm.n_kv_heads
    if llm.n_heads % tp or (kv % tp and tp % kv):
        raise InputError(f"{llm.name} has {llm.n_heads} attention and {kv} KV heads, which "
                         f"{tp} ranks cannot split (vLLM requires divisibility)",
                         field="tensor-parallel-size")
    collective_link(gpu, tp)


def make_timing(name: str, llm: LLMSpec, gpu: GPUSpec, params: TimingParams | None = None,
                kv_cache: bool = True, tensor_parallel_size: int = 1,
                expert_parallel_size: int = 1,
                pipeline_parallel_size: int = 1) -> ThesisTiming | RooflineTiming:
    """Build the timing model called ``name`` (``thesis`` or ``roofline``), with ``params``
    or :func:`default_params`.

    Raises
    ------
    ValueError
        For an unknown model name.
    InputError
        For what the model cannot express: the thesis model with tensor parallelism or a
        mixture of experts (eqs. 4.2–4.6 have one GPU and dense weights), a mixture of experts
        without the KV cache, or a tensor-parallel degree :func:`check_parallel` rejects.
    """
    try:
        cls = TIMING_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown timing model '{name}'; known: {', '.join(TIMING_MODELS)}"
                         ) from None
    if name == "thesis" and (tensor_parallel_size != 1 or pipeline_parallel_size != 1
                             or llm.n_experts):
        raise InputError("the thesis timing model (eqs. 4.2-4.6) has one GPU and dense "
                         "weights; use --timing-model roofline for tensor or pipeline "
                         "parallelism or a mixture of experts", field="timing-model")
    if name == "thesis" and params is not None and params.compute_half_tokens:
        raise InputError("the thesis timing model (eq. 4.2) has one compute efficiency at "
                         "every size; compute_half_tokens needs --timing-model roofline",
                         field="compute_half_tokens")
    if (llm.n_experts or tensor_parallel_size > 1 or pipeline_parallel_size > 1
            ) and not kv_cache:
        raise InputError("a mixture of experts or tensor or pipeline parallelism without the "
                         "KV cache is not modelled", field="kv-cache")
    check_parallel(llm, gpu, tensor_parallel_size, expert_parallel_size,
                   pipeline_parallel_size)
    return cls(llm=llm, gpu=gpu, params=params or default_params(name, gpu),
               kv_cache=kv_cache,
               tensor_parallel_size=tensor_parallel_size,
               expert_parallel_size=expert_parallel_size,
               pipeline_parallel_size=pipeline_parallel_size)
