"""An OpenAI-compatible HTTP server with continuous batching, and a web playground.

    python -m gptmod_ext.serve --ckpt out/ [--host 127.0.0.1] [--port 8000] [--max-batch 16]
                               [--max-queue 64] [--api-key KEY] [--device] [--dtype] [--backend]
                               [--cors-origin URL] [--request-timeout S] [--shutdown-timeout S]

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes), GET /metrics
(Prometheus), GET / (the playground page). The engine (engine.py) runs the model on its own
thread; each HTTP handler submits one engine request per prompt and reads their events from an
asyncio.Queue that the engine thread feeds through loop.call_soon_threadsafe. The wire format
(parsing, choices, chunks, logprobs) is in protocol.py.

Chat: a model whose tokenizer has a chat template (a run trained on chat data, a Hugging Face
folder with one: chat.py) gets its messages rendered by that template, and a reply ends at the
end-of-text token. A base model's messages are rendered as plain text, one line per message,
"{role}: {content}\\n", followed by "assistant:"; generation stops at "\\nuser:" (added to the
request's own stop strings) so the model does not write the user's next turn.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for invalid
requests (bad JSON, a field of the wrong type or out of range, an empty prompt, prompt +
max_tokens beyond the context), 401 for a missing or wrong API key (every route except
/health, /metrics and the static page), 404 for an unknown model name or route, 413 for a body
over --max-body-bytes (1 MB), 429 when every slot is busy and --max-queue requests already
wait, 503 while shutting down, 504 when --request-timeout passed before any token (in a
stream, whose headers are already sent, that error is the last event).
"""

import argparse
import asyncio
import dataclasses
import functools
import hmac
import json
import signal
import sys
import threading
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
                      f"pip install fastapi uvicorn prometheus_client (the serve extra) ({e})") from None

from . import chat, decode
from .common import Parser, UserError, run_cli
from .devices import DTYPE_CHOICES
from .engine import Engine, Event, QueueFull
from .tokenizer import document_start
from .protocol import (CHAT, COMPLETIONS, SSE_DONE, Api, ApiError, ChatApi, ChoiceOutput, Job,
                       boolean, encode_text, parse_request, response_head, sse, usage)

MAX_BODY_BYTES = 1 << 20
STATIC_DIR = Path(__file__).resolve().parent / "static"


PROG = "python -m gptmod_ext.serve"

class Metrics:
    """The Prometheus series of one server (its own registry, so several apps can coexist)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptmod_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gptmod_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("gptmod_generation_tokens", "Tokens generated", registry=r)
        Gauge("gptmod_num_requests_running", "Sequences holding a KV cache slot",
              registry=r).set_function(lambda: engine.stats()["active_slots"])
        Gauge("gptmod_num_requests_waiting", "Requests waiting for a slot",
              registry=r).set_function(lambda: engine.stats()["waiting_requests"])
        buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("gptmod_time_to_first_token_seconds",
                              "From submission to a choice's first token", buckets=buckets, registry=r)
        self.itl = Histogram("gptmod_inter_token_latency_seconds",
                             "Between successive tokens of a choice", buckets=buckets, registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


@dataclass
class ServerState:
    """What the routes need, kept on app.state.server."""
    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout: Optional[float] = None
    chat: ChatApi = CHAT
    chat_template: Optional[str] = None  # the Hugging Face template string, for /tokenizer_info
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Optional[Metrics] = None
    draining: bool = False


router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


# -- errors, auth, bodies ----------------------------------------------------------------------
def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
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


class Lifecycle:
    """ASGI middleware: refuses new work while draining (503); counts requests by route and
    status. Plain ASGI rather than @app.middleware("http"), which would relay every chunk of
    a streamed response through an extra memory stream."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path = self.state, scope["path"]
        status = []

        async def send_status(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)
        try:
            if st.draining and path not in ("/health", "/metrics"):
                await error_response(ApiError(503, "the server is shutting down", "server_error",
                                              code="shutting_down"))(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            if st.metrics is not None and path != "/metrics":
                route = path if path in _ROUTES else "other"
                st.metrics.requests.labels(route, str(status[0] if status else 500)).inc()


# -- talking to the engine ---------------------------------------------------------------------
class Submission:
    """The engine requests of one HTTP request, one per prompt, and their merged events
    (prompt index, Event, time it was emitted)."""

    def __init__(self, st: ServerState, job: Job):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.reqs, self.metrics, self.remaining = [], st.metrics, len(job.prompts)
        self.prompt_tokens = self.completion_tokens = 0
        self._last: dict = {}
        params = job.params
        if st.request_timeout is not None:
            params = dataclasses.replace(params, timeout=st.request_timeout)
        try:
            for i, ids in enumerate(job.prompts):
                self.reqs.append(st.engine.submit(
                    ids, params, lambda ev, i=i: loop.call_soon_threadsafe(
                        self.queue.put_nowait, (i, ev, time.perf_counter()))))
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="queue_full") from None
        except ValueError as e:
            self.cancel()
            where = f"prompt[{len(self.reqs)}]: " if len(job.prompts) > 1 else ""
            raise ApiError(400, where + str(e), param="prompt" if where else None) from None

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()  # a no-op once finished; frees the slots of an abandoned request

    async def next(self, request: Request):
        """(prompt index, Event), or None once the client has gone away. An 'error' event
        cancels the other prompts; 'done' events are summed, and only the last one is passed on."""
        while True:
            item = await next_event(request, self.queue)
            if item is None:
                return None
            i, ev, t = item
            self._observe(i, ev, t)
            if ev.kind == "error":
                self.cancel()
            elif ev.kind == "done":
                self.remaining -= 1
                self.prompt_tokens += ev.prompt_tokens
                self.completion_tokens += ev.completion_tokens
                if self.remaining:
                    continue
            return i, ev

    def _observe(self, i: int, ev: Event, t: float) -> None:
        m = self.metrics
        if m is None:
            return
        if ev.kind == "text":
            key = (i, ev.index)
            last = self._last.get(key)
            (m.ttft if last is None else m.itl).observe(t - (last or self.reqs[i].submitted_at))
            self._last[key] = t
        elif ev.kind == "done":
            m.prompt_tokens.inc(ev.prompt_tokens)
            m.generation_tokens.inc(ev.completion_tokens)


