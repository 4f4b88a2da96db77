"""BlockPool and KVCacheManager: reference counts, LRU eviction and the automatic prefix cache."""

from __future__ import annotations

import pytest

from albireo.core.kv_cache_manager import BlockPool, HostBlockPool, KVCacheManager, hash_block
from albireo.engine.request import Request
from albireo.sampling_params import SamplingParams

BS = 4  # block size used throughout: small enough to count blocks by eye


def make_request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, list(prompt), SamplingParams(), eos_token_ids=[], max_tokens=16)


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """Admit a request the way the scheduler does: look up the prefix cache, then allocate the rest."""
    hits, _, num_cached = kv.get_computed_blocks(request)
    new_blocks = kv.allocate_slots(request, request.num_tokens - num_cached, hits)
    assert new_blocks is not None
    request.num_computed_tokens = request.num_tokens
    return kv.block_ids(request.request_id)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def free_order(pool: BlockPool) -> list[int]:
    return list(pool.free)


# ---- BlockPool: reference counts ---------------------------------------------------------------


def test_allocate_takes_blocks_from_the_front_with_ref_count_one():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.ref_counts == [1, 1, 0, 0]
    assert pool.num_free == 2
    assert free_order(pool) == [2, 3]


def test_allocate_more_than_free_raises_and_takes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks with 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.ref_counts == [1, 1, 0]


def test_touch_and_release_move_the_ref_count_and_only_zero_frees():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.touch([b])
    assert pool.ref_counts[b] == 2
    pool.release([b])
    assert pool.ref_counts[b] == 1
    assert b not in pool.free
    pool.release([b])
    assert pool.ref_counts[b] == 0
    assert b in pool.free
    assert pool.num_free == 2


def test_touch_on_an_idle_block_pulls_it_out_of_the_free_list():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.release([b])
    assert free_order(pool) == [1, 2, 0]
    pool.touch([b])
    assert pool.ref_counts[b] == 1
    assert free_order(pool) == [1, 2]


# ---- BlockPool: LRU eviction -------------------------------------------------------------------


def test_released_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    pool.allocate(4)
    pool.release([2])
    pool.release([0])
    pool.release([3])
    assert free_order(pool) == [2, 0, 3]
    assert pool.allocate(2) == [2, 0]
    assert pool.allocate(1) == [3]


def test_retouched_block_goes_to_the_back_when_released_again():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.release([0, 1, 2])
    pool.touch([0])
    pool.release([0])
    assert free_order(pool) == [1, 2, 0]


def test_freed_cached_block_stays_reusable_by_hash():
    pool = BlockPool(3)
    [b] = pool.allocate(1)
    pool.register(b, 1234)
    pool.release([b])
    assert pool.ref_counts[b] == 0
    assert pool.lookup(1234) == b
    assert pool.block_hash[b] == 1234


def test_evicted_cached_block_forgets_its_hash():
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2)
    pool.register(b0, 10)
    pool.register(b1, 11)
    pool.release([b0, b1])
    assert pool.allocate(1) == [b0]
    assert pool.lookup(10) is None
    assert pool.block_hash[b0] is None
    assert pool.lookup(11) == b1  # not evicted yet


def test_register_keeps_the_first_block_for_a_duplicate_hash():
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2)
    pool.register(b0, 7)
    pool.register(b1, 7)
    assert pool.lookup(7) == b0
    assert pool.block_hash[b1] is None


def test_evicting_a_duplicate_block_keeps_the_cached_one():
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2)
    pool.register(b0, 7)
    pool.register(b1, 7)
    pool.release([b1, b0])
    assert pool.allocate(1) == [b1]
    assert pool.lookup(7) == b0


def test_pool_without_caching_never_registers_or_finds():
    pool = BlockPool(2, enable_caching=False)
    [b] = pool.allocate(1)
    pool.register(b, 99)
    assert pool.lookup(99) is None
    assert pool.cached == {}
    assert pool.block_hash[b] is None


# ---- KVCacheManager: allocation and release ----------------------------------------------------


def test_allocate_slots_covers_the_tokens_with_whole_blocks():
    kv = KVCacheManager(8, BS)
    req = make_request("a", prompt(10))
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.pool.ref_counts[:4] == [1, 1, 1, 0]


