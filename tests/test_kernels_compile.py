"""The kernels that only multi-GPU machines run compile for Hopper (sm_90) on this CPU machine:
Triton lowers them through its bundled ptxas, so a kernel that would not build fails here rather
than on the first GPU run of its path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMPILE_PUSH_ALL_REDUCE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from albireo.kernels.triton_all_reduce import _push_all_reduce_kernel

signature = {"x_ptr": "*bf16", "out_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "peers_ptr": "*i64",
             "round_ptr": "*i32", "rows": "i32", "slot_numel": "i32", "N": "i32", "eps": "fp32"}
for two_shot, pushed, has_norm in [(False, False, False), (False, False, True), (False, True, True),
                                   (True, False, False), (True, False, True)]:
    constants = {"RANK": 1, "WORLD": 4, "ROUNDS": 3, "WIDE": False, "HAS_NORM": has_norm, "BLOCK": 4096,
                 "PDL": True, "PUSHED": pushed, "TWO_SHOT": two_shot}
    source = ASTSource(_push_all_reduce_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"], (two_shot, pushed, has_norm)
print("compiled")
"""


# The norm after a copy-engine all-reduce adds one peer's part at two ranks and three at four.
COMPILE_NORM_WITH_ADDENDS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from albireo.kernels.triton_fused import _rms_norm_kernel

signature = {"x_ptr": "*bf16", "add_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
             "res_out_ptr": "*bf16", "B": "i32", "x_sa": "i32", "x_sb": "i32", "res_sa": "i32", "res_sb": "i32",
             "res_out_sa": "i32", "res_out_sb": "i32", "N": "i32", "eps": "fp32"}
for addends in (0, 1, 3):
    constants = {"ADDENDS": addends, "HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True}
    source = ASTSource(_rms_norm_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"], addends
print("compiled")
"""


def _compiles(script: str) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout + result.stderr[-3000:]


def test_push_all_reduce_compiles_for_hopper_one_shot_pushed_and_two_shot():
    _compiles(COMPILE_PUSH_ALL_REDUCE)


def test_norm_with_the_peers_parts_of_an_all_reduce_compiles_for_hopper():
    _compiles(COMPILE_NORM_WITH_ADDENDS)
