"""The engine core behind a small client interface: in this process, or in a process of its own.

`InprocClient` calls EngineCore directly (the offline `LLM` path: no copies, no sockets).
`MPClient` runs EngineCore in a child process with a busy loop and talks to it over two ZMQ
PUSH/PULL sockets on ipc:// paths in a private temp dir: requests and aborts go in, each step's
EngineCoreOutputs come back, so the frontend's text work never blocks the step loop.

Messages are small dataclasses encoded with pickle. The payloads are the engine's own
dataclasses (Request, SamplingParams, EngineCoreOutput); pickle carries them as they are, where
msgspec would need a parallel set of Struct types kept in sync by hand. There is one message per
request and one per step (not per token), both ends run the same code, and the sockets live in
a 0700 directory only this user can reach, so pickle's cost and trust model are acceptable here.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Protocol

import zmq

from albireo import heap
from albireo.config import EngineConfig
from albireo.core.scheduler import EngineCoreOutput
from albireo.engine.engine_core import EngineCore
from albireo.engine.request import Request

# How often an idle core process wakes to check that its parent still lives (not a busy spin).
_PARENT_CHECK_MS = 1000


class EngineDeadError(RuntimeError):
    """The engine core process is gone; requests in flight cannot finish."""


@dataclass
class CoreStats:
    """The core's load after its latest step, for gauges and admission control."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    # Prompt tokens found cached since start: in the device pool, and loaded from the host tier.
    prefix_hit_tokens: int = 0
    host_hit_tokens: int = 0


# ---- messages -----------------------------------------------------------------------------------


@dataclass
class _AddRequest:
    request: Request


@dataclass
class _Abort:
    req_ids: list[str]


@dataclass
class _Shutdown:
    pass


@dataclass
class _Ready:
    pass


@dataclass
class _Failed:
    """The core could not start (or crashed): the exception's type name and text, re-raised as such."""

    exc_type: str
    message: str
    during_startup: bool


@dataclass
class _Outputs:
    outputs: list[EngineCoreOutput]
    stats: CoreStats = field(default_factory=CoreStats)


# Startup errors re-raised in the frontend as the same type; anything else becomes RuntimeError.
_REBUILDABLE = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "NotImplementedError": NotImplementedError}


def _stats(core: EngineCore) -> CoreStats:
    s = core.scheduler
    return CoreStats(s.num_running, s.num_waiting, s.kv.usage, s.kv.num_prefix_hits, s.kv.num_host_hits)


# ---- the interface ------------------------------------------------------------------------------


class EngineCoreClient(Protocol):
    def add_request(self, request: Request) -> None: ...

    def abort_requests(self, req_ids: list[str]) -> None: ...

    def get_outputs(self, timeout: float | None = None) -> list[EngineCoreOutput] | None:
        """The next batch of outputs; None when `timeout` seconds passed with nothing."""
        ...

    def stats(self) -> CoreStats: ...

    def shutdown(self) -> None: ...


