"""The OpenAI-compatible HTTP server: FastAPI in front of an AsyncLLMEngine.

Every error leaves as OpenAI's JSON error shape with a fitting status; tracebacks stay in the
server's log. A streamed request whose client goes away is aborted, freeing its KV blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from albireo.engine.async_llm import AsyncLLMEngine
from albireo.engine.client import EngineDeadError
from albireo.entrypoints.openai.metrics import RequestTimer, ServerMetrics
from albireo.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from albireo.outputs import CompletionOutput, RequestOutput
from albireo.sampling_params import SamplingParams

logger = logging.getLogger("albireo.server")

# How often a non-streamed request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25

# Field names a ValueError's text may start with: they become the error's `param`. Every message of
# SamplingParams and LLMEngine.validate starts with the field it is about.
_PARAM_NAMES = set(SamplingParams.__dataclass_fields__) | {"prompt", "messages", "max_completion_tokens", "top_logprobs"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, type_, param, code), status_code=status, headers=headers)


def _bad_value(e: ValueError) -> APIError:
    """A SamplingParams or engine ValueError as a 400 naming the field its text starts with."""
    text = str(e)
    match = re.match(r"(\w+)", text)
    param = match.group(1) if match and match.group(1) in _PARAM_NAMES else None
    return APIError(400, text, "BadRequestError", param)


def _version() -> str:
    try:
        return version("albireo")
    except PackageNotFoundError:
        return "unknown"


# ---- output shapes --------------------------------------------------------------------------------


def _ranked(entry: dict, k: int) -> tuple[tuple[str, float], list[tuple[str, float]]]:
    """One position's logprobs as (text, logprob): the sampled token (an entry's first item), and
    the k most likely by rank."""
    def text_and_logprob(item) -> tuple[str, float]:
        token_id, lp = item
        return (lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"), lp.logprob

    top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
    return text_and_logprob(next(iter(entry.items()))), [text_and_logprob(item) for item in top]


def _chat_logprobs(entries: list[dict], k: int) -> list[dict]:
    content = []
    for entry in entries:
        (text, logprob), top = _ranked(entry, k)
        content.append({
            "token": text,
            "logprob": logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
        })
    return content


def _completion_logprobs(entries: list[dict], k: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for entry in entries:
        (text, logprob), top = _ranked(entry, k)
        tokens.append(text)
        token_lps.append(logprob)
        tops.append(dict(top))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- the app --------------------------------------------------------------------------------------


class OpenAIServer:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], api_key: str | None = None,
                 max_queue: int | None = None) -> None:
        self.engine = engine
        self.model_names = served_model_names
        self.api_key = api_key
        self.max_queue = max_queue
        self.metrics = ServerMetrics(served_model_names[0])
        self.created = int(time.time())

    # -- admission --

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")

    def _check_capacity(self) -> None:
        if self.engine.is_dead:
            raise APIError(503, "the engine is not running", "ServiceUnavailableError")
        if self.max_queue is not None and self.engine.num_unstarted >= self.max_queue:
            raise APIError(
                429, f"the server is at capacity ({self.max_queue} requests waiting): retry later",
                "RateLimitError", headers={"Retry-After": "1"},
            )

    def _prepare(self, prompts: list[str | list[int]], params: SamplingParams, add_special_tokens: bool,
                 param: str = "prompt") -> list[list[int]]:
        """Tokenize and validate every prompt before any starts, so errors come back as a 400, not
        mid-stream; returns their token ids, which the requests then run on."""
        engine = self.engine.engine
        prompt_ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                try:  # JSON's \ud800 escapes decode to lone surrogates, which the tokenizer rejects with a TypeError
                    prompt.encode()
                except UnicodeEncodeError as e:
                    raise APIError(400, f"{param} is not valid Unicode text: {e.reason} at character {e.start}",
                                   "BadRequestError", param) from None
            try:
                prompt_ids.append(engine.tokenize(prompt, add_special_tokens))
                engine.validate(prompt_ids[-1], params)
            except ValueError as e:
                raise _bad_value(e) from None
        return prompt_ids

    # -- running requests --

    async def _run(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run all prompts (token ids from `_prepare`) concurrently; yields (prompt index, its output
        so far) as they change."""
        queue: asyncio.Queue = asyncio.Queue()
        base = uuid.uuid4().hex

        async def pump(i: int, prompt) -> None:
            timer = RequestTimer(self.metrics)
            last = None
            try:
                async for out in self.engine.generate(f"{base}-{i}", prompt, params):
                    timer.update(out)
                    last = out
                    await queue.put((i, out))
                timer.finish(last)
            except asyncio.CancelledError:
                timer.finish(last, aborted=True)
                raise
            except BaseException as e:
                timer.finish(last, aborted=True)
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            # The client left or something failed: generate()'s cleanup aborts the requests.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]], raw: Request | None,
                       ) -> dict[int, RequestOutput]:
        """The final output of each prompt; aborts them all if the client hangs up while waiting."""
        finals: dict[int, RequestOutput] = {}

        async def consume() -> None:
            async for i, out in outputs:
                finals[i] = out

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if not task.done() and raw is not None and await raw.is_disconnected():
                task.cancel()  # _run's cleanup aborts the requests, freeing their KV blocks
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "the client closed the connection", "ClientClosedRequest")
        task.result()  # re-raises what the requests failed with
        return finals

    async def completions(self, req: CompletionRequest, raw: Request | None = None) -> Response:
        self._check_model(req.model)
        try:
            params = req.to_sampling_params()
        except ValueError as e:
            raise _bad_value(e) from None
        if req.echo:
            raise APIError(400, "echo is not supported", "BadRequestError", "echo")
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", "BadRequestError", "prompt")
        self._check_capacity()
        prompts = self._prepare(prompts, params, True)
        rid, model = f"cmpl-{uuid.uuid4().hex}", req.model or self.model_names[0]
        k = req.logprobs or 0

        def choice(i: int, c: CompletionOutput, text: str, entries: list | None, offset: int) -> dict:
            lps = None if entries is None else _completion_logprobs(entries, k, offset)
            return {"index": i * params.n + c.index, "text": text, "logprobs": lps,
                    "finish_reason": c.finish_reason if c.finished else None, "stop_reason": c.stop_reason}

        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        if req.stream:
            return self._sse(self._stream_completion(prompts, params, base, choice, req))
        finals = await self._collect(self._run(prompts, params), raw)
        outs = [finals[i] for i in range(len(prompts))]
        choices = [choice(i, c, c.text, c.logprobs, 0) for i, o in enumerate(outs) for c in o.outputs]
        return JSONResponse({**base, "choices": choices, "usage": _usage(outs)})

    async def _stream_completion(self, prompts, params, base, choice, req) -> AsyncIterator[dict]:
        finals: dict[int, RequestOutput] = {}
        async for i, out, c, text, entries, chars in self._deltas(prompts, params):
            finals[i] = out
            yield {**base, "choices": [choice(i, c, text, entries, chars)]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": _usage([finals[i] for i in sorted(finals)])}

    async def _deltas(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[tuple]:
        """What each sample gained since it was last shown: (prompt index, its RequestOutput, the
        CompletionOutput, new text, new logprob entries or None without logprobs, characters shown
        before). An update with nothing to show (tokens that are part of a UTF-8 character) is
        skipped; a finished sample is shown once more, then never."""
        sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, sample) -> (chars, tokens) shown
        done: set[tuple[int, int]] = set()
        async for i, out in self._run(prompts, params):
            for c in out.outputs:
                key = (i, c.index)
                chars, toks = sent.get(key, (0, 0))
                if key in done:
                    continue
                if len(c.text) == chars and not c.finished and (c.logprobs is None or len(c.token_ids) == toks):
                    continue
                entries = None if c.logprobs is None else c.logprobs[toks:]
                yield i, out, c, c.text[chars:], entries, chars
                sent[key] = (len(c.text), len(c.token_ids))
                if c.finished:
                    done.add(key)

    async def chat(self, req: ChatCompletionRequest, raw: Request | None = None) -> Response:
        self._check_model(req.model)
        try:
            params = req.to_sampling_params()
            conversation = req.conversation()
        except ValueError as e:
            raise _bad_value(e) from None
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise APIError(400, "the model has no chat template", "BadRequestError", "messages")
        try:
            prompt = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=req.add_generation_prompt
            )
        except Exception as e:  # jinja errors: the template rejected these messages
            raise APIError(400, f"the chat template failed on these messages: {e}", "BadRequestError",
                           "messages") from None
        self._check_capacity()
        # The template spells out BOS and the other special tokens itself.
        [prompt] = self._prepare([prompt], params, False, param="messages")
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", req.model or self.model_names[0]
        k = req.top_logprobs or 0
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model}
        if req.stream:
            return self._sse(self._stream_chat(prompt, params, {**base, "object": "chat.completion.chunk"}, k, req))
        final = (await self._collect(self._run([prompt], params), raw))[0]
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": None if c.logprobs is None else {"content": _chat_logprobs(c.logprobs, k)},
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            for c in final.outputs
        ]
        return JSONResponse({**base, "choices": choices, "usage": _usage([final])})

    async def _stream_chat(self, prompt, params, base, k, req) -> AsyncIterator[dict]:
        for index in range(params.n):
            yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        final = None
        async for _, final, c, text, entries, _ in self._deltas([prompt], params):  # noqa: B007 (its last value)
            lps = None if entries is None else {"content": _chat_logprobs(entries, k)}
            delta = {"content": text} if text else {}
            yield {**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lps,
                                        "finish_reason": c.finish_reason if c.finished else None}]}
        if req.stream_options and req.stream_options.include_usage and final is not None:
            yield {**base, "choices": [], "usage": _usage([final])}

    def _sse(self, chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(_error_body(e.message, e.type, e.param, e.code))}\n\n"
            except ValueError as e:
                err = _bad_value(e)
                yield f"data: {json.dumps(_error_body(err.message, err.type, err.param))}\n\n"
            except EngineDeadError as e:
                yield f"data: {json.dumps(_error_body(str(e), 'ServiceUnavailableError'))}\n\n"
            except Exception:
                logger.exception("streaming request failed")
                yield f"data: {json.dumps(_error_body('internal server error', 'InternalServerError'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")


