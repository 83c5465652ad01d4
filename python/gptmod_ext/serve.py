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
import uuid
from pathlib import Path
from typing import Any, Optional

from .engine import Engine, Event, QueueFull, SamplingParams

CHAT_STOP = "\nuser:"
MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4
STATIC_DIR = Path(__file__).resolve().parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# -- the chat template -------------------------------------------------------------------------
def render_chat(messages: list[dict]) -> str:
    """'{role}: {content}\\n' for each message, then 'assistant:' (the model continues it)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


# -- request validation ------------------------------------------------------------------------
def _number(body, name, lo, hi, default, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    # bool is an int in Python; JSON true is not a number.
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise ApiError(400, f"'{name}' must be {lo_s} and <= {hi}, got {v}", param=name)
    return v


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {json.dumps(v)[:40]}", param=name)
    return v


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(v) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return [s for s in v if s]


def _unsupported(body) -> None:
    # Accepted at their neutral values (clients send them by default); anything else is refused
    # rather than silently ignored.
    for name, neutral in (("logprobs", (None, False)), ("top_logprobs", (None, 0)),
                          ("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, "")),
                          ("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
                          ("logit_bias", (None, {})), ("tools", (None, [])),
                          ("response_format", (None, {"type": "text"}))):
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")


def _message_text(m, i) -> dict:
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object", param="messages")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        raise ApiError(400, f"messages[{i}].role must be a non-empty string", param="messages")
    if isinstance(content, list):  # OpenAI's content parts: only text parts make sense here
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content parts must be text parts",
                               param="messages")
            parts.append(p["text"])
        content = "".join(parts)
    if content is None and role == "assistant" and "content" in m:  # an empty assistant turn
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
    return {"role": role, "content": content}


def parse_request(body: Any, chat: bool, tokenizer, block_size: int, max_batch: int,
                  model_name: str):
    """The JSON body of a (chat) completion request -> (prompt ids, SamplingParams, stream,
    include_usage). Raises ApiError naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model not in (None, model_name):
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"'{model_name}'", param="model", code="model_not_found")
    _unsupported(body)
    stop = _stop(body)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
        ids = tokenizer.encode(render_chat([_message_text(m, i) for i, m in enumerate(messages)]))
        stop = stop + [CHAT_STOP]
        field = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            ids = tokenizer.encode(prompt)
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            ids = prompt  # token ids
            if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
                raise ApiError(400, f"'prompt' token ids must be in [0, {tokenizer.vocab_size})",
                               param="prompt")
        elif prompt is None or prompt == []:
            raise ApiError(400, "'prompt' is required and must not be empty", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, a list with one string, or a list of "
                                "token ids (one prompt per request)", param="prompt")
        field = "prompt"
    room = block_size - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens long; the model's context is "
                            f"{block_size} tokens, which leaves no room to generate",
                       param=field, code="context_length_exceeded")
    default_max = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, name, 1, 1 << 30, default_max, integer=True)
    if len(ids) + max_tokens > block_size:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {name} ({max_tokens}) is "
                            f"{len(ids) + max_tokens} tokens, more than the model's context of "
                            f"{block_size} tokens", param=name, code="context_length_exceeded")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=_number(body, "top_k", -1, 1 << 20, 0, integer=True),
        min_p=_number(body, "min_p", 0.0, 1.0, 0.0),
        seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True),
        n=_number(body, "n", 1, max_batch, 1, integer=True),
        stop=stop)
    params.top_k = max(params.top_k, 0)  # -1 (vLLM's "off") and 0 both mean no top-k
    # An extension (as vLLM's): keep going past <|endoftext|>, for fixed-length benchmarks.
    params.stop_at_eos = not _bool(body, "ignore_eos")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = _bool(opts or {}, "include_usage")
    return ids, params, stream, include_usage


# -- the app -----------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="gptmod_ext", docs_url=None, redoc_url=None, openapi_url=None)
    block_size = engine.block_size
    created = int(time.time())

    def error_response(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return error_response(ApiError(e.status_code, str(e.detail),
                                       "invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error_response(ApiError(400, str(e)))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without a length
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    def submit(ids, params):
        """Submits to the engine; returns (engine request, asyncio.Queue of its events)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        try:
            req = engine.submit(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
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

    def usage(prompt_tokens, completion_tokens) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def handle(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request)
        ids, params, stream, include_usage = parse_request(
            body, chat, tokenizer, block_size, engine.max_batch, model_name)
        req, queue = submit(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        head = {"id": rid, "object": obj + (".chunk" if chat and stream else ""),
                "created": now, "model": model_name}
        if stream:
            return StreamingResponse(
                _stream(request, req, queue, head, chat, params.n, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * params.n, [None] * params.n
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
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage(ev.prompt_tokens, ev.completion_tokens)}

    async def _stream(request, req, queue, head, chat, n, include_usage):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def choice(i, text=None, finish=None, role=False):
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        try:
            if chat:  # OpenAI opens a chat stream with the role
                yield sse({**head, "choices": [choice(i, "", role=True) for i in range(n)]})
            finished = 0
            while True:
                ev = await next_event(request, queue)
                if ev is None:
                    return
                if ev.kind == "text":
                    if ev.text:
                        yield sse({**head, "choices": [choice(ev.index, ev.text)]})
                elif ev.kind == "finish":
                    finished += 1
                    pending_finish = (ev.index, ev.finish_reason)
                    if finished < n:
                        yield sse({**head, "choices": [choice(ev.index, None if chat else "",
                                                              ev.finish_reason)]})
                elif ev.kind == "done":
                    u = usage(ev.prompt_tokens, ev.completion_tokens)
                    i, reason = pending_finish
                    last = {**head, "choices": [choice(i, None if chat else "", reason)]}
                    if include_usage:  # OpenAI's form: a last chunk with no choices
                        yield sse({**last, "usage": None})
                        yield sse({**head, "choices": [], "usage": u})
                    else:  # usage rides on the final chunk
                        yield sse({**last, "usage": u})
                    break
                elif ev.kind == "error":
                    yield sse(ApiError(500, ev.text, "server_error").body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # client gone (generator closed or cancelled) or finished: free slots

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "gptmod_ext",
                                            "context_length": block_size}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "backend": engine.model.backend,
                "context_length": block_size, **engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((STATIC_DIR / "playground.html").read_text(encoding="utf-8"))

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