class InprocClient:
    """EngineCore in this process: get_outputs runs one step."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)

    # In-process callers (benchmarks, tests) inspect the core's parts directly.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def executor(self):
        return self.core.executor

    @property
    def timeline(self):
        return self.core.timeline

    def add_request(self, request: Request) -> None:
        self.core.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.core.abort_requests(req_ids)

    def get_outputs(self, timeout: float | None = None) -> list[EngineCoreOutput]:
        return self.core.step()

    def stats(self) -> CoreStats:
        return _stats(self.core)

    def shutdown(self) -> None:
        self.core.shutdown()


class MPClient:
    """EngineCore in a child process. Not thread-safe per direction: one thread may send (add,
    abort) while another receives (get_outputs), since each direction has its own socket."""

    def __init__(self, config: EngineConfig, startup_timeout: float | None = None) -> None:
        self._closed = False
        self._stats = CoreStats()
        self._dir = tempfile.mkdtemp(prefix="albireo-core-")  # mode 0700
        in_addr, out_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.bind(in_addr)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(out_addr)
        # spawn, not fork: the frontend may already run torch/OpenMP threads, which fork breaks.
        # Not a daemon: a core with tensor parallelism starts worker processes of its own.
        self.proc = mp.get_context("spawn").Process(
            target=run_engine_core, args=(config, in_addr, out_addr, os.getpid()), name="albireo-engine-core"
        )
        self.proc.start()
        atexit.register(self.shutdown)
        try:
            msg = self._recv(None if startup_timeout is None else startup_timeout * 1000)
        except EngineDeadError as e:
            self.shutdown()
            raise RuntimeError(f"the engine core process failed to start: {e}") from None
        if isinstance(msg, _Failed):
            self.shutdown()
            raise _REBUILDABLE.get(msg.exc_type, RuntimeError)(msg.message)
        if not isinstance(msg, _Ready):
            self.shutdown()
            raise RuntimeError(f"the engine core process did not start in {startup_timeout} s")

    def _send(self, msg: object) -> None:
        if self._closed:
            raise EngineDeadError("the engine is shut down")
        if not self.proc.is_alive():
            raise EngineDeadError(f"the engine core process died (exit code {self.proc.exitcode})")
        self._input.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _recv(self, timeout_ms: float | None) -> object | None:
        """One message, or None on timeout; watches the process so a dead core fails fast."""
        if self._closed:
            raise EngineDeadError("the engine is shut down")
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.proc.sentinel, zmq.POLLIN)  # readable once the process has exited
        events = dict(poller.poll(timeout_ms))
        if self._output in events:
            return pickle.loads(self._output.recv())
        if events:
            raise EngineDeadError(f"the engine core process died (exit code {self.proc.exitcode})")
        return None

    def add_request(self, request: Request) -> None:
        self._send(_AddRequest(request))

    def abort_requests(self, req_ids: list[str]) -> None:
        if req_ids and not self._closed and self.proc.is_alive():
            self._send(_Abort(list(req_ids)))

    def get_outputs(self, timeout: float | None = None) -> list[EngineCoreOutput] | None:
        msg = self._recv(None if timeout is None else timeout * 1000)
        if msg is None:
            return None
        if isinstance(msg, _Failed):
            raise EngineDeadError(f"the engine core failed: {msg.exc_type}: {msg.message}")
        assert isinstance(msg, _Outputs), msg
        self._stats = msg.stats
        return msg.outputs

    def stats(self) -> CoreStats:
        return self._stats

    def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has: no child outlives the frontend."""
        if self._closed:
            return
        try:
            if self.proc.is_alive():
                self._input.send(pickle.dumps(_Shutdown()), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._closed = True
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


# ---- the core process ---------------------------------------------------------------------------


def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str, parent_pid: int) -> None:
    """The child process's entry point: build the core, report ready or the error, then loop."""
    # Ctrl-C reaches the whole process group; the frontend decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(in_addr)
    out = ctx.socket(zmq.PUSH)
    out.connect(out_addr)

    def send(msg: object) -> None:
        out.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        try:
            core = EngineCore(config)
        except Exception as e:
            send(_Failed(type(e).__name__, str(e), during_startup=True))
            return
        heap.settle()  # this process ends with its engine: nothing frozen needs collecting later
        send(_Ready())
        try:
            _busy_loop(core, inp, send, parent_pid)
        except Exception as e:
            traceback.print_exc()
            send(_Failed(type(e).__name__, str(e), during_startup=False))
        finally:
            core.shutdown()
    finally:
        # Linger briefly so a last error message reaches the frontend before the sockets close.
        inp.close(linger=0)
        out.close(linger=2000)
        ctx.term()


def _busy_loop(core: EngineCore, inp: zmq.Socket, send, parent_pid: int) -> None:
    last_stats = None
    while True:
        if not core.has_unfinished_requests():
            # Idle: block on the input socket, waking now and then only to notice an orphaning.
            while not inp.poll(_PARENT_CHECK_MS):
                if os.getppid() != parent_pid:
                    return
        # Take everything that arrived before stepping, so new requests join this step's batch.
        while inp.poll(0):
            msg = pickle.loads(inp.recv())
            if isinstance(msg, _AddRequest):
                core.add_request(msg.request)
            elif isinstance(msg, _Abort):
                core.abort_requests(msg.req_ids)
            elif isinstance(msg, _Shutdown):
                return
        outputs = core.step() if core.has_unfinished_requests() else []
        stats = _stats(core)
        # Also report a change of load alone (an abort while idle frees blocks) for the gauges.
        if outputs or stats != last_stats:
            send(_Outputs(outputs, stats))
            last_stats = stats
