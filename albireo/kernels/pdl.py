"""Programmatic dependent launch: the next kernel of a step is launched while this one still runs.

A batch-1 decode step is a chain of about ten short kernels per layer, and between two of them the
GPU used to drain the first grid before it started launching the second. On Hopper a kernel
launched with `launch_pdl=True` may start as soon as every program of the kernel before it has
called `griddepcontrol.launch_dependents`, so its launch and scheduling overlap that kernel's
work. Each kernel of the chain therefore calls `wait_for_previous` before it touches memory an
earlier kernel may write: it waits until the previous grid has finished (and its writes are
visible), and only then lets its own successor launch, so at most two grids are ever resident and
every kernel still reads and writes strictly after the one before it. What no kernel writes may be
read before the wait (the GEMV's first weight tile is), and so may what only kernels before the
previous one wrote: a kernel lets its successor launch only after its own wait has returned, so
when a kernel starts, every kernel but the one just before it has finished (the all-reduce after a
pushing GEMV reads the round and the residual early on that ground).

One exception, `launch_next_now`: a kernel whose successor reads nothing but weights before its own
wait (the decode merge, followed by o_proj's GEMV; the norm and the all-reduce, followed by a
projection) lets it launch at once, before waiting itself, so the GEMV's programs are resident and
streaming their first weight tiles while this kernel still waits on the one before it. Completion
stays ordered (every kernel waits before it ends, so a kernel past its wait knows all before it
ended); what is lost is the bound on resident grids, which is why the kernel after a pushing GEMV,
which reads the residual early, must never follow an early launcher. W3 at TP=2 on two H200s:
0.644 s against 0.658 (TP=1 1.099 against 1.100).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from albireo import kernels

_capable: dict[int, bool] = {}

_EARLY = tl.constexpr(kernels.early_launch)


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def launch_next_now(PDL: tl.constexpr):
    """Let the next kernel launch before this one waits (see the module's note): only in kernels
    whose successor reads nothing but weights before its own wait."""
    if PDL:
        if _EARLY:
            gdc_launch_dependents()


def enabled(x: torch.Tensor) -> bool:
    """Whether kernels on x's device launch with PDL (Hopper or newer, CUDA, kernels.use_pdl on)."""
    if not (kernels.use_pdl and x.is_cuda):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]
