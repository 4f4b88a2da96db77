"""An asyncio frontend for the server: LLMEngine's text work over an engine core in its own process.

A reader thread blocks on the core's output socket and hands each batch to the event loop; the
loop detokenizes it (LLMEngine.process_outputs) and puts each changed RequestOutput on its
request's queue. All LLMEngine state is touched from the event loop thread only; the thread only
moves raw EngineCoreOutputs across.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from albireo.config import EngineConfig
from albireo.core.scheduler import EngineCoreOutput
from albireo.engine.client import CoreStats, EngineDeadError, MPClient
from albireo.engine.llm_engine import LLMEngine, PromptType
from albireo.outputs import RequestOutput
from albireo.sampling_params import SamplingParams

# How long the reader thread waits on the socket before looking at its stop flag.
_READER_POLL_S = 0.2


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        # The core process starts first: it loads the weights while this process loads the tokenizer.
        self.client = MPClient(config)
        try:
            self.engine = LLMEngine(config, client=self.client)
        except BaseException:
            self.client.shutdown()
            raise
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # Requests accepted whose first token has not come back: the frontend's view of the queue.
        self._unstarted: set[str] = set()
        self._dead: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    # ---- read-only views ----------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_unstarted(self) -> int:
        return len(self._unstarted)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def stats(self) -> CoreStats:
        return self.client.stats()

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start pulling outputs; call from the event loop that will run generate().

        Called again from another loop (a new asyncio.run), the reader moves to that loop.
        """
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader.is_alive() and self._loop is loop:
            return
        self._stop_reader()
        self._loop = loop
        self._reader = threading.Thread(target=self._read_outputs, name="albireo-output-reader", daemon=True)
        self._reader.start()

    def _stop_reader(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join()
        self._reader = None
        self._stop.clear()

    def shutdown(self) -> None:
        self._stop_reader()
        self.client.shutdown()
        self._fail_all(EngineDeadError("the engine is shutting down"))

    def _read_outputs(self) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stop.is_set():
            try:
                outputs = self.client.get_outputs(timeout=_READER_POLL_S)
            except Exception as e:  # the core is gone, or its messages cannot be read: nothing more will come
                if not self._stop.is_set():
                    dead = e if isinstance(e, EngineDeadError) else EngineDeadError(f"reading the engine's outputs failed: {e!r}")
                    self._deliver(loop, self._fail_all, dead)
                return
            if outputs and not self._deliver(loop, self._dispatch, outputs):
                return

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, fn, arg) -> bool:
        """Hand fn(arg) to the event loop; False when the loop has closed (nobody is left to deliver to)."""
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            return False
        return True

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        for out in self.engine.process_outputs(outputs):
            self._unstarted.discard(out.request_id)
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        self._dead = self._dead or error
        for queue in self._queues.values():
            queue.put_nowait(error)

    # ---- requests -----------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams, add_special_tokens: bool = True
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's state as it grows; the last item has finished set.

        The same RequestOutput object is yielded each time, grown in place: a consumer takes
        deltas by remembering how much text and how many tokens it has already seen. Updates that
        arrive while the consumer is busy are coalesced into one. Leaving the loop early (client
        gone, task cancelled) aborts the request and frees its KV blocks.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        # Raises ValueError (prompt too long, bad token ids, duplicate id) before anything is queued.
        self.engine.add_request(request_id, prompt, params, add_special_tokens)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._unstarted.add(request_id)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                while not isinstance(item, BaseException) and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._unstarted.discard(request_id)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._unstarted.discard(request_id)
        if self._dead is None:
            try:
                self.engine.abort_request(request_id)
            except EngineDeadError:
                pass
