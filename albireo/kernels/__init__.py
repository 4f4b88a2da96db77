"""Kernels: the torch reference (CPU, and the oracle) and the Triton versions used on CUDA.

`use_fused` is the A/B switch for the fused Triton norm/RoPE/activation kernels; the worker sets
it from EngineConfig.fused_kernels before the model runs.
"""

import os

import torch

use_fused = True

# The A/B switch for programmatic dependent launch (albireo/kernels/pdl.py): ALBIREO_PDL=0 launches
# every kernel the ordinary way. Kept here, away from triton, so records can report it on any machine.
use_pdl = os.environ.get("ALBIREO_PDL", "1") != "0"
# ... and for letting a GEMV or a norm launch before the kernel ahead of it waits (`pdl.launch_next_now`):
# ALBIREO_EARLY_LAUNCH=0 keeps every trigger after its kernel's wait. Read when the kernels compile.
early_launch = os.environ.get("ALBIREO_EARLY_LAUNCH", "1") != "0"


def fused_on(x) -> bool:
    return use_fused and x.is_cuda


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (on CPU, where the interpreter runs, an H100's 132)."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def indexable(t: torch.Tensor) -> torch.Tensor:
    """t, or a view of its bytes where torch's index_copy_ and index_select have no kernel for its
    dtype (float8 on CPU: a KV cache of kv_cache_dtype fp8). Copying the bytes copies the values."""
    return t.view(torch.uint8) if t.dtype in FLOAT8 else t
