"""The host tier of the KV cache on a worker: pinned host copies of blocks, moved on a copy stream.

A plan's loads (host slot -> device block) go layer by layer on a copy stream, each layer's
followed by an event. They are issued lazily: layer 0's when the step launches, layer i+1's when
the forward reaches layer i's attention, which then waits on layer i's event. So layer i+1's blocks
cross PCIe while layer i computes, and issuing them costs the host nothing while the GPU waits.
The plan's saves (device block -> host slot) follow its last load on the same stream, except those
of blocks the plan hands out again (as load destinations or for new tokens), which go first. One
stream keeps every copy in plan order, so a slot is overwritten only after earlier loads have read
it (the scheduler never loads a slot the same plan stores to). The copy stream first waits for
the compute queued so far (the blocks' last writes, and reads of blocks being reused); a step that
writes into a block whose save is still running waits for it.

Blocks are scattered in the device pool but the scheduler hands out host slots in runs, so a
layer's copies are: one host copy per run of consecutive slots into a staging buffer and one
scatter kernel on the device (a gather, then host copies, for saves).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from albireo.kernels import indexable
from albireo.sampling.sampler import to_device


@dataclass
class OffloadStats:
    blocks_loaded: int = 0
    blocks_saved: int = 0
    bytes_loaded: int = 0
    bytes_saved: int = 0
    load_steps: int = 0
    # Milliseconds the forward of steps with loads stood waiting on them, and those forwards' time.
    load_wait_ms: float = 0.0
    load_forward_ms: float = 0.0
    # Per-layer intervals of one traced load step (ms from the step's start), for a timeline plot.
    trace: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(position in the list, first slot, length) of each run of consecutive slots."""
    runs = []
    for i, slot in enumerate(slots):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


def timing_event(stream=None) -> torch.cuda.Event:
    """A timing event recorded now on `stream` (the current one by default)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


@dataclass
class LoadStep:
    """The loads of one launched step, issued a layer ahead of the forward, then the step's saves."""

    tier: HostKVTier
    chunks: list  # (runs of host slots, device block ids) per staging-sized chunk of the loads
    saves: list[tuple[int, int]]
    ready: list[torch.cuda.Event] = field(default_factory=list)
    waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    # When traced: the step's first copy and each layer's copy interval.
    trace_start: torch.cuda.Event | None = None
    copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def issue(self, layer: int) -> None:
        tier = self.tier
        with tier.copy_stream():
            start = timing_event() if self.trace_start is not None else None
            tier.load_layer(layer, self.chunks)
            if tier.on_gpu:
                event = torch.cuda.Event(enable_timing=start is not None)
                event.record()
                self.ready.append(event)
                if start is not None:
                    self.copies.append((start, event))
            if layer == tier.kv_cache.shape[0] - 1:
                tier.issue_saves(self.saves)

    def wait_for_layer(self, layer: int) -> None:
        """Called by layer `layer`'s attention before it reads the cache."""
        if layer + 1 < self.tier.kv_cache.shape[0]:
            self.issue(layer + 1)
        if self.tier.on_gpu:
            before = timing_event()
            torch.cuda.current_stream().wait_event(self.ready[layer])
            self.waits.append((before, timing_event()))