def test_allocate_slots_adds_a_block_only_when_a_decode_crosses_a_boundary():
    kv = KVCacheManager(8, BS)
    req = make_request("a", prompt(7))
    kv.allocate_slots(req, 7)
    req.num_computed_tokens = 7
    req.append_output_token(1)
    assert kv.allocate_slots(req, 1) == []  # token 8 still fits in block 1
    req.num_computed_tokens = 8
    req.append_output_token(2)
    assert kv.allocate_slots(req, 1) == [2]  # token 9 opens block 2
    assert kv.block_ids("a") == [0, 1, 2]


def test_free_releases_a_request_blocks_tail_first():
    kv = KVCacheManager(4, BS)
    req = make_request("a", prompt(10))
    kv.allocate_slots(req, 10)
    kv.free(req)
    assert free_order(kv.pool) == [3, 2, 1, 0]
    assert kv.pool.ref_counts == [0, 0, 0, 0]
    assert "a" not in kv.req_blocks


def test_freed_request_tail_is_evicted_first_and_its_head_stays_a_hit():
    kv = KVCacheManager(4, BS)
    admit(kv, make_request("a", prompt(13)))  # blocks 0, 1, 2 full and cached, block 3 partial
    kv.free(make_request("a", prompt(13)))
    assert free_order(kv.pool) == [3, 2, 1, 0]

    admit(kv, make_request("filler", prompt(5, start=900)))  # evicts 3 and a's third block, 2
    hits, _, num_cached = kv.get_computed_blocks(make_request("b", prompt(13)))
    assert hits == [0, 1]
    assert num_cached == 2 * BS


def test_usage_is_the_fraction_of_blocks_not_free():
    kv = KVCacheManager(10, BS)
    assert kv.usage == 0.0
    req = make_request("a", prompt(12))
    kv.allocate_slots(req, 12)
    assert kv.usage == pytest.approx(0.3)
    kv.free(req)
    assert kv.usage == 0.0


# ---- KVCacheManager: prefix cache --------------------------------------------------------------


def test_identical_prompt_hits_share_block_ids_and_raise_ref_counts():
    kv = KVCacheManager(8, BS)
    a_blocks = admit(kv, make_request("a", prompt(9)))
    assert a_blocks == [0, 1, 2]

    b = make_request("b", prompt(9))
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert hits == [0, 1]
    assert num_cached == 8
    assert kv.allocate_slots(b, 1, hits) == [3]
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.ref_counts[:4] == [2, 2, 1, 1]


def test_shared_block_survives_the_first_owner_freeing_it():
    kv = KVCacheManager(8, BS)
    a = make_request("a", prompt(9))
    admit(kv, a)
    admit(kv, make_request("b", prompt(9)))
    kv.free(a)
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 1]
    assert 0 not in kv.pool.free and 1 not in kv.pool.free
    assert 2 in kv.pool.free


def test_hits_stop_at_the_first_differing_block():
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", prompt(4, start=10) + prompt(4, start=20) + prompt(4, start=30) + [1]))
    # Block 1 differs; block 2 has the same tokens as a's block 2 but a different prefix.
    b = make_request("b", prompt(4, start=10) + prompt(4, start=50) + prompt(4, start=30) + [1])
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert hits == [0]
    assert num_cached == BS


def test_hits_stop_at_an_evicted_block_even_if_a_later_one_is_still_cached():
    kv = KVCacheManager(4, BS)
    a = make_request("a", prompt(13))
    admit(kv, a)
    kv.free(a)
    kv.pool.touch([3, 2])
    kv.pool.release([3, 2])  # a's middle block 1 is now the least recently freed
    assert free_order(kv.pool) == [1, 0, 3, 2]
    kv.pool.allocate(1)
    assert kv.pool.lookup(a.block_hashes[2]) == 2
    hits, _, num_cached = kv.get_computed_blocks(make_request("b", prompt(13)))
    assert hits == [0]
    assert num_cached == BS


def test_equal_block_at_a_different_position_is_not_a_hit():
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", prompt(4, start=10) + prompt(4, start=20) + [1]))
    # b starts with a's second block: same tokens, but a different prefix and positions.
    hits, _, num_cached = kv.get_computed_blocks(make_request("b", prompt(4, start=20) + [1]))
    assert hits == []
    assert num_cached == 0


