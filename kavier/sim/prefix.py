"""Prompt-prefix caching (thesis 4.4.2, Listing 4.2), in the thesis's exact-match form and in
vLLM's block form (whose blocks live in the GPU's KV pool, :mod:`kavier.sim.kvpool`).

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
    its logits), as in vLLM. Cached blocks are the free blocks of the GPU's one KV pool
    (:class:`~kavier.sim.kvpool.BlockPool`): what running requests need is what is left for
    the cache.

On an exact-match hit the engine still computes the prompt's last token (the first output
token needs its logits): the thesis's ``T_p = 0`` leaves out that forward pass.

Scopes: ``global`` (every request can hit every entry) or ``session`` (a request hits only
entries its own session stored; for blocks, vLLM's per-request ``cache_salt``). In the
exact-match policies the capacity ``max_cached_prompts`` is per scope unit (per session with
``session`` scope: the thesis's "caches of 8 and 16 prompts" per conversation, 6.6.1); in
``blocks`` the capacity is the GPU's KV pool, shared by all sessions.

Keys: token prefixes are compared as exact bytes. Block keys are chained 64-bit BLAKE2b hashes
of (key of the previous block, block content), so two requests share a key only if they share
the whole prefix; the chance of any false match among ``n`` distinct blocks is about
``n² / 2⁶⁵`` (1e-7 for a million blocks). They do not depend on Python's per-process hash
seed, so runs are reproducible across processes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from archive.errors import InputError
from archive.traces import PromptContent

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
    """

    policy: str = "none"
    min_tokens: int = 256
    max_cached_prompts: int | None = None
    scope: str = "global"
    block_size: int | None = None

    def to_dict(self) -> dict:
        """Plain dict (for the run summary)."""
        return asdict(self)


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
    """Prompt content, block keys and the exact-match cache's state.

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

    def block_keys(self, i: int, n_blocks: int) -> list[int]:
        """Chained keys of the first ``n_blocks`` full prompt blocks of request ``i``."""
        row, size = self.content.row(i), self.block_size
        unit = "" if self.sessions is None else str(self.sessions[i])
        key = stable_hash(b"scope" + unit.encode())
        keys = []
        for b in range(n_blocks):
            part = (row[b:b + 1] if self.content.kind == "hashes"
                    else row[b * size:(b + 1) * size])
            key = stable_hash(key.to_bytes(8, "little") + part.tobytes())
            keys.append(key)
        return keys

    def serve(self, i: int, n_in: int) -> int:
        """Look request ``i`` (its row in the trace) up in the exact-match cache, storing its
        prefix on a miss; returns the input tokens it reuses (all of them on a hit, else 0)."""
        return self._exact(i, n_in)

    def stats(self) -> dict:
        """Exact-match lookups, hits and evictions, for the run summary."""
        return {**self.config.to_dict(), "block_size": self.block_size,
                "lookups": self.lookups, "hits": self.hits, "evictions": self.evictions}


def stable_hash(data: bytes) -> int:
    """64-bit BLAKE2b of ``data`` as an int: the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def first_block(prefix: PrefixCache | None, block_size: int):
    """``f(i)`` → the bytes of request ``i``'s first prompt block (its first hash, for hashed
    content), or None when its prompt is empty; None without prompt content (the
    ``prefix-affinity`` router's key when there are no sessions)."""
    if prefix is None:
        return None
    content = prefix.content

    def key(i: int) -> bytes | None:
        row = content.row(i)
        part = row[:1] if content.kind == "hashes" else row[:block_size]
        return part.tobytes() if part.size else None

    return key
