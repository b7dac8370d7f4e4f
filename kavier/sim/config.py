"""Engine settings: the one home of the simulator's defaults, each with its help text.

The CLI builds its engine options from these fields (:func:`kavier.cli`), so the help cannot
disagree with the code. Names follow vLLM's engine arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from archive.errors import InputError
from kavier.models.library import GPUSpec, LLMSpec
from kavier.models.timing import kv_bytes_per_token_per_rank

ROUTERS = ("round-robin", "least-outstanding", "prefix-affinity")
VLLM_BLOCK_SIZE = 16
"""vLLM's default KV block size in tokens (``--block-size``)."""


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class EngineConfig:
    """How every replica schedules (vLLM V1's scheduler) and how requests reach it.

    Attributes
    ----------
    replicas : int
        GPU replicas behind the router (each one engine and one KV pool).
    router : str
        One of :data:`ROUTERS`.
    tensor_parallel_size : int
        GPUs per replica that split every layer (vLLM's ``--tensor-parallel-size``): weights,
        heads and KV heads divided across them, two all-reduces per layer.
    pipeline_parallel_size : int
        Pipeline stages per replica (vLLM's ``--pipeline-parallel-size``): the layers split
        over ``PP`` groups of ``TP`` GPUs, up to ``PP`` batches in flight
        (:mod:`kavier.sim.engine`). A replica is ``TP × PP`` GPUs.
    enable_expert_parallel : bool
        Split a mixture of experts' experts over all ``replicas × tensor_parallel_size`` GPUs
        (vLLM's ``--enable-expert-parallel`` with data parallelism: the replicas are its
        data-parallel ranks; :attr:`expert_parallel_size`).
    async_scheduling : bool
        Schedule one step ahead, as vLLM's ``--async-scheduling`` (on by default since vLLM
        0.14): each step's batch is built while the step before runs, so a request reaching a
        busy engine joins the step after the next one, not the next (:mod:`kavier.sim.engine`).
        Off: vLLM's synchronous scheduler (before 0.14, and the thesis's vLLM 0.9.0).
    max_num_seqs : int
        Requests running at once per replica (1 is the thesis's one-request-at-a-time mode).
        Default 256, one for every GPU; ``vllm serve`` takes 256 on GPUs under 70 GiB and on
        the A100, 1,024 on the others (``EngineArgs.get_batch_defaults`` in
        ``vllm/engine/arg_utils.py``, vLLM 0.19; the A100 is excepted by name, vLLM PR 17885).
    max_num_batched_tokens : int
        Token budget of one engine step. Default 8,192, one for every GPU; ``vllm serve``
        takes 2,048 on GPUs under 70 GiB and on the A100, 8,192 on the others. The shipped
        profiles and figures were made with the simulator's pair, and the A10 sweep profile's
        closed-form prefill already holds what chunking at 2,048 cost the real engine; pass
        both options to match a deployment (docs/simulator.md, "The engine").
    chunked_prefill : bool or None
        Split prompts across steps when the budget runs out (vLLM V1: on); None: on with the
        KV cache, off without (:func:`resolve`).
    num_gpu_blocks : int or None
        KV blocks per replica; None sizes the pool from GPU memory (:func:`kv_pool_blocks`).
    gpu_memory_utilization : float
        Share of GPU memory for weights, activations and KV cache (vLLM's default 0.9).
    activation_reserve_gib : float
        GPU memory kept for activations, out of the KV pool, GiB (vLLM profiles it at
        start-up; 0 gives an upper bound on the pool).
    request_timeout_s : float or None
        Client timeout: a request not finished this long after it was sent is aborted, frees
        its blocks and counts as failed. None: no timeout.
    back_to_back : bool
        Closed loop with one client: each request is sent when the previous one finishes,
        ignoring the trace's arrival times (the thesis's sequential sweeps).
    """

    replicas: int = field(default=1, metadata=_help("GPU replicas behind the router.", min=1))
    router: str = field(default="least-outstanding", metadata=_help(
        "Replica choice for each request: round-robin, least-outstanding (fewest waiting or "
        "running) or prefix-affinity (same session or first prompt block → same replica).",
        choices=ROUTERS))
    tensor_parallel_size: int = field(default=1, metadata=_help(
        "GPUs per replica splitting every layer (weights, heads, KV heads; two all-reduces "
        "per layer over the GPU's interconnect, or the network past one node of the GPU "
        "library's gpus_per_node).", min=1))
    pipeline_parallel_size: int = field(default=1, metadata=_help(
        "Pipeline stages per replica: the layers split over PP groups of TP GPUs, up to PP "
        "batches in flight (a replica is TP × PP GPUs).", min=1))
    enable_expert_parallel: bool = field(default=False, metadata=_help(
        "Split the experts of a mixture of experts over all replicas × TP GPUs (vLLM's "
        "data + expert parallelism; the replicas are the data-parallel ranks)."))
    async_scheduling: bool = field(default=False, metadata=_help(
        "Schedule one step ahead, as vLLM's --async-scheduling (its default since 0.14): a "
        "request reaching a busy engine joins the step after the next one."))
    max_num_seqs: int = field(default=256, metadata=_help(
        "Requests running at once per replica (1: the thesis's one-at-a-time mode).", min=1))
    max_num_batched_tokens: int = field(default=8192, metadata=_help(
        "Token budget of one engine step.", min=1))
    chunked_prefill: bool | None = field(default=None, metadata=_help(
        "Split a prompt across steps when the token budget runs out [default: on with the "
        "KV cache]."))
    num_gpu_blocks: int | None = field(default=None, metadata=_help(
        "KV blocks per replica [default: from GPU memory × utilization − weights − "
        "activation reserve].", min=1))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help(
        "Share of GPU memory for weights, activations and KV cache (vLLM's default).",
        min=0.0, min_open=True, max=1.0))
    activation_reserve_gib: float = field(default=0.0, metadata=_help(
        "GPU memory kept for activations, out of the KV pool, GiB.", min=0.0))
    request_timeout_s: float | None = field(default=None, metadata=_help(
        "Client timeout, s: a request not finished this long after it was sent is aborted "
        "and counts as failed [default: none].", min=0.0, min_open=True))
    back_to_back: bool = field(default=False, metadata=_help(
        "Closed loop with one client: send each request when the previous one finishes "
        "(trace arrival times ignored)."))

    def __post_init__(self):
        if self.pipeline_parallel_size > 1 and self.async_scheduling:
            raise InputError("async scheduling with pipeline parallelism is not modelled",
                             field="async-scheduling")
        if self.pipeline_parallel_size > 1 and self.enable_expert_parallel:
            raise InputError("pipeline parallelism with expert parallelism is not modelled",
                             field="pipeline-parallel-size")
        if self.router not in ROUTERS:
            raise InputError(f"unknown router {self.router!r}; known: {', '.join(ROUTERS)}",
                             field="router")
        for f in fields(self):
            value, low = getattr(self, f.name), f.metadata.get("min")
            if value is None or low is None or isinstance(value, bool):
                continue
            if value < low or (f.metadata.get("min_open") and value == low) or (
                    "max" in f.metadata and value > f.metadata["max"]):
                raise InputError(f"{f.name} = {value} is out of range",
                                 field=flag(f.name)[2:])

    @property
    def expert_parallel_size(self) -> int:
        """GPUs the experts are split over: ``replicas × TP`` with expert parallelism, else
        1."""
        return self.replicas * self.tensor_parallel_size if self.enable_expert_parallel else 1

    def to_dict(self) -> dict:
        """Plain dict (for the run summary)."""
        return asdict(self)