def test_equal_block_after_a_different_one_has_a_different_hash():
    first = hash_block(None, (1, 2, 3, 4))
    other = hash_block(None, (5, 6, 7, 8))
    assert hash_block(first, (9, 9, 9, 9)) != hash_block(other, (9, 9, 9, 9))
    assert hash_block(first, (9, 9, 9, 9)) == hash_block(first, (9, 9, 9, 9))


def test_prompt_of_exactly_k_full_blocks_reuses_only_k_minus_one():
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", prompt(12)))  # all three blocks full and cached
    b = make_request("b", prompt(12))
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert hits == [0, 1]
    assert num_cached == 8
    assert b.num_tokens - num_cached == BS  # the last block is recomputed so its last token gets logits


def test_prompt_one_token_past_k_full_blocks_reuses_all_k():
    kv = KVCacheManager(8, BS)
    admit(kv, make_request("a", prompt(12)))
    hits, _, num_cached = kv.get_computed_blocks(make_request("b", prompt(13)))
    assert hits == [0, 1, 2]
    assert num_cached == 12


def test_freed_request_blocks_are_hits_until_evicted_then_misses():
    kv = KVCacheManager(3, BS)
    a = make_request("a", prompt(9))
    admit(kv, a)
    kv.free(a)
    hits, _, _ = kv.get_computed_blocks(make_request("b", prompt(9)))
    assert hits == [0, 1]

    kv.allocate_slots(make_request("filler", prompt(12, start=900)), 12)  # takes every block
    assert kv.pool.lookup(a.block_hashes[0]) is None
    assert kv.pool.lookup(a.block_hashes[1]) is None
    hits, _, num_cached = kv.get_computed_blocks(make_request("c", prompt(9)))
    assert hits == []
    assert num_cached == 0


def test_output_tokens_fill_blocks_that_become_prefix_hits():
    kv = KVCacheManager(8, BS)
    a = make_request("a", prompt(6))
    admit(kv, a)
    a.append_output_token(1)
    kv.allocate_slots(a, 1)  # computes token 7 of 8 in block 1: not full yet
    a.num_computed_tokens = 7
    a.append_output_token(2)
    b_before = make_request("b0", prompt(6) + [1, 2, 3])
    assert kv.get_computed_blocks(b_before) == ([0], [], BS)
    kv.allocate_slots(a, 1)  # computes token 8: block 1 is full and published
    b = make_request("b", prompt(6) + [1, 2, 3])
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert hits == [0, 1]
    assert num_cached == 8


def test_caching_disabled_gives_no_hits():
    kv = KVCacheManager(8, BS, enable_caching=False)
    admit(kv, make_request("a", prompt(9)))
    b = make_request("b", prompt(9))
    assert kv.get_computed_blocks(b) == ([], [], 0)
    assert kv.allocate_slots(b, 9) == [3, 4, 5]
    assert kv.pool.cached == {}


# ---- KVCacheManager: running short -------------------------------------------------------------


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(3, BS)
    admit(kv, make_request("a", prompt(5)))  # 2 blocks, 1 free
    before = (list(kv.pool.ref_counts), free_order(kv.pool), dict(kv.pool.cached))
    b = make_request("b", prompt(5, start=500))
    assert kv.allocate_slots(b, 5) is None
    assert (kv.pool.ref_counts, free_order(kv.pool), kv.pool.cached) == before
    assert "b" not in kv.req_blocks
    assert "b" not in kv.req_num_registered


def test_allocate_slots_counts_idle_hits_against_the_free_pool():
    kv = KVCacheManager(3, BS)
    a = make_request("a", prompt(9))
    admit(kv, a)
    kv.free(a)  # blocks 0 and 1 idle but cached; all 3 free
    b = make_request("b", prompt(8) + prompt(5, start=700))
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert hits == [0, 1]
    # 13 tokens need 4 blocks: 2 new ones would fit in 3 free, but the 2 idle hits leave the free list too.
    before = (list(kv.pool.ref_counts), free_order(kv.pool), dict(kv.pool.cached))
    assert kv.allocate_slots(b, b.num_tokens - num_cached, hits) is None
    assert (kv.pool.ref_counts, free_order(kv.pool), kv.pool.cached) == before
    assert "b" not in kv.req_blocks


