"""One KV block pool per GPU, shared by running requests and cached prefix blocks.

This is vLLM V1's block pool (``vllm/v1/core/block_pool.py`` and ``kv_cache_manager.py``)
reduced to what timing depends on:

* The pool holds ``num_blocks`` blocks of ``block_size`` tokens. A running request holds the
  blocks of every token it has computed.
* A full prompt block is *cached*: it is known by a chained hash of its content and all blocks
  before it, and a later request whose prompt starts with the same blocks reuses it instead of
  recomputing it. Blocks have reference counts; a block nobody holds any more stays cached and
  findable, and counts as free: it is evicted (its hash forgotten) only when an allocation
  needs it, least recently used first, lazily.
* A request frees its blocks in reverse order (its tail becomes least recently used first, as
  vLLM's ``free_blocks`` does), so a shared head outlives the tails that follow it.

One departure, for O(1) bookkeeping: an allocation takes never-cached free blocks before it
evicts cached ones (vLLM takes the head of one free queue that mixes both); this keeps cached
blocks a little longer than vLLM when the pool is partly empty and changes nothing once it is
full.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """Block accounting of one GPU's KV cache.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool (vLLM's ``num_gpu_blocks``), >= 1.

    Attributes
    ----------
    evictions : int
        Cached blocks evicted so far.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._plain_free = num_blocks          # free blocks without a hash
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced, LRU
        self._refs: dict[int, int] = {}        # cached blocks in use → holders
        self.evictions = 0

    @property
    def free(self) -> int:
        """Blocks an allocation can take (never-cached free plus evictable cached blocks)."""
        return self._plain_free + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks held by running requests."""
        return self.num_blocks - self.free

    @property
    def cached(self) -> int:
        """Blocks with a hash (in use or evictable)."""
        return len(self._refs) + len(self._evictable)

    def match(self, hashes: list[int], limit: int) -> tuple[int, int]:
        """Longest run of leading ``hashes`` that is cached, at most ``limit`` blocks.

        Returns
        -------
        hit, from_free : int
            Blocks matched, and how many of them are evictable (acquiring them takes them out
            of the free blocks).
        """
        hit = from_free = 0
        for key in hashes[:limit]:
            if key in self._refs:
                hit += 1
            elif key in self._evictable:
                hit += 1
                from_free += 1
            else:
                break
        return hit, from_free

    def acquire(self, hashes: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit, as :meth:`match` found them)."""
        for key in hashes:
            if key in self._refs:
                self._refs[key] += 1
            else:
                del self._evictable[key]
                self._refs[key] = 1

    def allocate(self, n: int) -> None:
        """Take ``n`` free blocks, evicting least recently used cached ones when the
        never-cached ones run out.

        Raises
        ------
        RuntimeError
            When fewer than ``n`` blocks are free (the scheduler must check first).
        """
        if n > self.free:
            raise RuntimeError(f"allocating {n} KV blocks with {self.free} free")
        plain = min(n, self._plain_free)
        self._plain_free -= plain
        for _ in range(n - plain):
            self._evictable.popitem(last=False)
            self.evictions += 1

    def register(self, key: int) -> bool:
        """Give a just-computed, held block the hash ``key`` so later requests can find it.

        Returns False (the block stays plain) when a block with that hash is already cached,
        as when two requests compute the same prefix at once."""
        if key in self._refs or key in self._evictable:
            return False
        self._refs[key] = 1
        return True

    def release(self, n_plain: int, hashes: list[int]) -> None:
        """Give back a request's blocks: ``n_plain`` without a hash, and its cached ones in
        prompt order (freed in reverse, so the tail is evicted first)."""
        self._plain_free += n_plain
        for key in reversed(hashes):
            left = self._refs[key] - 1
            if left:
                self._refs[key] = left
            else:
                del self._refs[key]
                self._evictable[key] = None
