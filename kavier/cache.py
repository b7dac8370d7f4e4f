"""Prompt-prefix caching (thesis 4.4.2, Listing 4.2), in the thesis's exact-match form and in
vLLM's block form.

Policies (``--prefix-cache-policy``):

``none``
    No prefix cache.
``prefill`` (thesis Listing 4.2)
    Exact match: a request with at least ``min_tokens`` input tokens looks up its first
    ``min_tokens`` tokens; on a hit its prefill is skipped entirely (``T_p = 0``), on a miss the
    prefix is stored. This is the thesis's (and OpenAI's "halfway") semantics; note that it
    credits the *whole* prompt as reused although only ``min_tokens`` of it are known to match,
    so it overstates the saving for prompts much longer than the prefix.
``full``
    As ``prefill``, but a hit also skips decode: the prompt-response cache of thesis Figure 3.3
    (the answer is served from the cache, no GPU work).
``blocks``
    vLLM's automatic prefix caching: the prompt is cut into blocks of ``block_size`` tokens; a
    block is reused only if it *and every block before it* are cached (the longest cached run
    of leading blocks); only the rest is prefilled, attending to the reused prefix. Only full
    blocks are cached, and at least the last prompt token is always recomputed (the engine needs
    its logits), as in vLLM. The pool holds ``capacity_blocks`` blocks (``None``: unlimited),
    evicted least recently used, the tail of a prompt before its head (vLLM frees a request's
    blocks in reverse order).

Scopes: ``global`` (every request can hit every entry) or ``session`` (a request hits only
entries its own session stored). In the exact-match policies the capacity
``max_cached_prompts`` is per scope unit (per session with ``session`` scope: the thesis's
"caches of 8 and 16 prompts" per conversation, 6.6.1); in ``blocks`` the capacity is the GPU's
KV pool, shared by all sessions.

Keys: token prefixes are compared as exact bytes. Block keys are chained 64-bit hashes of (key
of the previous block, block content), so two requests share a key only if they share the whole
prefix; the chance of any false match among ``n`` distinct blocks is about ``n² / 2⁶⁵``
(1e-7 for a million blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from archive.errors import InputError
from archive.traces import PromptContent
from kavier.library import GPUSpec, LLMSpec

POLICIES = ("none", "prefill", "full", "blocks")
SCOPES = ("global", "session")
VLLM_BLOCK_SIZE = 16
"""vLLM's default KV block size in tokens (``--block-size``), used for token-id traces."""
VLLM_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default ``--gpu-memory-utilization``: the share of GPU memory it may use."""


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Settings of the prefix cache (see the module docstring for the semantics).

    Attributes
    ----------
    policy : {"none", "prefill", "full", "blocks"}
    min_tokens : int
        Exact-match prefix length in tokens (Listing 4.2's ``PREFIX_CACHE_MIN_LEN``; 256 there,
        1,024 for OpenAI's prompt caching).
    max_cached_prompts : int or None
        Exact-match capacity per scope unit, LRU; None is unlimited.
    scope : {"global", "session"}
    block_size : int or None
        Tokens per block; None means the trace's own (``hash_ids``) or vLLM's 16 (token ids).
    capacity_blocks : int or None
        Block-pool capacity; None is unlimited.
    """

    policy: str = "none"
    min_tokens: int = 256
    max_cached_prompts: int | None = None
    scope: str = "global"
    block_size: int | None = None
    capacity_blocks: int | None = None

    def to_dict(self) -> dict:
        """Plain dict (for the run summary)."""
        return asdict(self)


