"""Running Triton kernels on the CPU through Triton's interpreter, for tests.

The interpreter must be on (TRITON_INTERPRET=1) before triton is first imported, and switching a
process that runs real GPU kernels would break them. So a test module runs its kernel tests in
this process when the interpreter is (or can still be) on, and otherwise re-runs itself in a
child process with TRITON_INTERPRET=1 (see `run_in_subprocess`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch


def interpreter_usable() -> bool:
    if "triton" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.sum, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()


def enable() -> bool:
    """Switch the interpreter on if this process can use it; returns whether it did."""
    if not interpreter_usable():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_index()
    return True


def _patch_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an int with int(array of shape (1,)), which
    NumPy >= 2.4 rejects, so `range(lo, hi)` over runtime scalars fails (triton-lang/triton#9171).
    Re-define that one conversion to go through .item(); harmless where the bug is fixed."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_albireo_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._albireo_index_fix = True
    interpreter._patch_lang_tensor = patched


def run_in_subprocess(test_file: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def subprocess_test(test_file: str, in_process: bool):
    """A kernel test module's stand-in where triton is compiled: re-runs the module in a child
    process with the interpreter on; skipped where this process runs the module's tests itself.
    Assign it to a `test_` name in the module."""

    @pytest.mark.skipif(in_process, reason="the tests run in this process")
    def test_in_interpreter_subprocess():
        run_in_subprocess(test_file)

    return test_in_interpreter_subprocess


def only_interpreted(in_process: bool):
    """Marks the tests that need this process to run the interpreter."""
    return pytest.mark.skipif(not in_process, reason="triton is compiled here; the subprocess test runs these")


def require_triton() -> None:
    """Skip the calling test module where triton is not installed, without importing it (an import
    now would come before the interpreter could be switched on)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)


def kernel_test_module(test_file: str):
    """The set-up of a kernel test module, called at its top before it imports any kernel: returns
    (whether its tests run in this process, the marker for those tests, the stand-in test that
    re-runs the module in a child process, to assign to a `test_` name)."""
    require_triton()
    in_process = enable()
    return in_process, only_interpreted(in_process), subprocess_test(test_file, in_process)


def spawn_ranks(target, world: int, *args, timeout: float = 300) -> list[int]:
    """Run target(rank, *args) in `world` spawned processes, stand-ins for GPUs that share memory
    (each must switch the interpreter on itself); returns their exit codes, killing any still
    running after `timeout` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
