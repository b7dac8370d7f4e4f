import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.errors import InputError
from archive.traces import PromptContent
from kavier.cache import PrefixCache, PrefixCacheConfig, kv_pool_blocks


def tokens(*prompts) -> PromptContent:
    lengths = [len(p) for p in prompts]
    return PromptContent("tokens", np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
                         np.concatenate([np.asarray(p, np.int64) for p in prompts]))


def hashes(*lists, block_size=4) -> PromptContent:
    content = tokens(*lists)
    return PromptContent("hashes", content.offsets, content.values, block_size)


def serve(cache, content, n_in=None):
    n_in = content.lengths() if n_in is None else np.asarray(n_in)
    return cache.serve(np.arange(n_in.size), n_in)


def test_exact_match_follows_listing_4_2():
    shared = list(range(10))
    content = tokens(shared + [1, 2], shared + [3], list(range(5)), shared[:8] + [7, 7, 7])
    cache = PrefixCache(PrefixCacheConfig("prefill", min_tokens=8), content)
    reused = serve(cache, content)
    # second request shares the first 8 tokens: a hit credits the whole prompt (thesis);
    # the 5-token prompt is too short to look up; the fourth shares exactly 8 tokens
    assert reused.tolist() == [0, 11, 0, 11]
    assert (cache.lookups, cache.hits) == (3, 2)


def test_lru_capacity_and_evictions():
    a, b = [1] * 4, [2] * 4
    content = tokens(a, b, a)
    small = PrefixCache(PrefixCacheConfig("prefill", min_tokens=4, max_cached_prompts=1), content)
    assert serve(small, content).tolist() == [0, 0, 0] and small.evictions == 2
    large = PrefixCache(PrefixCacheConfig("prefill", min_tokens=4, max_cached_prompts=2), content)
    assert serve(large, content).tolist() == [0, 0, 4] and large.evictions == 0


def test_session_scope_hits_only_own_entries():
    p = [5] * 6
    content = tokens(p, p, p)
    sessions = np.array(["u1", "u2", "u1"])
    cache = PrefixCache(PrefixCacheConfig("prefill", 4, scope="session"), content, sessions)
    assert serve(cache, content).tolist() == [0, 0, 6]
    shared = PrefixCache(PrefixCacheConfig("prefill", 4, scope="global"), content, sessions)
    assert serve(shared, content).tolist() == [0, 6, 6]
    with pytest.raises(InputError, match="session_id"):
        PrefixCache(PrefixCacheConfig("prefill", 4, scope="session"), content)


def test_blocks_reuse_only_leading_runs():
    # hash ids name a block and its prefix; a block counts only after an unbroken run
    content = hashes([0, 1, 2], [0, 9, 2], [0, 1, 2], [7, 1, 2])
    cache = PrefixCache(PrefixCacheConfig("blocks"), content)
    reused = serve(cache, content, n_in=[12, 12, 12, 12])
    assert reused.tolist() == [0, 4, 11, 0]   # last token of a full match is recomputed
    assert (cache.blocks_looked_up, cache.blocks_hit, cache.hits) == (12, 4, 2)


def test_blocks_from_token_ids_use_full_blocks_only():
    base = list(range(100, 109))
    content = tokens(base, base[:9] + [1, 2], base[:5])
    cache = PrefixCache(PrefixCacheConfig("blocks", block_size=4), content)
    # 9 tokens = 2 full blocks cached; the second shares 9 tokens, so 2 blocks (8 tokens)
    assert serve(cache, content).tolist() == [0, 8, 4]


def test_block_capacity_evicts_the_tail_first():
    content = hashes([1, 2, 3], [1, 2, 3])
    cache = PrefixCache(PrefixCacheConfig("blocks", capacity_blocks=2), content)
    # only 2 of the first request's 3 blocks stay: its head, not its tail
    assert serve(cache, content, n_in=[12, 12]).tolist() == [0, 8]
    assert cache.evictions >= 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30),
       st.sampled_from(["prefill", "full", "blocks"]))
def test_unique_prefixes_never_hit(lengths, policy):
    start = np.cumsum([0] + lengths)
    content = tokens(*[np.arange(a, b) * 0 + i + 1 for i, (a, b) in
                       enumerate(zip(start[:-1], start[1:], strict=True))])
    cache = PrefixCache(PrefixCacheConfig(policy, min_tokens=1, block_size=1), content)
    assert serve(cache, content).sum() == 0
    stats = cache.stats(len(lengths), int(sum(lengths)), 0)
    assert stats["hit_ratio_lookups"] == 0 and stats["hit_ratio_requests"] == 0


def test_kv_pool_is_memory_left_after_weights(llama8b, a10):
    blocks = kv_pool_blocks(llama8b, a10, 16)
    expected = (24 * 2**30 * 0.9 - llama8b.weight_bytes) / (16 * llama8b.kv_bytes_per_token)
    assert blocks == int(expected) and blocks > 1000
    reserved = kv_pool_blocks(llama8b, a10, 16, activation_reserve_gib=1.0)
    assert reserved == int(expected - 2**30 / (16 * llama8b.kv_bytes_per_token))
    from kavier.library import llm_library

    with pytest.raises(InputError, match="do not fit"):
        kv_pool_blocks(llm_library().get("Llama-3-70B"), a10, 16)


def test_configuration_errors_are_clear():
    content = hashes([1, 2])
    with pytest.raises(InputError, match="needs the prompts' content"):
        PrefixCache(PrefixCacheConfig("prefill"), None)
    with pytest.raises(InputError, match="block size must be > 0"):
        PrefixCache(PrefixCacheConfig("blocks", block_size=0), tokens([1, 2]))
    with pytest.raises(InputError, match="whole number"):
        PrefixCache(PrefixCacheConfig("prefill", min_tokens=6), content)
    with pytest.raises(InputError, match="block size"):
        PrefixCache(PrefixCacheConfig("blocks"), PromptContent("hashes", content.offsets,
                                                               content.values, None))
