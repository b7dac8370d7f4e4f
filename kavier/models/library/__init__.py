"""LLM and GPU library: hardware and model descriptions as data (Vidur's habit, thesis 5.4).

The bundled entries live in ``llms.toml`` and ``gpus.toml`` beside this module, each figure with
its source. Users add entries from a TOML or JSON file of the same shape, and an LLM can be
described straight from its Hugging Face ``config.json`` with :func:`llm_from_hf_config`.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from dataclasses import MISSING, dataclass, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np

from archive.errors import InputError


@dataclass(frozen=True)
class LLMSpec:
    """Architecture of a decoder-only transformer.

    Attributes
    ----------
    name : str
    params : int
        Total parameter count, embeddings and LM head included.
    n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, intermediate_dim, vocab_size : int
        Shapes as in the model's Hugging Face ``config.json``; ``n_kv_heads < n_heads`` is
        grouped-query attention, ``n_kv_heads == 1`` multi-query attention. For a
        mixture-of-experts model ``intermediate_dim`` is one expert's width
        (``moe_intermediate_size``, Mixtral's ``intermediate_size``).
    n_experts, n_experts_per_token : int
        Mixture of experts: routed experts per layer (``num_local_experts`` /
        ``num_experts``, DeepSeek's ``n_routed_experts``) and experts each token is routed to
        (``num_experts_per_tok``); 0 for a dense model. Shared experts, which every token
        uses, are dense weights: they count in ``params`` and in every pass.
    n_dense_layers : int
        Mixture of experts: layers whose MLP is dense rather than the expert layer (DeepSeek's
        ``first_k_dense_replace``, Qwen-MoE's ``mlp_only_layers`` and ``decoder_sparse_step``);
        0, the default, when every layer's MLP is the expert layer (Mixtral, Qwen3-MoE).
    bytes_per_param : float
        Bytes per weight, and per KV-cache element unless ``kv_cache_bytes_per_element``
        says otherwise (2 for FP16/BF16).
    kv_cache_bytes_per_element : float or None
        Bytes per KV-cache element when the cache is kept in another dtype than the weights
        (vLLM's ``--kv-cache-dtype fp8``: 1; :func:`with_kv_cache_dtype`); None: as the
        weights.
    tie_word_embeddings : bool
        True when the LM head shares the input embedding matrix.
    source : str
        Where the figures come from.
    aliases : tuple of str
        Other names the entry answers to (Hugging Face model ids).
    """

    name: str
    params: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    intermediate_dim: int
    vocab_size: int
    bytes_per_param: float = 2.0
    tie_word_embeddings: bool = False
    n_experts: int = 0
    n_experts_per_token: int = 0
    n_dense_layers: int = 0
    kv_cache_bytes_per_element: float | None = None
    source: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.n_experts > 0) != (self.n_experts_per_token > 0) or (
                self.n_experts_per_token > self.n_experts):
            raise InputError(f"entry '{self.name}': n_experts_per_token must be in "
                             f"[1, n_experts] for a mixture of experts and both 0 for a dense "
                             f"model (got {self.n_experts_per_token} of {self.n_experts})",
                             field="n_experts_per_token")
        if self.n_dense_layers and not 0 < self.n_dense_layers < self.n_layers * bool(
                self.n_experts):
            raise InputError(f"entry '{self.name}': n_dense_layers must be fewer than its "
                             f"{self.n_layers} layers, and only a mixture of experts has them "
                             f"(got {self.n_dense_layers})", field="n_dense_layers")

    @property
    def expert_params(self) -> int:
        """Parameters of one expert in one layer: ``3 × hidden × intermediate`` (gate, up and
        down projections of a SwiGLU MLP); 0 for a dense model."""
        return 3 * self.hidden_dim * self.intermediate_dim if self.n_experts else 0

    @property
    def n_expert_layers(self) -> int:
        """Layers whose MLP is the expert layer, ``L_e = n_layers − n_dense_layers``; 0 for a
        dense model."""
        return self.n_layers - self.n_dense_layers if self.n_experts else 0

    @property
    def inactive_params(self) -> int:
        """Parameters a token does not use: ``L_e × (E − k)`` experts; 0 for a dense model."""
        return (self.n_expert_layers * (self.n_experts - self.n_experts_per_token)
                * self.expert_params)

    @property
    def active_params(self) -> int:
        """Parameters used per token: all for a dense model, ``params − L_e·(E − k)·expert``
        for a mixture of experts (Qwen3-30B-A3B: 30.5 B total, 3.3 B active)."""
        return self.params - self.inactive_params

    def experts_touched(self, n_tokens) -> np.ndarray:
        """Expected distinct experts per layer that ``n_tokens`` tokens are routed to,
        ``E·(1 − (1 − k/E)^t)``, under the assumption of uniform, independent routing (real
        routers are skewed, which touches fewer); ``E`` for a dense model's one MLP."""
        t = np.asarray(n_tokens, np.float64)
        if not self.n_experts:
            return np.ones_like(t)
        e, k = self.n_experts, self.n_experts_per_token
        return e * (1.0 - (1.0 - k / e) ** t)

    @property
    def routed_params(self) -> int:
        """Parameters of all routed experts, ``L_e × E × expert``; 0 for a dense model."""
        return self.n_expert_layers * self.n_experts * self.expert_params

    def expert_split(self, tensor_parallel_size: int = 1, expert_parallel_size: int = 1) -> float:
        """How many parts the routed experts are divided into, as the busiest GPU sees it: with
        expert parallelism over ``EP`` GPUs each holds whole experts, ``E // EP`` of them and
        one more on the first ``E mod EP`` (vLLM's ``determine_expert_map``), so the busiest
        holds ``ceil(E / EP)`` and the split is ``E / ceil(E / EP)`` (``EP`` when it divides
        ``E``); without it every GPU holds a ``1 / TP`` slice of every expert, as vLLM's
        ``FusedMoE`` shards them: ``TP``."""
        ep = expert_parallel_size
        if ep <= 1 or not self.n_experts:
            return float(tensor_parallel_size)
        return self.n_experts / -(-self.n_experts // ep)

    def weight_bytes_read(self, expert_tokens, tensor_parallel_size: int = 1,
                          expert_parallel_size: int = 1) -> np.ndarray:
        """Weight bytes one GPU streams in a forward pass: every weight but the untied input
        embedding (:attr:`streamed_weight_bytes`) ``/ TP`` for a dense model; for a mixture of
        experts its share of the shared weights, ``/ TP``, plus its experts that the expert
        layer's tokens touch, ``L_e·touched(T)·expert / split``
        (:meth:`experts_touched`, :meth:`expert_split`).

        ``expert_tokens`` (``T``, any shape) are the tokens the GPU's expert layer sees: the
        pass's own without expert parallelism; with it those of every data-parallel rank of
        the group, which the expert layer gathers (vLLM's ``allgather_reducescatter``
        backend), so ``T = DP × n`` when the ranks are balanced. With ``EP = TP`` and one
        data-parallel rank the tokens are already on every GPU: ``T = n``."""
        tp = tensor_parallel_size
        if not self.n_experts:
            return np.full(np.shape(expert_tokens), self.streamed_weight_bytes / tp)
        return (self._shared_streamed_params / tp
                + self._touched_params(expert_tokens, tp, expert_parallel_size)
                ) * self.bytes_per_param

    @property
    def _shared_streamed_params(self) -> int:
        return self.params - self.gathered_params - self.routed_params

    def _touched_params(self, expert_tokens, tensor_parallel_size, expert_parallel_size):
        """One GPU's parameters of the distinct experts ``expert_tokens`` touch."""
        touched = self.experts_touched(expert_tokens)
        split = self.expert_split(tensor_parallel_size, expert_parallel_size)
        return self.n_expert_layers * self.expert_params * touched / split

    def gemm_params(self, expert_tokens, tensor_parallel_size: int = 1,
                    expert_parallel_size: int = 1) -> np.ndarray:
        """Parameters of the distinct weight matrices one GPU multiplies in a forward pass
        (each counted once, however many tokens it sees), LM head and embedding aside:
        :attr:`matmul_params` ``/ TP`` for a dense model; for a mixture of experts the shared
        matmul weights ``/ TP`` plus the GPU's experts touched (as :meth:`weight_bytes_read`,
        same ``expert_tokens``), ``(matmul_params − L_e·k·expert) / TP +
        L_e·touched(T)·expert / split`` (``touched = k`` for one token on one GPU: the
        active weights)."""
        tp = tensor_parallel_size
        if not self.n_experts:
            return np.full(np.shape(expert_tokens), self.matmul_params / tp)
        return (self.shared_matmul_params / tp
                + self._touched_params(expert_tokens, tp, expert_parallel_size))

    @property
    def shared_matmul_params(self) -> int:
        """:attr:`matmul_params` but the ``k`` routed experts a token uses, ``matmul_params −
        L_e·k·expert``: the matmul weights every token of a pass multiplies on its own GPU
        (attention projections, router, shared experts, dense layers); all of them for a dense
        model."""
        return (self.matmul_params
                - self.n_expert_layers * self.n_experts_per_token * self.expert_params)

    def resident_weight_bytes(self, tensor_parallel_size: int = 1,
                              expert_parallel_size: int = 1) -> float:
        """Weight bytes one GPU holds: ``params / TP`` for a dense model; for a mixture of
        experts the shared weights ``/ TP`` plus the routed experts ``/ split``
        (:meth:`expert_split`: ``ceil(E / EP)`` whole experts per layer on the busiest GPU
        with expert parallelism)."""
        tp = tensor_parallel_size
        split = self.expert_split(tp, expert_parallel_size)
        return ((self.params - self.routed_params) / tp
                + self.routed_params / split) * self.bytes_per_param

    @property
    def weight_bytes(self) -> float:
        """Bytes of all the weights, ``params × bytes_per_param``: what a GPU holds, and what
        thesis eq. 4.6 streams per token."""
        return self.params * self.bytes_per_param

    @property
    def gathered_params(self) -> int:
        """Parameters a forward pass gathers rows of instead of streaming them whole: the input
        embedding (``vocab × hidden``), whose lookup reads only the ``n`` rows of the pass's
        tokens (vLLM's ``VocabParallelEmbedding``, an index into the table). 0 when the LM
        head shares the matrix, as the LM head streams all of it for the logits."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_dim

    @property
    def streamed_weight_bytes(self) -> float:
        """Bytes of weights a dense forward pass streams from DRAM: every weight but the
        untied input embedding (:attr:`gathered_params`), ``(params − gathered) × bytes``. The
        embedding rows a pass gathers (``n × hidden × bytes``) are left out: a few MB against
        the GBs streamed. Llama-3.1-8B streams 15.0 GB of its 16.1 GB."""
        return (self.params - self.gathered_params) * self.bytes_per_param

    @property
    def embedding_params(self) -> int:
        """Parameters in the input embedding and, when untied, the LM head (``vocab × hidden``)."""
        copies = 1 if self.tie_word_embeddings else 2
        return copies * self.vocab_size * self.hidden_dim

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply for every token: all active ones but
        embeddings (a mixture of experts counts the ``k`` experts a token is routed to).

        The LM head is counted separately (:attr:`lm_head_flops`) because an inference engine
        computes logits only for the positions it samples from.
        """
        return self.active_params - self.embedding_params

    @property
    def lm_head_flops(self) -> float:
        """FLOPs of one logits computation: ``2 × vocab × hidden``."""
        return 2.0 * self.vocab_size * self.hidden_dim

    @property
    def attention_dim(self) -> int:
        """Query width ``n_heads × head_dim`` (``d_attn`` of Kaplan et al. 2020)."""
        return self.n_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token, GQA-aware: ``2 × L × n_kv_heads × head_dim × bytes``.

        This is thesis equation 4.1 per token with the number of *KV* heads. The thesis writes
        H, the number of attention heads, which overstates grouped-query models: 4× for
        Llama-3-8B (32 query heads, 8 KV heads), 48× for multi-query Granite-20B.
        """
        return 2.0 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_element_bytes

    def kv_bytes_per_token_thesis(self) -> float:
        """Thesis equation 4.1 per token as written, with all attention heads (for comparison)."""
        return 2.0 * self.n_layers * self.n_heads * self.head_dim * self.kv_element_bytes

    @property
    def kv_element_bytes(self) -> float:
        """Bytes per KV-cache element: ``kv_cache_bytes_per_element``, else the weights'."""
        if self.kv_cache_bytes_per_element is None:
            return self.bytes_per_param
        return self.kv_cache_bytes_per_element


GEMM_SHARE_UNMEASURED = 0.80
"""The share of its dense BF16 peak a GPU without a ``gemm_tflops`` entry is assumed to reach in
a large GEMM: the median over the library's measured entries (A100-80GB 0.85, H100-SXM 0.80,
H200 0.80, B200 0.75, L40S 0.74, A6000 0.80, RTX 3090 1.08, RTX 4090 1.00, RTX PRO 6000
0.78)."""


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator, from its vendor data sheet.

    Attributes
    ----------
    name, vendor : str
    memory_gib : float
        On-board DRAM, GiB.
    memory_bandwidth_gbps : float
        Peak DRAM bandwidth, GB/s (1e9 bytes/s).
    fp16_tflops : float
        Dense FP16/BF16 tensor-core peak, TFLOP/s (1e12 FLOP/s); never the 2:4-sparse figure.
    gemm_tflops : float or None
        Measured dense BF16 GEMM throughput, TFLOP/s: the best large square matmul PyTorch
        reaches on the board (published benchmark, named in ``source``). None when no
        measurement is known; :attr:`gemm_share` then assumes the library's median.
    idle_power_w, max_power_w : float
        Power at idle and at full load (board power limit), W.
    boost_clock_mhz : float or None
        Maximum boost (SM) clock, MHz; OpenDC's unit of GPU capacity.
    source : str
        Where the figures come from.
    interconnect : str
        The link tensor-parallel collectives run over between GPUs of one node (``NVLink 4``,
        ``PCIe 4.0 x16``).
    interconnect_gbps : float or None
        Its bandwidth per GPU and direction, GB/s (the figure a ring all-reduce's bus
        bandwidth is measured against); None when unknown (no tensor parallelism then).
    gpus_per_node : int or None
        GPUs in one node of the board's reference server (8 on an HGX/DGX board); a
        collective over more GPUs crosses nodes and runs over the network. None: no node
        size is known, and every layout is taken to fit one node.
    network_gbps : float or None
        Inter-node bandwidth per GPU and direction, GB/s (the reference server's NICs
        divided over its GPUs); None when unknown (no layout across nodes then).
    aliases : tuple of str
        Other names the entry answers to: the names ``nvidia-smi --query-gpu=name`` prints.
    """

    name: str
    vendor: str
    memory_gib: float
    memory_bandwidth_gbps: float
    fp16_tflops: float
    idle_power_w: float
    max_power_w: float
    boost_clock_mhz: float | None = None
    gemm_tflops: float | None = None
    interconnect: str = ""
    interconnect_gbps: float | None = None
    gpus_per_node: int | None = None
    network_gbps: float | None = None
    source: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> float:
        """On-board memory in bytes."""
        return self.memory_gib * 2**30

    @property
    def flops_per_s(self) -> float:
        """Dense FP16 peak in FLOP/s."""
        return self.fp16_tflops * 1e12

    @property
    def gemm_share(self) -> float:
        """Measured GEMM throughput as a share of the dense peak, ``gemm_tflops /
        fp16_tflops``; :data:`GEMM_SHARE_UNMEASURED` without a measurement."""
        if self.gemm_tflops is None:
            return GEMM_SHARE_UNMEASURED
        return self.gemm_tflops / self.fp16_tflops

    @property
    def bytes_per_s(self) -> float:
        """Peak DRAM bandwidth in bytes/s."""
        return self.memory_bandwidth_gbps * 1e9


def _build(cls: type, name: str, entry: dict, path: str) -> LLMSpec | GPUSpec:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise InputError(f"unknown field(s) {unknown} in entry '{name}'", path=path)
    required = {f.name for f in fields(cls) if f.default is MISSING} - {"name"}
    missing = sorted(k for k in required if k not in entry)
    if missing:
        raise InputError(f"entry '{name}' lacks field(s) {missing}", path=path)
    aliases = entry.pop("aliases", [])
    if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise InputError(f"entry '{name}': aliases must be a list of names", path=path,
                         field="aliases")
    for key, value in entry.items():
        if key not in ("source", "vendor", "tie_word_embeddings", "interconnect") and (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0      # TOML reads nan and inf literals
        ):
            raise InputError(f"entry '{name}': must be a positive finite number, got "
                             f"{value!r}", path=path, field=key)
    return cls(name=name, aliases=tuple(aliases), **entry)


def _from_hf_entry(name: str, entry: dict, path: Path) -> LLMSpec:
    """A library entry ``{hf_config, aliases?, source?}``: the config's shapes under ``name``."""
    extra = sorted(set(entry) - {"hf_config", "aliases", "source"})
    if extra:
        raise InputError(f"entry '{name}': with hf_config the shapes come from the config; "
                         f"remove {extra}", path=path, field="hf_config")
    config = entry["hf_config"]
    if not isinstance(config, str):
        raise InputError(f"entry '{name}': hf_config must be a path", path=path,
                         field="hf_config")
    aliases = entry.get("aliases", [])
    if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
        raise InputError(f"entry '{name}': aliases must be a list of names", path=path,
                         field="aliases")
    spec = llm_from_hf_config(path.parent / config, name)
    return replace(spec, aliases=tuple(aliases), source=str(entry.get("source", spec.source)))


def _read_table_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read library file: {exc.strerror}", path=path) from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}",
                         path=path) from None


class Library:
    """A name → spec mapping for one kind of spec (LLMs or GPUs).

    Lookup is case-insensitive; an unknown name raises :class:`InputError` listing the known
    names.
    """

    def __init__(self, cls: type, kind: str) -> None:
        self.cls = cls
        self.kind = kind
        self._entries: dict[str, LLMSpec | GPUSpec] = {}

    def load(self, path: str | Path) -> Library:
        """Add (or override) entries from a TOML or JSON file of ``{name: {field: value}}``.

        An LLM entry may instead name a Hugging Face ``config.json`` (``hf_config``, relative
        to the file), with only ``aliases`` and ``source`` beside it: its shapes come from
        :func:`llm_from_hf_config`, which refuses what the timing model does not model.
        """
        for name, entry in _read_table_file(path).items():
            if not isinstance(entry, dict):
                raise InputError(f"entry '{name}' must be a table of fields", path=path)
            if self.cls is LLMSpec and "hf_config" in entry:
                self.add(_from_hf_entry(name, entry, Path(path)))
            else:
                self.add(_build(self.cls, name, entry, str(path)))
        return self

    def add(self, spec: LLMSpec | GPUSpec) -> None:
        """Add one spec, replacing any entry of the same name."""
        self._entries[spec.name] = spec

    def names(self) -> list[str]:
        """Known names, in library order."""
        return list(self._entries)

    def get(self, name: str) -> LLMSpec | GPUSpec:
        """The spec called ``name`` or one of its aliases (case-insensitive): ``RTX-4090``,
        ``NVIDIA GeForce RTX 4090`` (as ``nvidia-smi`` prints it).

        Raises
        ------
        InputError
            For an unknown name, with the closest known names ("did you mean").
        """
        wanted = name.strip().lower()
        for key, spec in self._entries.items():
            if wanted in (key.lower(), *(a.lower() for a in spec.aliases)):
                return spec
        names = {n.lower(): n for spec in self._entries.values()
                 for n in (spec.name, *spec.aliases)}
        close = [names[n] for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        add = ("add it with --llm-library FILE (a TOML entry, or hf_config = its Hugging Face "
               "config.json)" if self.cls is LLMSpec else "add it with --gpu-library FILE")
        raise InputError(f"unknown {self.kind} '{name}'; {hint}{add}; known: "
                         f"{', '.join(self.names())}", field=f"--{self.kind}")


KV_CACHE_DTYPES = {"auto": None, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}
"""vLLM's ``--kv-cache-dtype`` values the simulator models, → bytes per KV-cache element
(``auto``: the model's dtype). An FP8 cache halves the KV pool's bytes per token, so twice
the tokens fit, and halves the KV traffic of attention; attention's FLOPs stay (vLLM's
kernels dequantize to 16 bits; ``vllm/config/cache.py``). Scaled or packed formats (per-token
-head int8 or FP8 scales, NVFP4) are not among them."""


def with_kv_cache_dtype(llm: LLMSpec, dtype: str | None, path: str | Path | None = None,
                        field: str = "kv-cache-dtype") -> LLMSpec:
    """``llm`` with its KV cache kept in vLLM's ``--kv-cache-dtype`` ``dtype`` (None or
    ``auto``: unchanged).

    Raises
    ------
    InputError
        For a dtype not in :data:`KV_CACHE_DTYPES`, naming ``path`` and ``field`` (the
        option, or a serving run's ``engine.kv_cache_dtype``).
    """
    key = "auto" if dtype is None else str(dtype).lower()
    if key not in KV_CACHE_DTYPES:
        raise InputError(f"kv_cache_dtype {dtype!r} is not modelled; modelled: "
                         f"{', '.join(KV_CACHE_DTYPES)}", path=path, field=field)
    if KV_CACHE_DTYPES[key] is None:
        return llm
    return replace(llm, kv_cache_bytes_per_element=KV_CACHE_DTYPES[key])


def _bundled(filename: str) -> Path:
    return Path(str(resources.files("kavier.models.library") / filename))


def llm_library(extra: str | Path | None = None) -> Library:
    """The bundled LLM library, plus entries from ``extra`` (TOML/JSON) when given."""
    lib = Library(LLMSpec, "llm").load(_bundled("llms.toml"))
    return lib.load(extra) if extra else lib


def gpu_library(extra: str | Path | None = None) -> Library:
    """The bundled GPU library, plus entries from ``extra`` (TOML/JSON) when given."""
    lib = Library(GPUSpec, "gpu").load(_bundled("gpus.toml"))
    return lib.load(extra) if extra else lib


_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "int8": 1}


_UNMODELLED = (
    ("quantization_config", lambda v: v, "quantized weights"),
    ("kv_lora_rank", lambda v: v, "multi-head latent attention (MLA)"),
    ("q_lora_rank", lambda v: v, "multi-head latent attention (MLA)"),
    ("linear_num_value_heads", lambda v: v, "linear attention"),
    ("layer_types", lambda v: v and any("linear" in str(t) or "sliding" in str(t) for t in v),
     "linear or sliding-window attention layers"),
    ("attention_chunk_size", lambda v: v, "chunked local attention layers"),
)
"""config.json fields of architecture features the timing model does not model: a model that
has one is refused rather than simulated as a different model."""


def _refuse_unmodelled(config: dict, path) -> None:
    for key, present, what in _UNMODELLED:
        if key in config and present(config[key]):
            raise InputError(f"{what} are not modelled; this model would be simulated as a "
                             "different one", path=path, field=key)
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        raise InputError("sliding-window attention is not modelled; this model would be "
                         "simulated as a different one", path=path, field="sliding_window")


def _count(config: dict, key: str, default: int, path, least: int = 0) -> int:
    """``config[key]`` as a whole number at least ``least`` (``default`` when absent)."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"must be a whole number of at least {least}, got {value!r}",
                         path=path, field=key)
    return value


def _expert_layers(config: dict, layers: int, path) -> int:
    """How many of the ``layers`` have the expert MLP, by the conventions of the configs that
    interleave dense layers: Qwen-MoE's ``decoder_sparse_step`` (layer ``i`` is sparse when
    ``(i + 1) % step == 0``) and ``mlp_only_layers`` (dense), DeepSeek's
    ``first_k_dense_replace`` (the first ``k`` dense) and ``moe_layer_freq`` (``i % freq ==
    0``), Llama-4's ``interleave_moe_layer_step`` (as Qwen's step); a layer is an expert layer
    when every rule present says so (the Hugging Face modelling files of each)."""
    step = _count(config, "decoder_sparse_step", 1, path, 1)
    interleave = _count(config, "interleave_moe_layer_step", 1, path, 1)
    first_dense = _count(config, "first_k_dense_replace", 0, path)
    freq = _count(config, "moe_layer_freq", 1, path, 1)
    dense = config.get("mlp_only_layers") or []
    if not (isinstance(dense, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in dense)):
        raise InputError(f"must be a list of layer indices in [0, {layers})", path=path,
                         field="mlp_only_layers")
    sparse = sum((i + 1) % step == 0 and (i + 1) % interleave == 0 and i >= first_dense
                 and i % freq == 0 and i not in dense for i in range(layers))
    if not sparse:
        rules = [k for k in ("decoder_sparse_step", "interleave_moe_layer_step",
                             "first_k_dense_replace", "moe_layer_freq", "mlp_only_layers")
                 if config.get(k)]
        raise InputError("experts are configured but these fields leave no layer with them",
                         path=path, field=", ".join(rules))
    return sparse


def _shared_expert_params(config: dict, hidden: int, expert_width: int, path) -> int:
    """Parameters of the shared experts of one expert layer, which every token uses: Qwen-MoE's
    one shared expert of ``shared_expert_intermediate_size`` and its gate (``3·h·S + h``),
    DeepSeek's ``n_shared_experts`` of the routed experts' width (``3·h·N·moe_width``)."""
    qwen = _count(config, "shared_expert_intermediate_size", 0, path)
    deepseek = _count(config, "n_shared_experts", 0, path)
    return (3 * hidden * qwen + hidden if qwen else 0) + 3 * hidden * deepseek * expert_width


def _first(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def llm_from_hf_config(config: dict | str | Path, name: str | None = None) -> LLMSpec:
    """Describe an LLM from its Hugging Face ``config.json`` (a dict or a path to the file).

    Understands the key spellings of Llama/Mistral/Qwen (``num_hidden_layers``,
    ``num_key_value_heads``), GPT-2/BigCode (``n_layer``, ``n_head``, ``n_embd``,
    ``multi_query``), MPT (``d_model``, ``expansion_ratio``) and OPT (``ffn_dim``).
    The parameter count is computed from the shapes: embeddings (``vocab × hidden``, twice when
    untied), attention projections (``hidden × (n_heads + 2·n_kv_heads + n_heads) × head_dim``)
    and the MLP (three matrices for gated SiLU MLPs, two otherwise); norms and biases are
    ignored (< 0.1 % of the total). Mixtures of experts (Mixtral ``num_local_experts``,
    Qwen-MoE ``num_experts`` and ``moe_intermediate_size``, DeepSeek ``n_routed_experts``;
    ``num_experts_per_tok``) count every expert and the router in ``params``, and shared
    experts (Qwen-MoE ``shared_expert_intermediate_size``, DeepSeek ``n_shared_experts``) and
    dense layers among the expert layers (:func:`_expert_layers`; their MLP of
    ``intermediate_size``) as weights every token uses; :attr:`LLMSpec.active_params` is what
    a token uses (Qwen1.5-MoE-A2.7B: 14.3 B and 2.7 B, DeepSeekMoE-16B: 16.4 B and 2.8 B,
    their model cards).

    Raises
    ------
    InputError
        When a required shape is missing, or the config has an architecture feature the timing
        model does not model (quantization, MLA, linear, sliding-window or chunked attention),
        or a malformed expert-layer field, naming the field.
    """
    path = None
    if not isinstance(config, dict):
        path = Path(config)
        config = _read_table_file(path.with_suffix(".json") if path.suffix != ".json" else path)
    layers = _first(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head", "n_heads")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    vocab = _first(config, "vocab_size")
    for key, value in (("num_hidden_layers", layers), ("num_attention_heads", heads),
                       ("hidden_size", hidden), ("vocab_size", vocab)):
        if value is None:
            raise InputError("config.json lacks this shape", path=path, field=key)
    kv_heads = 1 if config.get("multi_query") else _first(
        config, "num_key_value_heads", "n_kv_heads", default=heads)
    head_dim = _first(config, "head_dim", default=hidden // heads)
    expansion = config.get("expansion_ratio", 4)
    inter = _first(config, "intermediate_size", "ffn_dim", "n_inner", default=expansion * hidden)
    tied = bool(config.get("tie_word_embeddings", True))
    gated = config.get("hidden_act", config.get("activation_function", "")) in (
        "silu", "swiglu", "swish")
    _refuse_unmodelled(config, path)
    experts = int(_first(config, "num_local_experts", "num_experts", "n_routed_experts",
                         default=0) or 0)
    per_token = int(config.get("num_experts_per_tok") or 0) if experts else 0
    attn = hidden * (2 * heads + 2 * kv_heads) * head_dim
    dense_mlp = (3 if gated else 2) * hidden * inter
    sparse, dense_layers = 0, 0
    if experts:
        sparse = _expert_layers(config, int(layers), path)
        dense_layers = int(layers) - sparse
        inter = _first(config, "moe_intermediate_size", default=inter)
    expert_mlp = (experts * 3 * hidden * inter + hidden * experts
                  + _shared_expert_params(config, hidden, inter, path)) if experts else 0
    mlp = sparse * expert_mlp + (layers - sparse) * dense_mlp
    params = layers * attn + mlp + (1 if tied else 2) * vocab * hidden
    dtype = str(config.get("torch_dtype", "bfloat16"))
    return LLMSpec(
        name=name or config.get("_name_or_path") or config.get("model_type", "custom"),
        params=int(params), n_layers=int(layers), n_heads=int(heads), n_kv_heads=int(kv_heads),
        head_dim=int(head_dim), hidden_dim=int(hidden), intermediate_dim=int(inter),
        vocab_size=int(vocab), bytes_per_param=_DTYPE_BYTES.get(dtype, 2),
        n_experts=experts, n_experts_per_token=per_token, n_dense_layers=dense_layers,
        tie_word_embeddings=tied, source=f"Hugging Face config.json{f' ({path})' if path else ''}",
    )
