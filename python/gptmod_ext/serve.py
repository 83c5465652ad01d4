"""An OpenAI-compatible HTTP server with continuous batching, and a web playground.

    python -m gptmod_ext.serve --ckpt out/ [--host 127.0.0.1] [--port 8000] [--max-batch 16]
                               [--max-queue 64] [--api-key KEY] [--device] [--dtype] [--backend]

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET / (the playground page). The engine (engine.py) runs the model on its own thread; each
HTTP handler submits a request and reads its events from an asyncio.Queue that the engine
thread feeds through loop.call_soon_threadsafe.

Chat: the models are base models, so messages are rendered as plain text, one line per
message, "{role}: {content}\\n", followed by "assistant:"; generation stops at "\\nuser:"
(added to the request's own stop strings) so the model does not write the user's next turn.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for invalid
requests (bad JSON, a field of the wrong type or out of range, an empty prompt, prompt +
max_tokens beyond the context), 401 for a missing or wrong API key (every route except
/health and the static page), 404 for an unknown model name or route, 413 for a body over
--max-body-bytes (1 MB), 429 when every slot is busy and --max-queue requests already wait.
"""

import argparse
import asyncio
import hmac
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

try:
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # the one optional dependency group this module needs
    raise ImportError(f"gptmod_ext.serve needs fastapi and uvicorn: "
                      f"pip install 'gptmod_ext[serve]' ({e})") from None

from .engine import Engine, Event, QueueFull
from .protocol import (CHAT, CHAT_STOP, COMPLETIONS, SSE_DONE, Api, ApiError, Job,  # noqa: F401
                       parse_request, render_chat, response_head, sse, usage)

MAX_BODY_BYTES = 1 << 20
STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class ServerState:
    """What the routes need, kept on app.state.server."""
    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))


router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


# -- errors, auth, bodies ----------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _api_error(request, e: ApiError):
    return error_response(e)


async def _http_error(request, e):
    return error_response(ApiError(e.status_code, str(e.detail),
                                   "invalid_request_error" if e.status_code < 500 else "server_error"))


async def _validation_error(request, e):
    return error_response(ApiError(400, str(e)))


def authorize(request: Request) -> None:
    api_key = _state(request).api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key")


async def read_json(request: Request) -> Any:
    limit = _state(request).max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds bodies sent without a length
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