def build_app(server: OpenAIServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.shutdown()

    app = FastAPI(title="Albireo", lifespan=lifespan)
    engine = server.engine

    # A dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware wraps `receive`, which
    # hides a client's disconnect from the handlers that watch for it.
    async def check_api_key(request: Request) -> None:
        if server.api_key is not None and request.headers.get("authorization") != f"Bearer {server.api_key}":
            raise APIError(401, "missing or invalid API key", "AuthenticationError", None, "invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        if err.get("type") == "json_invalid":
            return _error_response(400, f"malformed JSON body: {err.get('msg', '')}", "BadRequestError")
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        where = param or "request body"
        return _error_response(400, f"{where}: {err.get('msg', 'invalid value')}", "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "NotFoundError" if e.status_code == 404 else "BadRequestError")

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, e: ValueError):
        err = _bad_value(e)
        return _error_response(err.status, err.message, err.type, err.param)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        return _error_response(503, f"the engine is not running: {e}", "ServiceUnavailableError")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        logger.exception("request failed")
        return _error_response(500, "internal server error", "InternalServerError")

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(req: CompletionRequest, raw: Request):
        return await server.completions(req, raw)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await server.chat(req, raw)

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    async def models():
        data = [{"id": name, "object": "model", "created": server.created, "owned_by": "albireo",
                 "max_model_len": engine.max_model_len} for name in server.model_names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if engine.is_dead:
            return _error_response(503, "the engine is not running", "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/version")
    async def version_():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        body = server.metrics.render(engine.stats())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---- the command ----------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    from albireo.config import engine_config
    from albireo.entrypoints.cli import engine_args

    config = engine_config(**engine_args(args))

    names = args.served_model_name or [Path(args.model).name if args.model else "albireo-default"]
    if args.model and args.model not in names:
        names.append(args.model)  # the path itself is accepted as the model's name too
    engine = AsyncLLMEngine(config)  # startup errors surface here, before the port opens
    server = OpenAIServer(engine, names, args.api_key, args.max_queue)
    try:
        uvicorn.run(
            build_app(server), host=args.host, port=args.port, log_level=args.log_level,
            timeout_graceful_shutdown=args.graceful_shutdown_timeout,
        )
    finally:
        engine.shutdown()  # a no-op when the lifespan already shut it down