def test_allocate_slots_with_idle_hits_succeeds_when_they_exactly_fit():
    kv = KVCacheManager(3, BS)
    a = make_request("a", prompt(9))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", prompt(12))
    hits, _, num_cached = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, b.num_tokens - num_cached, hits) == [2]
    assert kv.block_ids("b") == [0, 1, 2]
    assert kv.pool.num_free == 0
    assert kv.pool.ref_counts == [1, 1, 1]


# --- the host tier -----------------------------------------------------------------------------


def test_host_pool_hands_out_consecutive_slots_and_overwrites_the_oldest_first():
    host = HostBlockPool(4)
    assert host.store([11, 12, 13]) == [0, 1, 2]
    assert host.store([14, 15]) == [3, 0]  # wraps: slot 0, the oldest (hash 11), is overwritten
    assert host.lookup(11) is None
    assert [host.lookup(h) for h in (12, 13, 14, 15)] == [1, 2, 3, 0]
    assert host.store([11]) == [1]  # saved again later: it takes the next oldest slot (hash 12's)
    assert host.lookup(12) is None and host.lookup(11) == 1


def test_freeing_a_request_saves_its_full_blocks_once():
    kv = KVCacheManager(8, BS, num_host_blocks=8)
    a = make_request("a", prompt(10))  # two full blocks and a partial one
    blocks = admit(kv, a)
    kv.free(a)
    loads, saves = kv.take_transfers()
    assert loads == [] and saves == [(blocks[0], 0), (blocks[1], 1)]
    b = make_request("b", prompt(10))  # same prompt: device hits, and nothing new to save on free
    admit(kv, b)
    kv.free(b)
    assert kv.take_transfers() == ([], [])


def test_a_prefix_evicted_from_the_device_is_loaded_from_the_host_tier():
    kv = KVCacheManager(3, BS, num_host_blocks=8)
    a = make_request("a", prompt(9))
    admit(kv, a)  # blocks 0, 1 full, block 2 holds token 9
    kv.free(a)
    kv.take_transfers()
    filler = make_request("filler", prompt(12, start=900))
    admit(kv, filler)  # takes all three device blocks: a's prefix survives only on the host
    kv.free(filler)
    kv.take_transfers()
    b = make_request("b", prompt(8) + [1, 2])  # shares a's first two blocks
    hits, host_hits, num_cached = kv.get_computed_blocks(b)
    assert hits == [] and host_hits == [0, 1] and num_cached == 2 * BS
    new_blocks = kv.allocate_slots(b, b.num_tokens - num_cached, hits, host_hits)
    loads, _ = kv.take_transfers()
    assert loads == [(0, new_blocks[0]), (1, new_blocks[1])]
    assert kv.num_host_hits == 2 * BS
    # Once loaded, the blocks are in the device prefix cache again.
    c = make_request("c", prompt(8) + [3])
    assert kv.get_computed_blocks(c)[0] == new_blocks[:2]


def test_a_host_miss_in_the_middle_stops_the_chain():
    kv = KVCacheManager(3, BS, num_host_blocks=2)
    a = make_request("a", prompt(9))
    admit(kv, a)
    kv.free(a)  # saves blocks of hashes h0, h1 to slots 0, 1
    other = make_request("o", prompt(5, start=500))
    admit(kv, other)
    kv.free(other)  # saves its one full block to slot 0, overwriting h0
    filler = make_request("filler", prompt(12, start=900))
    admit(kv, filler)
    b = make_request("b", prompt(9))
    hits, host_hits, num_cached = kv.get_computed_blocks(b)
    assert (hits, host_hits, num_cached) == ([], [], 0)  # h1 is there but h0 is not: recompute all


def test_a_slot_stored_to_by_the_plan_being_built_is_not_loaded_from():
    kv = KVCacheManager(3, BS, num_host_blocks=8)
    a = make_request("a", prompt(9))
    admit(kv, a)
    kv.free(a)  # saves queued, not yet sent: the slots hold nothing yet
    filler = make_request("filler", prompt(12, start=900))
    admit(kv, filler)  # evicts a's device blocks
    kv.free(filler)
    b = make_request("b", prompt(9))
    assert kv.get_computed_blocks(b)[1] == []
    kv.take_transfers()  # the plan carrying the saves goes out
    assert kv.get_computed_blocks(b)[1] == [0, 1]