async def next_event(request: Request, queue: asyncio.Queue):
    """The next item of queue, or None once the client has gone away. Waking up now and
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


def _event_error(ev: Event) -> ApiError:
    if ev.status == 504:
        return ApiError(504, ev.text, "timeout_error", code="request_timeout")
    return ApiError(ev.status, ev.text, "server_error")


# -- generation routes -------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request):
    return await generate(request, COMPLETIONS)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await generate(request, _state(request).chat)


async def generate(request: Request, api: Api):
    authorize(request)
    st = _state(request)
    body = await read_json(request)
    job = parse_request(body, api, st.tokenizer, st.engine.block_size, st.engine.max_batch,
                        st.model_name, st.engine.model.config.vocab_size)
    sub = Submission(st, job)
    n = job.params.n
    outs = [ChoiceOutput(api, st.tokenizer, i * n + j, ids, job.params)
            for i, ids in enumerate(job.prompts) for j in range(n)]
    head = response_head(api, st.model_name, job.stream)
    if job.stream:  # headers go out at once: a queued client knows it was accepted
        return StreamingResponse(
            stream_events(request, api, sub, outs, head, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, sub, outs, head, n)


def _apply(outs: list, n: int, i: int, ev: Event) -> Optional[ChoiceOutput]:
    """Feeds one event to its choice (every choice of prompt i for 'prompt'); returns it."""
    if ev.kind == "prompt":
        for j in range(n):
            outs[i * n + j].on_prompt(ev)
        return None
    out = outs[i * n + ev.index]
    if ev.kind == "text":
        out.on_text(ev)
    elif ev.kind == "finish":
        out.finish_reason = ev.finish_reason
    return out


async def collect(request: Request, sub: Submission, outs: list, head: dict, n: int):
    """The whole (non-streamed) response."""
    try:
        while True:
            item = await sub.next(request)
            if item is None:  # nobody to answer; the finally clause frees the slots
                return Response(status_code=499)
            i, ev = item
            if ev.kind == "error":
                raise _event_error(ev)
            if ev.kind == "done":
                break
            _apply(outs, n, i, ev)
    finally:
        sub.cancel()
    return {**head, "choices": [o.choice() for o in outs],
            "usage": usage(sub.prompt_tokens, sub.completion_tokens)}


async def stream_events(request: Request, api: Api, sub: Submission, outs: list, head: dict,
                        job: Job):
    """The SSE body of a streamed (chat) completion; the last choice to finish carries the
    usage (or, with include_usage, a last chunk with no choices does, as OpenAI's)."""
    n, finished, last = job.params.n, 0, None
    try:
        opening = api.opening(len(outs))
        if opening:
            yield sse({**head, "choices": opening})
        while (item := await sub.next(request)) is not None:
            i, ev = item
            if ev.kind == "error":
                yield sse(_event_error(ev).body())
                break
            if ev.kind == "done":
                u = usage(sub.prompt_tokens, sub.completion_tokens)
                if job.include_usage:
                    yield sse({**head, "choices": [last.delta(finish=True)], "usage": None})
                    yield sse({**head, "choices": [], "usage": u})
                else:
                    yield sse({**head, "choices": [last.delta(finish=True)], "usage": u})
                break
            out = _apply(outs, n, i, ev)
            for o in ([out] if out is not None else outs[i * n:(i + 1) * n]):
                if ev.kind == "finish":
                    finished += 1
                    if finished == len(outs):
                        last = o  # held for the final chunk
                        continue
                chunk = o.delta(finish=ev.kind == "finish")
                if chunk is not None:
                    yield sse({**head, "choices": [chunk]})
        else:
            return  # the client went away
        yield SSE_DONE
    finally:
        sub.cancel()  # client gone (generator closed or cancelled) or finished: free slots


# -- tokenizer routes (vLLM's request and response shapes) -------------------------------------
@router.post("/tokenize")
async def tokenize(request: Request):
    authorize(request)
    st = _state(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if "messages" in body:
        ids = st.chat.prompts(body, st.tokenizer)[0]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
        hf = getattr(st.tokenizer, "hf", None)  # ours adds no BOS: nothing to switch off
        ids = (hf.encode(prompt, add_special_tokens=boolean(body, "add_special_tokens", True))
               if hf is not None else encode_text(st.tokenizer, prompt, "prompt"))
    return {"count": len(ids), "max_model_len": st.engine.block_size, "tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request):
    authorize(request)
    st = _state(request)
    body = await read_json(request)
    tokens = body.get("tokens") if isinstance(body, dict) else None
    vocab = st.tokenizer.vocab_size
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                             and 0 <= t < vocab for t in tokens)):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
    return {"prompt": st.tokenizer.decode(tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    authorize(request)
    st = _state(request)
    return tokenizer_description(st.tokenizer, st.engine.block_size, st.chat_template)


def tokenizer_description(tok, block_size: int, chat_template: Optional[str]) -> dict:
    """vLLM's /tokenizer_info fields for our tokenizer or a Hugging Face one."""
    if hasattr(tok, "special_tokens"):  # ours: <|endoftext|> ends and separates documents
        # (a char vocabulary has none)
        eot = next((s for s, i in tok.special_tokens.items() if i == tok.eot_id), None)
        specials = dict(tok.special_tokens)
        eos, bos, pad, name = eot, None, None, f"gptmod_ext.{tok.kind}"
    else:
        hf = getattr(tok, "hf", tok)
        eos, bos, pad = hf.eos_token, hf.bos_token, hf.pad_token
        specials = {t: hf.convert_tokens_to_ids(t) for t in hf.all_special_tokens}
        name = type(hf).__name__
    return {"tokenizer_class": name, "vocab_size": tok.vocab_size, "model_max_length": block_size,
            "eos_token": eos, "bos_token": bos, "pad_token": pad, "special_tokens": specials,
            "chat_template": chat_template}


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
    body = {"status": "draining" if st.draining else "ok", "model": st.model_name,
            "backend": st.engine.model.backend, "context_length": st.engine.block_size,
            **st.engine.stats()}
    return JSONResponse(body, status_code=503 if st.draining else 200)


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse)
async def playground(request: Request):
    start = document_start(_state(request).tokenizer)
    page = (STATIC_DIR / "playground.html").read_text(encoding="utf-8")
    return HTMLResponse(page.replace("__DOC_START__", "" if start is None else str(start)))


_ROUTES = {r.path for r in router.routes}


def create_app(engine: Engine, tokenizer, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES, request_timeout: Optional[float] = None,
               cors_origins: Optional[list] = None, chat_template: Optional[str] = None,
               render_template=None) -> FastAPI:
    """The FastAPI app around a started or not yet started engine. render_template: messages ->
    prompt text (a Hugging Face chat template), used instead of render_chat."""
    app = FastAPI(title="gptmod_ext", docs_url=None, redoc_url=None, openapi_url=None)
    chat = ChatApi(render_template) if render_template else CHAT
    app.state.server = ServerState(engine, tokenizer, model_name, api_key, max_body_bytes,
                                   request_timeout, chat, chat_template, metrics=Metrics(engine))
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(Lifecycle, state=app.state.server)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(router)
    return app


# -- the command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="OpenAI-compatible server with continuous batching")
    p.add_argument("--ckpt", default="out",
                   help="a run directory (model.safetensors, config.json), a Hugging Face folder, "
                        "or a nanoGPT ckpt.pt / nanoGPT-moderno model_XXXXX.pt (or its directory)")
    p.add_argument("--tokenizer-path", default=None, metavar="PATH",
                   help="for a nanoGPT/moderno checkpoint: its meta.pkl, or GPT-2's tokenizer files")
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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bfloat16 on GPUs that support it, else float32 (as the sampler)")
    p.add_argument("--backend", default="auto", choices=["auto", "ext", "torch"],
                   help="ext: our compiled ops; torch: pure PyTorch; auto: ext where it can run")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 helps on a busy machine)")
    decode.add_arguments(p)
    p.add_argument("--cors-origin", action="append", default=None, metavar="URL",
                   help="allow browser pages from this origin (repeatable; '*' for any; off by default)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="end a request still running after S seconds (finish_reason 'length', "
                        "or HTTP 504 if nothing was generated yet)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, refuse new requests (503) and let running ones finish for "
                        "up to S seconds, then exit")
    return p


class _DrainingServer:
    """uvicorn.Server whose SIGTERM drains first: new requests get 503 while the engine
    finishes what it holds (up to shutdown_timeout), then the server exits with status 0."""

    @staticmethod
    def make(config, state: ServerState, shutdown_timeout: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if sig != signal.SIGTERM:
                    return super().handle_exit(sig, frame)
                if not state.draining:  # not re-raised after shutdown: the exit status stays 0
                    state.draining = True
                    threading.Thread(target=self._drain, daemon=True).start()

            def _drain(self):
                deadline = time.monotonic() + shutdown_timeout
                while time.monotonic() < deadline and not state.engine.scheduler.idle():
                    time.sleep(0.05)
                self.should_exit = True
        return Server(config)


def chat_template(tok):
    """(template string, messages -> prompt ids) of a tokenizer that has a chat template (a
    Hugging Face folder's, or a run's: chat.py); (None, None) otherwise (render_chat's plain
    text is used)."""
    template = chat.template_of(tok)
    if not template:
        return None, None
    return template, functools.partial(chat.prompt_ids, tok)


def build_app(args) -> tuple:
    """(app, engine, banner) from the command line; CheckpointError or ValueError on a bad one."""
    from .checkpoint import load_model

    model, tok, info = load_model(args.ckpt, args.device, args.dtype, args.backend,
                                  tokenizer_path=args.tokenizer_path)
    if info.backend_note:
        print(f"serve: ext backend unavailable ({info.backend_note}); using the torch backend",
              file=sys.stderr)
    decode.configure(model, args)
    engine = Engine(model, tok, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_budget=args.prefill_budget)
    ckpt = Path(args.ckpt).resolve()
    # A checkpoint file (nanoGPT's out_dir/ckpt.pt) is named after its directory, as the run is.
    name = args.model_name or (ckpt.parent.name if ckpt.is_file() else ckpt.name)
    template, render = chat_template(tok)
    app = create_app(engine, tok, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.request_timeout, cors_origins=args.cors_origin,
                     chat_template=template, render_template=render)
    banner = (f"serve: model '{name}' ({info.kind}, {model.backend} backend, {model.device}, "
              f"{model.dtype}, decode: {model.decoder.describe(model)}"
              f"{', its chat template' if template else ''}), {args.max_batch} slots x "
              f"{engine.block_size} tokens; http://{args.host}:{args.port}/ (playground), "
              f"/v1 (OpenAI API)")
    return app, engine, banner


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: serve(args))


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("needs fastapi and uvicorn: pip install fastapi uvicorn prometheus_client (the serve extra)") from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    app, engine, banner = build_app(args)
    engine.start()
    print(banner, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=2)
    try:
        _DrainingServer.make(config, app.state.server, args.shutdown_timeout).run()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
