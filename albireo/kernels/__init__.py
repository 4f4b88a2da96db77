"""Kernels: the torch reference (CPU, and the oracle) and the Triton versions used on CUDA.

`use_fused` is the A/B switch for the fused Triton norm/RoPE/activation kernels; the worker sets
it from EngineConfig.fused_kernels before the model runs.
"""

use_fused = True


def fused_on(x) -> bool:
    return use_fused and x.is_cuda
