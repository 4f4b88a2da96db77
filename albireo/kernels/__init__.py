"""Kernels: the torch reference (CPU, and the oracle) and the Triton versions used on CUDA.

`use_fused` is the A/B switch for the fused Triton norm/RoPE/activation kernels; the worker sets
it from EngineConfig.fused_kernels before the model runs.
"""

import os

use_fused = True

# The A/B switch for programmatic dependent launch (albireo/kernels/pdl.py): ALBIREO_PDL=0 launches
# every kernel the ordinary way. Kept here, away from triton, so records can report it on any machine.
use_pdl = os.environ.get("ALBIREO_PDL", "1") != "0"


def fused_on(x) -> bool:
    return use_fused and x.is_cuda
