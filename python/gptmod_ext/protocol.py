"""The OpenAI wire format of the server: request parsing and validation, response and SSE chunk
builders. No HTTP framework and no model here (serve.py has the routes, engine.py the model).

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} (ApiError.body()).
What differs between /v1/completions and /v1/chat/completions lives in two `Api` objects,
COMPLETIONS and CHAT: how the prompt is read, the default max_tokens, the object names and the
shape of a choice and of a streamed delta.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .engine import SamplingParams

CHAT_STOP = "\nuser:"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4


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


# -- field validation --------------------------------------------------------------------------
def number(body, name, lo, hi, default, integer=False, lo_open=False):
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


def boolean(body, name, default=False):
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


def parse_messages(body) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                       param="messages")
    return [_message_text(m, i) for i, m in enumerate(messages)]


def _prompt_ids(body, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        return tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        if min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            raise ApiError(400, f"'prompt' token ids must be in [0, {tokenizer.vocab_size})",
                           param="prompt")
        return prompt
    if prompt is None or prompt == []:
        raise ApiError(400, "'prompt' is required and must not be empty", param="prompt")
    raise ApiError(400, "'prompt' must be a string, a list with one string, or a list of "
                        "token ids (one prompt per request)", param="prompt")


# -- the two APIs --------------------------------------------------------------------------------
class Api:
    """/v1/completions: a prompt, choices with `text`."""
    id_prefix, object, chunk_object, field = "cmpl-", "text_completion", "text_completion", "prompt"
    extra_stop: tuple = ()

    def prompt_ids(self, body, tokenizer) -> list[int]:
        return _prompt_ids(body, tokenizer)

    def default_max_tokens(self, room: int) -> int:
        return min(DEFAULT_COMPLETION_TOKENS, room)

    def max_tokens_field(self, body) -> str:
        return "max_tokens"

    def choice(self, i: int, text: str, finish: Optional[str]) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, i: int, text: Optional[str] = None, finish: Optional[str] = None,
              role: bool = False) -> dict:
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    def opening(self, n: int) -> list[dict]:
        """Chunks that open a stream, before any text."""
        return []


class ChatApi(Api):
    """/v1/chat/completions: messages rendered by render_chat, choices with a `message`."""
    id_prefix, object, chunk_object, field = "chatcmpl-", "chat.completion", "chat.completion.chunk", "messages"
    extra_stop = (CHAT_STOP,)

    def prompt_ids(self, body, tokenizer) -> list[int]:
        return tokenizer.encode(render_chat(parse_messages(body)))

    def default_max_tokens(self, room: int) -> int:
        return room

    def max_tokens_field(self, body) -> str:
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"

    def choice(self, i, text, finish) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def delta(self, i, text=None, finish=None, role=False) -> dict:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    def opening(self, n: int) -> list[dict]:
        return [self.delta(i, "", role=True) for i in range(n)]  # OpenAI opens with the role


COMPLETIONS, CHAT = Api(), ChatApi()


# -- parsing a generation request --------------------------------------------------------------
@dataclass
class Job:
    """A parsed (chat) completion request."""
    prompt_ids: list
    params: SamplingParams
    stream: bool
    include_usage: bool


def _check_model(body, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model not in (None, model_name):
        raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                            f"'{model_name}'", param="model", code="model_not_found")


def _max_tokens(api: Api, body, n_prompt: int, block_size: int) -> int:
    room = block_size - n_prompt
    if room < 1:
        raise ApiError(400, f"the prompt is {n_prompt} tokens long; the model's context is "
                            f"{block_size} tokens, which leaves no room to generate",
                       param=api.field, code="context_length_exceeded")
    name = api.max_tokens_field(body)
    max_tokens = number(body, name, 1, 1 << 30, api.default_max_tokens(room), integer=True)
    if n_prompt + max_tokens > block_size:
        raise ApiError(400, f"the prompt ({n_prompt} tokens) plus {name} ({max_tokens}) is "
                            f"{n_prompt + max_tokens} tokens, more than the model's context of "
                            f"{block_size} tokens", param=name, code="context_length_exceeded")
    return max_tokens


def _sampling(body, max_tokens: int, stop: list, max_batch: int) -> SamplingParams:
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=number(body, "top_k", -1, 1 << 20, 0, integer=True),
        min_p=number(body, "min_p", 0.0, 1.0, 0.0),
        seed=number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True),
        n=number(body, "n", 1, max_batch, 1, integer=True),
        stop=stop)
    params.top_k = max(params.top_k, 0)  # -1 (vLLM's "off") and 0 both mean no top-k
    # An extension (as vLLM's): keep going past <|endoftext|>, for fixed-length benchmarks.
    params.stop_at_eos = not boolean(body, "ignore_eos")
    return params


def parse_request(body: Any, api: Api, tokenizer, block_size: int, max_batch: int,
                  model_name: str) -> Job:
    """The JSON body of a (chat) completion request -> Job. Raises ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body, model_name)
    _unsupported(body)
    stop = _stop(body) + list(api.extra_stop)
    ids = api.prompt_ids(body, tokenizer)
    max_tokens = _max_tokens(api, body, len(ids), block_size)
    params = _sampling(body, max_tokens, stop, max_batch)
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return Job(ids, params, stream, boolean(opts or {}, "include_usage"))


# -- responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_head(api: Api, model_name: str, stream: bool) -> dict:
    """id, object, created and model: the same on every chunk of one stream."""
    return {"id": api.id_prefix + uuid.uuid4().hex[:24],
            "object": api.chunk_object if stream else api.object,
            "created": int(time.time()), "model": model_name}


def sse(obj) -> str:
    """One server-sent event carrying obj as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