def kv_pool_blocks(llm: LLMSpec, gpu: GPUSpec, block_size: int,
                   gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
                   activation_reserve_gib: float = 0.0) -> int:
    """Blocks of KV cache that fit next to the weights, sized the way vLLM sizes its pool.

    ``floor((memory × utilization − weights − activation reserve) / (block_size × KV bytes
    per token))`` with the GQA-aware bytes per token of eq. 4.1. vLLM measures the activation
    peak by profiling a forward pass at start-up (a few hundred MiB to a few GiB, depending on
    the model and ``max_num_batched_tokens``); here it is a parameter, 0 by default (an upper
    bound on the pool).

    Raises
    ------
    InputError
        When the weights and the reserve alone do not fit.
    """
    free = (gpu.memory_bytes * gpu_memory_utilization - llm.weight_bytes
            - activation_reserve_gib * 2**30)
    if free <= 0:
        raise InputError(f"{llm.name} weights ({llm.weight_bytes / 2**30:.1f} GiB) and "
                         f"{activation_reserve_gib:g} GiB of activations do not fit in "
                         f"{gpu_memory_utilization:.0%} of the {gpu.name}'s "
                         f"{gpu.memory_gib:g} GiB", field="gpu")
    return int(free // (block_size * llm.kv_bytes_per_token))


def block_size_for(requested: int | None, content: PromptContent) -> int:
    """Tokens per block: ``requested``, else the trace's own (hash ids), else vLLM's 16.

    Raises
    ------
    InputError
        For a size <= 0, hash ids of unknown block size, or a size that contradicts the
        trace's.
    """
    block = requested or content.block_size or (
        VLLM_BLOCK_SIZE if content.kind == "tokens" else None)
    if requested is not None and requested <= 0:
        raise InputError(f"block size must be > 0 tokens, got {requested}", field="block-size")
    if block is None:
        raise InputError("the trace's hash_ids do not say their block size; pass "
                         "--block-size (Mooncake: 512)", field="block-size")
    if content.kind == "hashes" and content.block_size and block != content.block_size:
        raise InputError(f"the trace's hash_ids cover {content.block_size}-token blocks, "
                         f"not {block}", field="block-size")
    return block


class PrefixCache:
    """The cache's state while requests are served in order.

    Parameters
    ----------
    config : PrefixCacheConfig
    content : PromptContent
        Token ids or block hashes of every request of the trace.
    sessions : array-like or None
        Session of every request (needed for ``session`` scope).

    Raises
    ------
    InputError
        For a policy that needs content the trace lacks, a block size <= 0, hash blocks
        whose size is unknown, or an exact-match prefix that is not a whole number of hash
        blocks.
    """

    def __init__(self, config: PrefixCacheConfig, content: PromptContent | None,
                 sessions=None) -> None:
        if config.policy not in POLICIES or config.scope not in SCOPES:
            raise InputError(f"unknown prefix-cache policy or scope: {config.policy}, "
                             f"{config.scope}", field="prefix-cache-policy")
        if content is None:
            raise InputError(f"prefix-cache policy '{config.policy}' needs the prompts' "
                             "content: an input_tokens (token ids) or hash_ids column",
                             field="prefix-cache-policy")
        if config.scope == "session" and sessions is None:
            raise InputError("session scope needs a session_id column in the trace",
                             field="cache-scope")
        block = block_size_for(config.block_size, content)
        if config.min_tokens < 1:
            raise InputError("prefix length must be >= 1 token", field="prefix-cache-min-tokens")
        if (config.policy in ("prefill", "full") and content.kind == "hashes"
                and config.min_tokens % block):
            raise InputError(f"with hash_ids the exact-match prefix must be a whole number of "
                             f"{block}-token blocks, got {config.min_tokens} tokens",
                             field="prefix-cache-min-tokens")
        self.config, self.content, self.block_size = config, content, block
        self.sessions = None if config.scope == "global" else np.asarray(sessions)
        self._lru: dict[object, OrderedDict] = {}
        self.lookups = self.hits = self.evictions = 0
        self.blocks_looked_up = self.blocks_hit = 0

    def _store(self, unit) -> OrderedDict:
        return self._lru.setdefault(unit, OrderedDict())

    def _evict(self, store: OrderedDict, capacity: int | None) -> None:
        while capacity is not None and len(store) > capacity:
            store.popitem(last=False)
            self.evictions += 1

    def _exact(self, i: int, n_in: int) -> int:
        """Listing 4.2 for request ``i``; returns reused input tokens (all of them on a hit)."""
        if n_in < self.config.min_tokens:
            return 0
        self.lookups += 1
        row = self.content.row(i)
        width = self.config.min_tokens
        if self.content.kind == "hashes":
            width //= self.block_size
        key = row[:width].tobytes()
        store = self._store(None if self.sessions is None else self.sessions[i])
        if key in store:
            store.move_to_end(key)
            self.hits += 1
            return n_in
        store[key] = None
        self._evict(store, self.config.max_cached_prompts)
        return 0

    def _block_keys(self, i: int, n_blocks: int) -> list[int]:
        row, size = self.content.row(i), self.block_size
        unit = None if self.sessions is None else self.sessions[i]
        keys, key = [], hash(("scope", unit))
        for b in range(n_blocks):
            part = row[b] if self.content.kind == "hashes" else row[b * size:(b + 1) * size]
            key = hash((key, int(part) if self.content.kind == "hashes" else part.tobytes()))
            keys.append(key)
        return keys

    def _blocks(self, i: int, n_in: int) -> int:
        """vLLM-style reuse for request ``i``; returns reused input tokens."""
        n_blocks = n_in // self.block_size
        if n_blocks == 0:
            return 0
        self.lookups += 1
        keys = self._block_keys(i, n_blocks)
        store = self._store(None)
        matched = 0
        while matched < n_blocks and keys[matched] in store:
            matched += 1
        self.blocks_looked_up += n_blocks
        self.blocks_hit += matched
        self.hits += matched > 0
        for key in reversed(keys):
            store[key] = None
            store.move_to_end(key)
        self._evict(store, self.config.capacity_blocks)
        return min(matched * self.block_size, n_in - 1)

    def serve(self, rows: np.ndarray, n_in: np.ndarray) -> np.ndarray:
        """Serve requests ``rows`` (indices into the trace) in this order.

        Returns
        -------
        ndarray of int64, shape (len(rows),)
            Input tokens reused from the cache per request (0 on a miss).
        """
        step = self._blocks if self.config.policy == "blocks" else self._exact
        return np.fromiter((step(int(i), int(n)) for i, n in zip(rows, n_in, strict=True)),
                           np.int64, len(rows))

    def stats(self, n_requests: int, n_input_tokens: int, reused_tokens: int) -> dict:
        """Hit ratios, evictions and reuse, for the run summary.

        ``hit_ratio_lookups = hits / lookups`` (requests long enough to look up);
        ``hit_ratio_requests = hits / all requests``; ``token_reuse_ratio = reused input
        tokens / all input tokens``; in ``blocks`` also ``block_hit_ratio``.
        """
        out = {**self.config.to_dict(), "block_size": self.block_size,
               "lookups": self.lookups, "hits": self.hits,
               "hit_ratio_lookups": self.hits / self.lookups if self.lookups else 0.0,
               "hit_ratio_requests": self.hits / n_requests if n_requests else 0.0,
               "evictions": self.evictions, "reused_tokens": int(reused_tokens),
               "token_reuse_ratio": reused_tokens / n_input_tokens if n_input_tokens else 0.0}
        if self.config.policy == "blocks":
            out["blocks_looked_up"] = self.blocks_looked_up
            out["blocks_hit"] = self.blocks_hit
            out["block_hit_ratio"] = (self.blocks_hit / self.blocks_looked_up
                                      if self.blocks_looked_up else 0.0)
        return out