# -- talking to the engine ---------------------------------------------------------------------
def submit(engine: Engine, job: Job):
    """Submits to the engine; returns (engine request, asyncio.Queue of its events)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    try:
        req = engine.submit(job.prompt_ids, job.params,
                            lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                       code="queue_full") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return req, queue


async def next_event(request: Request, queue: asyncio.Queue) -> Optional[Event]:
    """The request's next event, or None once the client has gone away. Waking up now and
    then notices a disconnect even when no token is due (a long queue wait)."""
    if not queue.empty():  # the common case while tokens flow: no task, no timer
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    try:
        while True:
            # asyncio.wait (unlike wait_for) never cancels the getter on a timeout, so an
            # event that arrives just then cannot be lost.
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if done:
                return getter.result()
            if await request.is_disconnected():
                return None
    finally:
        if not getter.done():
            getter.cancel()


# -- generation routes -------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request):
    return await generate(request, COMPLETIONS)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await generate(request, CHAT)


async def generate(request: Request, api: Api):
    authorize(request)
    st = _state(request)
    body = await read_json(request)
    job = parse_request(body, api, st.tokenizer, st.engine.block_size, st.engine.max_batch,
                        st.model_name)
    req, queue = submit(st.engine, job)
    head = response_head(api, st.model_name, job.stream)
    if job.stream:
        return StreamingResponse(
            stream_events(request, api, req, queue, head, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    n = job.params.n
    texts, reasons = [""] * n, [None] * n
    try:
        while True:
            ev = await next_event(request, queue)
            if ev is None:  # nobody to answer; the finally clause frees the slots
                return Response(status_code=499)
            if ev.kind == "text":
                texts[ev.index] += ev.text
            elif ev.kind == "finish":
                reasons[ev.index] = ev.finish_reason
            elif ev.kind == "error":
                raise ApiError(500, ev.text, "server_error")
            elif ev.kind == "done":
                break
    finally:
        req.cancel()  # a no-op once finished; frees the slots of an abandoned request
    choices = [api.choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**head, "choices": choices, "usage": usage(ev.prompt_tokens, ev.completion_tokens)}


async def stream_events(request: Request, api: Api, req, queue, head: dict, job: Job):
    """The SSE body of a streamed (chat) completion."""
    n = job.params.n
    try:
        opening = api.opening(n)
        if opening:
            yield sse({**head, "choices": opening})
        finished = 0
        while True:
            ev = await next_event(request, queue)
            if ev is None:
                return
            if ev.kind == "text":
                if ev.text:
                    yield sse({**head, "choices": [api.delta(ev.index, ev.text)]})
            elif ev.kind == "finish":
                finished += 1
                pending_finish = (ev.index, ev.finish_reason)
                if finished < n:
                    yield sse({**head, "choices": [api.delta(ev.index, finish=ev.finish_reason)]})
            elif ev.kind == "done":
                for chunk in _final_chunks(api, head, pending_finish, ev, job.include_usage):
                    yield sse(chunk)
                break
            elif ev.kind == "error":
                yield sse(ApiError(500, ev.text, "server_error").body())
                break
        yield SSE_DONE
    finally:
        req.cancel()  # client gone (generator closed or cancelled) or finished: free slots


def _final_chunks(api: Api, head: dict, pending_finish, done: Event, include_usage: bool):
    u = usage(done.prompt_tokens, done.completion_tokens)
    i, reason = pending_finish
    last = {**head, "choices": [api.delta(i, finish=reason)]}
    if include_usage:  # OpenAI's form: a last chunk with no choices
        return [{**last, "usage": None}, {**head, "choices": [], "usage": u}]
    return [{**last, "usage": u}]  # usage rides on the final chunk


# -- the other routes --------------------------------------------------------------------------
@router.get("/v1/models")
async def models(request: Request):
    authorize(request)
    st = _state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model",
                                        "created": st.created, "owned_by": "gptmod_ext",
                                        "context_length": st.engine.block_size}]}


@router.get("/health")
async def health(request: Request):
    st = _state(request)
    return {"status": "ok", "model": st.model_name, "backend": st.engine.model.backend,
            "context_length": st.engine.block_size, **st.engine.stats()}


@router.get("/", response_class=HTMLResponse)
async def playground():
    return HTMLResponse((STATIC_DIR / "playground.html").read_text(encoding="utf-8"))


def create_app(engine: Engine, tokenizer, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="gptmod_ext", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, tokenizer, model_name, api_key, max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
    return app


# -- the command line --------------------------------------------------------------------------
def pick_backend(model, requested: str) -> str:
    """'auto': the ext ops when they load and run a cached step; otherwise the torch backend."""
    if requested != "auto":
        model.backend = requested
        return requested
    try:
        model.backend = "ext"
        cache = model.new_kv_cache(1, 2)
        import torch
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache)
        return "ext"
    except Exception as e:  # missing or stale build: say so once and serve with torch
        print(f"serve: ext backend unavailable ({str(e).splitlines()[0][:120]}); "
              f"using the torch backend", file=sys.stderr)
        model.backend = "torch"
        return "torch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptmod_ext.serve",
                                description="OpenAI-compatible server with continuous batching")
    p.add_argument("--ckpt", default="out", help="run directory (model.safetensors, config.json)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="concurrent sequences (KV cache slots)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond that, HTTP 429")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps while others decode "
                        "(bounds the stall a burst of new requests causes)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="the model id (default: the run dir name)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as saved)")
    p.add_argument("--backend", default="auto", choices=["auto", "ext", "torch"])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("serve: needs fastapi and uvicorn: pip install 'gptmod_ext[serve]'", file=sys.stderr)
        return 1
    from .checkpoint import CheckpointError, load_run

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        model, tok, _ = load_run(args.ckpt, device=args.device, dtype=args.dtype)
    except CheckpointError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    try:
        backend = pick_backend(model, args.backend)
        engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.max_queue,
                        prefill_budget=args.prefill_budget)
    except (ValueError, ImportError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    name = args.model_name or Path(args.ckpt).resolve().name
    app = create_app(engine, tok, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    engine.start()
    print(f"serve: model '{name}' ({backend} backend, {model.device}, {model.dtype}), "
          f"{args.max_batch} slots x {engine.block_size} tokens; "
          f"http://{args.host}:{args.port}/ (playground), /v1 (OpenAI API)", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
