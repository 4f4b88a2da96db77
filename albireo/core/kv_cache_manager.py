"""Paged KV cache bookkeeping: a block pool with reference counts and an automatic prefix cache,
and optionally a second tier of blocks in host memory.

Only block ids live here; the tensors they index belong to the workers. A full block is named by a
hash chained over every token before its end, so equal prefixes share blocks. Blocks whose
reference count drops to zero keep their hash and stay reusable until the pool needs them back,
oldest first (LRU).

With the host tier, a request's full blocks are copied to host slots when it frees them (finished
or preempted), unless their hash is there already, so a block the device pool later evicts is not
lost; a request admitted later continues its prefix-cache lookup in the host tier past the device
hits and gets those blocks loaded into fresh device blocks instead of recomputing them. The copies
are queued here as (device block, host slot) saves and (host slot, device block) loads and ride on
the next plan. The workers run most of a plan's saves after its loads, so a lookup skips the slots
the plan being built stores to.
"""

from __future__ import annotations

from collections import OrderedDict

from albireo.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order: the front is the least recently freed.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self.free.popitem(last=False)
            self._forget(block_id)
            self.ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks, pulling idle ones out of the free list."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free[block_id]
            self.ref_counts[block_id] += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop a reference; pass a request's blocks tail first so its tail is evicted first."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free[block_id] = None

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def register(self, block_id: int, block_hash: int) -> None:
        if not self.enable_caching or block_hash in self.cached:
            return
        self.block_hash[block_id] = block_hash
        self.cached[block_hash] = block_id

    def _forget(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            self.block_hash[block_id] = None
            if self.cached.get(h) == block_id:
                del self.cached[h]


class HostBlockPool:
    """Host slots holding copies of full blocks, by hash. Slots are handed out round the ring, so
    the blocks saved together sit in consecutive slots (few, large copies) and the oldest saved
    block is the first overwritten (FIFO); a hash evicted here is saved again the next time a
    request frees a device block holding it."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_hash: list[int | None] = [None] * num_slots
        self.cached: dict[int, int] = {}  # block hash -> slot
        self.next_slot = 0

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def store(self, block_hashes: list[int]) -> list[int]:
        """Slots for these hashes (not already stored), overwriting the oldest entries."""
        slots = []
        for block_hash in block_hashes:
            slot = self.next_slot
            self.next_slot = (slot + 1) % self.num_slots
            old = self.slot_hash[slot]
            if old is not None:
                del self.cached[old]
            self.slot_hash[slot] = block_hash
            self.cached[block_hash] = slot
            slots.append(slot)
        return slots


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.host = HostBlockPool(num_host_blocks) if num_host_blocks and enable_caching else None
        self.req_blocks: dict[str, list[int]] = {}
        # How many leading blocks of each request are already registered in the prefix cache.
        self.req_num_registered: dict[str, int] = {}
        self.num_prefix_hits = 0  # prompt tokens found in the device pool
        self.num_host_hits = 0  # prompt tokens loaded from the host tier
        # Copies for the workers, drained into the next plan.
        self.kv_loads: list[tuple[int, int]] = []  # (host slot, device block)
        self.kv_saves: list[tuple[int, int]] = []  # (device block, host slot)
        self.saving_slots: set[int] = set()  # the host slots in kv_saves

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= num_tokens:
            start = len(hashes) * bs
            hashes.append(hash_block(hashes[-1] if hashes else None, request.token_ids(start, start + bs)))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], list[int], int]:
        """The longest cached prefix of a request that is not yet running: (device block ids, host
        slots that continue it, tokens they hold).

        At least one token is left to compute, since the step must produce logits for the last.
        """
        if not self.pool.enable_caching:
            return [], [], 0
        self._extend_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        host_hits: list[int] = []
        if self.host is not None:
            # A slot this plan stores to holds its block only once the plan's loads are done.
            for block_hash in request.block_hashes[len(hits) : max_blocks]:
                slot = self.host.lookup(block_hash)
                if slot is None or slot in self.saving_slots:
                    break
                host_hits.append(slot)
        return hits, host_hits, (len(hits) + len(host_hits)) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[int] | None = None,
        host_hits: list[int] | None = None,
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        Returns the newly allocated block ids, or None (and changes nothing) when the pool is short.
        `computed_blocks` and `host_hits` are the prefix-cache hits of a request being admitted;
        each host hit gets a fresh device block, to be loaded before the step's attention.
        """
        blocks = self.req_blocks.get(request.request_id)
        total_tokens = request.num_computed_tokens + num_new_tokens
        if blocks is not None and total_tokens <= len(blocks) * self.block_size:
            # The common decode step: the last block has room and no block fills up.
            if total_tokens % self.block_size == 0:
                self._register_full_blocks(request, total_tokens)
            return []
        computed_blocks = computed_blocks or []
        host_hits = host_hits or []
        blocks = blocks or []
        total_tokens += (len(computed_blocks) + len(host_hits)) * self.block_size
        num_new_blocks = self.blocks_needed(total_tokens) - len(blocks) - len(computed_blocks)
        idle_hits = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
        if num_new_blocks + idle_hits > self.pool.num_free:
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(max(num_new_blocks, 0))
        blocks = self.req_blocks.setdefault(request.request_id, [])
        blocks.extend(computed_blocks)
        blocks.extend(new_blocks)
        if request.request_id not in self.req_num_registered:
            # Admission: count the prefix hits once, whatever retries preceded it. The loaded
            # blocks are registered below like computed ones: they are full once loaded.
            self.req_num_registered[request.request_id] = len(computed_blocks)
            self.num_prefix_hits += len(computed_blocks) * self.block_size
            self.num_host_hits += len(host_hits) * self.block_size
            self.kv_loads.extend(zip(host_hits, new_blocks))
        self._register_full_blocks(request, total_tokens)
        return new_blocks

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Publish blocks that will be full once this step runs (their tokens are all known)."""
        if not self.pool.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.req_num_registered[request.request_id]
        if num_full <= start:
            return
        self._extend_hashes(request, num_full * self.block_size)
        blocks = self.req_blocks[request.request_id]
        for i in range(start, num_full):
            self.pool.register(blocks[i], request.block_hashes[i])
        self.req_num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        num_registered = self.req_num_registered.pop(request.request_id, 0)
        if self.host is not None:
            self._save(request.block_hashes, blocks[:num_registered])
        self.pool.release(list(reversed(blocks)))

    def _save(self, block_hashes: list[int], blocks: list[int]) -> None:
        """Copy full blocks whose hash the host tier lacks to host slots."""
        todo = [(b, h) for b, h in zip(blocks, block_hashes) if self.host.lookup(h) is None]
        slots = self.host.store([h for _, h in todo])
        self.kv_saves.extend((b, slot) for (b, _), slot in zip(todo, slots))
        self.saving_slots.update(slots)

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The loads and saves queued since the last call, for the next plan."""
        loads, saves = self.kv_loads, self.kv_saves
        self.kv_loads, self.kv_saves = [], []
        self.saving_slots = set()
        return loads, saves

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks[request_id]