class HostKVTier:
    def __init__(self, kv_cache: torch.Tensor, num_slots: int, staging_blocks: int = 256) -> None:
        num_layers, _, _, block_size, num_heads, head_dim = kv_cache.shape
        self.kv_cache = kv_cache
        self.on_gpu = kv_cache.is_cuda
        self.block = (block_size, num_heads, head_dim)
        self.host = torch.empty((num_layers, 2, num_slots, *self.block), dtype=kv_cache.dtype, pin_memory=self.on_gpu)
        # Where a layer's loaded blocks land on the device before they are scattered to their blocks.
        self.staging_blocks = staging_blocks
        self.staging = torch.empty(2 * staging_blocks * block_size * num_heads * head_dim, dtype=kv_cache.dtype,
                                   device=kv_cache.device)
        self.block_bytes = num_layers * 2 * block_size * num_heads * head_dim * kv_cache.dtype.itemsize
        self.stream = torch.cuda.Stream(kv_cache.device) if self.on_gpu else None
        self.pending_saves: list[tuple[torch.cuda.Event, set[int]]] = []
        self.trace_next = False  # record the next load step's per-layer timeline
        self.stats = OffloadStats()

    # ---- issuing copies --------------------------------------------------------------------------

    def transfer(self, loads: list[tuple[int, int]], saves: list[tuple[int, int]], reused: set[int]) -> LoadStep | None:
        """Start a plan's copies; returns the loads the forward must wait for, layer by layer.

        `reused`: the device blocks the plan hands out; their saves must read them first.
        """
        self.stats.blocks_loaded += len(loads)
        self.stats.bytes_loaded += len(loads) * self.block_bytes
        self.stats.blocks_saved += len(saves)
        self.stats.bytes_saved += len(saves) * self.block_bytes
        chunks = [loads[lo : lo + self.staging_blocks] for lo in range(0, len(loads), self.staging_blocks)]
        chunks = [(_runs([slot for slot, _ in c]), to_device([b for _, b in c], torch.int64, self.kv_cache.device))
                  for c in chunks]
        first = [save for save in saves if save[0] in reused]
        later = [save for save in saves if save[0] not in reused] if first else saves
        if self.on_gpu:
            self.stream.wait_stream(torch.cuda.current_stream())
        with self.copy_stream():
            self.issue_saves(first)
            if not loads:
                self.issue_saves(later)
                return None
        step = LoadStep(self, chunks, later)
        if self.on_gpu and self.trace_next:
            self.trace_next = False
            step.trace_start = timing_event(self.stream)
        step.issue(0)
        return step

    def copy_stream(self):
        """Where copies are issued: the copy stream on a GPU; on a CPU, in line."""
        return torch.cuda.stream(self.stream) if self.on_gpu else nullcontext()

    def load_layer(self, layer: int, chunks: list) -> None:
        for runs, blocks in chunks:
            n = len(blocks)
            stage = self.staging[: self.staging.numel() * n // self.staging_blocks].view(2, n, *self.block)
            for pos, first, count in runs:
                for kv in range(2):
                    stage[kv, pos : pos + count].copy_(self.host[layer, kv, first : first + count], non_blocking=True)
            indexable(self.kv_cache[layer]).index_copy_(1, blocks, indexable(stage))

    def issue_saves(self, saves: list[tuple[int, int]]) -> None:
        if not saves:
            return
        blocks = to_device([block for block, _ in saves], torch.int64, self.kv_cache.device)
        runs = _runs([slot for _, slot in saves])
        for layer in range(self.kv_cache.shape[0]):
            # A fresh gather per layer: its memory returns to this stream's pool only after the
            # copies below, which run in this stream's order.
            gathered = indexable(self.kv_cache[layer]).index_select(1, blocks).view(self.kv_cache.dtype)
            for pos, first, n in runs:
                for kv in range(2):
                    self.host[layer, kv, first : first + n].copy_(gathered[kv, pos : pos + n], non_blocking=True)
        if self.on_gpu:
            done = torch.cuda.Event()
            done.record()
            self.pending_saves.append((done, {block for block, _ in saves}))

    # ---- the compute stream's side ----------------------------------------------------------------

    def fence(self, blocks) -> None:
        """Make the compute stream wait for running saves of any of these blocks before it writes them."""
        self.pending_saves = [(done, saved) for done, saved in self.pending_saves if not done.query()]
        for done, saved in self.pending_saves:
            if not saved.isdisjoint(blocks):
                torch.cuda.current_stream().wait_event(done)

    def account(self, step: LoadStep, forward_start: torch.cuda.Event, forward_end: torch.cuda.Event) -> None:
        """Fold a finished load step's waits into the statistics (its events have all completed)."""
        self.stats.load_steps += 1
        self.stats.load_wait_ms += sum(a.elapsed_time(b) for a, b in step.waits)
        self.stats.load_forward_ms += forward_start.elapsed_time(forward_end)
        if step.trace_start is not None:
            base = step.trace_start

            def ms(pairs):
                return [(base.elapsed_time(a), base.elapsed_time(b)) for a, b in pairs]

            self.stats.trace = {"copy": ms(step.copies), "wait": ms(step.waits),
                                "forward": ms([(forward_start, forward_end)])}