def flag(name: str) -> str:
    """The command-line option of config field ``name``: ``request_timeout_s`` →
    ``--request-timeout`` (underscores to dashes, the unit suffix ``_s`` dropped)."""
    return "--" + name.replace("_", "-").removesuffix("-s")


def kv_pool_blocks(llm: LLMSpec, gpu: GPUSpec, block_size: int,
                   gpu_memory_utilization: float = 0.9,
                   activation_reserve_gib: float = 0.0, tensor_parallel_size: int = 1,
                   expert_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> int:
    """Blocks of KV cache that fit next to the weights, sized the way vLLM sizes its pool.

    ``floor((memory × utilization − weights / TP − activation reserve) / (block_size × KV
    bytes per token per rank))`` with the GQA-aware bytes per token of eq. 4.1 on one rank
    (``n_kv_heads / TP`` heads, at least one: vLLM's ``determine_available_memory`` then
    ``get_num_blocks``, per worker; every rank holds the same blocks, so the pool is the same
    count of blocks for the replica). Llama-3.1-70B on 4 × A100-80GB at 0.9: (72 GiB −
    32.9 GiB) / (16 × 80 KiB) = 32,029 blocks, 512 k tokens. With expert parallelism a GPU
    holds its share of the shared weights and ``E / EP`` whole experts
    (:meth:`LLMSpec.resident_weight_bytes`).
    With ``PP`` pipeline stages a GPU holds the weights and the KV of its stage's layers,
    ``ceil(L / PP) / L`` of them on the largest stage (vLLM sizes the pool by the tightest
    worker), so both terms shrink by that share.

    Raises
    ------
    InputError
        When the weights and the reserve alone do not fit, or not one block does.
    """
    share = -(-llm.n_layers // pipeline_parallel_size) / llm.n_layers
    weights = llm.resident_weight_bytes(tensor_parallel_size, expert_parallel_size) * share
    free = gpu.memory_bytes * gpu_memory_utilization - weights - activation_reserve_gib * 2**30
    per_token = kv_bytes_per_token_per_rank(llm, tensor_parallel_size) * share
    blocks = int(free // (block_size * per_token)) if free > 0 else 0
    if blocks < 1:
        on = (f" per GPU with tensor × pipeline parallel size {tensor_parallel_size} × "
              f"{pipeline_parallel_size}"
              if tensor_parallel_size * pipeline_parallel_size > 1 else "")
        raise InputError(f"{llm.name} weights ({weights / 2**30:.1f} GiB{on}) and "
                         f"{activation_reserve_gib:g} GiB of activations leave no KV block in "
                         f"{gpu_memory_utilization:.0%} of the {gpu.name}'s "
                         f"{gpu.memory_gib:g} GiB", field="gpu")
    return blocks


def resolve(config: EngineConfig, kv_cache: bool) -> EngineConfig:
    """``config`` with ``chunked_prefill`` decided (on with the KV cache, off without)."""
    if config.chunked_prefill is not None:
        return config
    return replace(config, chunked_prefill=kv_cache)
