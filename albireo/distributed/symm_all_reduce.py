"""All-reduce of small tensors over peer GPU memory, for the latency-bound all-reduces of decode.

A decode step of a TP model makes two all-reduces per layer of only batch x hidden values; NCCL
spends ~20 us on each even inside a CUDA graph. Here every rank owns buffers in PyTorch's symmetric
memory (mapped into each peer's address space through CUDA IPC, no multicast). Up to
`one_shot_max_bytes` one kernel of ours pushes each rank's values into every peer's buffer and sums
what arrives, with no barrier (`albireo/kernels/triton_all_reduce.py`), and can go on into the
residual add and RMSNorm after it. Past that, with more than two ranks, the same kernel runs
two-shot (each row summed by one rank and sent back) up to `max_bytes`; what it cannot take
(rows too wide, or too many for a slot) goes to PyTorch's two-shot kernel (reduce-scatter and
all-gather through the buffers, with barriers), and past `max_bytes` to NCCL. The same scheme swaps
the vocabulary-parallel sampler's candidates (`pick`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

MAX_BYTES = 8 * 2**20
# The A/B switch of our two-shot kernel: ALBIREO_TWO_SHOT_PUSH=0 leaves the sizes between the
# one-shot kernel's and MAX_BYTES to PyTorch's two-shot kernel and a norm kernel after it, as before.
TWO_SHOT_PUSH = os.environ.get("ALBIREO_TWO_SHOT_PUSH", "1") != "0"
# Sampling candidates a vocabulary-parallel step swaps at most: a row's chunks fill 512 programs,
# so a batch has max(512, rows) of them (`albireo.kernels.triton_sampling.chunks_for`).
MAX_CANDIDATES = 4096


def one_shot_max_bytes(world: int) -> int:
    """Up to which size the one-shot push kernel takes an all-reduce. At two ranks it sends no more
    bytes than two-shot (half out, half back) and waits once instead of at two barriers, so it takes
    every size (on two H200s 17 us against two-shot's 25 at 4 MiB); with more ranks it sends
    world - 1 copies of the whole tensor: on four H200s it still beats our two-shot at 256 KiB (7.3 against
    8.0 us with the norm) and loses from 512 KiB (10.5 against 9.0; 48.7 against 23.5 at 4 MiB,
    benchmarks/results/allreduce-hidden4096-bf16-tp4-20261127T191255.json). ALBIREO_ONE_SHOT_MAX_BYTES
    sets another bound (tests send every all-reduce of more than two ranks two-shot with 0)."""
    if "ALBIREO_ONE_SHOT_MAX_BYTES" in os.environ:
        return int(os.environ["ALBIREO_ONE_SHOT_MAX_BYTES"])
    return MAX_BYTES if world == 2 else 256 * 1024


class SymmMemAllReduce:
    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = MAX_BYTES, one_shot_bytes: int | None = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # Imported here: Triton must not load in processes that may yet turn its interpreter on.
        from albireo.kernels import triton_all_reduce, triton_sampling

        self.kernels = triton_all_reduce
        self.sampling_kernels = triton_sampling

        self.group_name = group.group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if one_shot_bytes is None:
            one_shot_bytes = one_shot_max_bytes(world)
        self.one_shot_max_numel = one_shot_bytes // dtype.itemsize
        self.world = world
        self.two_shot_push = TWO_SHOT_PUSH and world > 2
        # Two-shot, a slot holds in each half an owner's share of the rows: 1 / world of them.
        slot_numel = max(self.one_shot_max_numel, 2 * -(-self.max_numel // world) if self.two_shot_push else 1)

        self.staging = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.staging, group)

        def exchange_slots(slot_numel: int, dtype: torch.dtype, empty: float):
            """ROUNDS x world slots in every rank's buffer, all `empty` before any peer can write."""
            buffer = symm_mem.empty(self.kernels.ROUNDS * world * slot_numel, dtype=dtype, device=device)
            buffer.fill_(empty)
            torch.cuda.synchronize(device)
            handle = symm_mem.rendezvous(buffer, group)
            self.buffers.append(buffer)  # held: the peers' copies of its address point into it
            return self.kernels.ExchangeSlots(torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device),
                                              torch.zeros(2, dtype=torch.int32, device=device), slot_numel, self.rank)

        self.buffers: list[torch.Tensor] = []
        # The all-reduce's, which a pushing GEMV also writes into (`push_target`).
        self.push_target = exchange_slots(slot_numel, dtype, -0.0)
        self.peers, self.rounds = self.push_target.peers, self.push_target.rounds
        self.candidate_exchange = exchange_slots(MAX_CANDIDATES, torch.int64, triton_sampling.EMPTY_CANDIDATE.value)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether one of the kernels sums x; the caller sends the rest to NCCL."""
        return self.fits_push(x) or self.fits_two_shot(x)

    def fits_one_shot(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and self.kernels.fits(x, self.one_shot_max_numel)

    def fits_push(self, x: torch.Tensor) -> bool:
        """Whether our kernel sums x, one-shot or two-shot (and so can add and normalize after)."""
        return self.fits_one_shot(x) or (
            self.two_shot_push and x.dtype == self.dtype and x.numel() <= self.max_numel
            and self.kernels.fits(x, self.push_target.slot_numel, self.world, two_shot=True))

    def fits_two_shot(self, x: torch.Tensor) -> bool:
        # The two-shot kernel moves 16-byte vectors: the size must be a whole number of them.
        return (x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.max_numel
                and (x.numel() * x.element_size()) % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (x must be taken: `takes`)."""
        return self.push(x) if self.fits_push(x) else self.two_shot(x)

    def pick(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """Each row's token from the ranks' sampling candidates [B, C] of their vocabulary shards
        (`albireo.kernels.triton_sampling.exchange_pick`); None when there are too many of them."""
        if scores.numel() > MAX_CANDIDATES:
            return None
        return self.sampling_kernels.exchange_pick(scores, indices, self.candidate_exchange)

    def compile_pick(self) -> None:
        """Compile the pick kernel now, by running it once, rather than in a first sampling step
        (a stall of tens of milliseconds mid-run, as the sampler's kernels once made in W1's first
        steps). A collective: every rank calls it, once all have this object."""
        one = torch.zeros(1, 1, device=self.peers.device)
        self.pick(one, one.to(torch.int32))
        torch.cuda.synchronize(self.peers.device)

    def two_shot(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.staging[: x.numel()]
        staged.copy_(x.reshape(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        x.view(-1).copy_(staged)
        return x

    def push(self, x: torch.Tensor, residual: torch.Tensor | None = None, weight: torch.Tensor | None = None,
             eps: float = 0.0, pushed: bool = False):
        """Our kernel's sum (x must fit it: `fits_push`), one-shot where that fits; with residual and
        weight, fused with add and RMSNorm. pushed: the GEMV that wrote x already sent it to the peers
        (through `push_target`)."""
        return self.kernels.push_all_reduce(x, self.peers, self.rounds, self.push_target.slot_numel, self.rank,
                                            residual, weight, eps, pushed=pushed, two_shot=not self.fits_one_shot(x))
