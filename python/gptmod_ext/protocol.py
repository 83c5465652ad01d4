"""The OpenAI wire format of the server: request parsing and validation, response and SSE chunk
builders. No HTTP framework and no model here (serve.py has the routes, engine.py the model).

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} (ApiError.body()).
What differs between /v1/completions and /v1/chat/completions lives in two `Api` objects,
COMPLETIONS and CHAT: how the prompt is read, the default max_tokens, the object names and the
shape of a choice and of a streamed delta.
"""
from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .chat import CHAT_STOP, render_chat  # noqa: F401  (the plain chat lines, without a template)
from .engine import Event
from .sampling import SamplingError, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# -- field validation --------------------------------------------------------------------------
def number(body, name, default, integer=False):
    """body[name] as a JSON number (an integer with integer=True), or default when absent.
    Only the type is checked here: the ranges are SamplingParams' (one place for all)."""
    v = body.get(name)
    if v is None:
        return default
    # bool is an int in Python; JSON true is not a number.
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", param=name)
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
    return [s for s in v if s]


def _unsupported(body) -> None:
    # Accepted at their neutral values (clients send them by default); anything else is refused
    # rather than silently ignored.
    for name, neutral in (("best_of", (None, 1)), ("suffix", (None, "")), ("tools", (None, [])),
                          ("response_format", (None, {"type": "text"}))):
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")


def _logit_bias(body, vocab_size: int) -> dict:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ApiError(400, "'logit_bias' must be an object {token id: bias}", param="logit_bias")
    out = {}
    for key, bias in v.items():
        tok = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else None
        if tok is None or not 0 <= tok < vocab_size:
            raise ApiError(400, f"'logit_bias' key {json.dumps(key)[:40]} is not a token id in "
                                f"[0, {vocab_size})", param="logit_bias")
        out[tok] = number({"logit_bias": bias}, "logit_bias", 0)
    return out


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


def encode_text(tokenizer, text: str, where: str) -> list[int]:
    """tokenizer.encode(text); a text the tokenizer cannot encode (a character outside a char
    vocabulary: a ValueError) is a 400 naming the field (`where`: 'prompt[1]', 'messages')."""
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        raise ApiError(400, f"'{where}': {e}", param=where.split("[")[0]) from None


def _one_prompt(p, where: str, tokenizer) -> list[int]:
    if isinstance(p, str):
        if not p:
            raise ApiError(400, f"'{where}' is empty", param="prompt")
        return encode_text(tokenizer, p, where)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if min(p) < 0 or max(p) >= tokenizer.vocab_size:
            raise ApiError(400, f"'{where}' token ids must be in [0, {tokenizer.vocab_size})",
                           param="prompt")
        return p
    if p == [] or p is None:
        raise ApiError(400, f"'{where}' is required and must not be empty", param="prompt")
    raise ApiError(400, f"'{where}' must be a string or a list of token ids", param="prompt")


def prompt_list(body, tokenizer) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of
    lists of token ids -> token id lists, one per prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [_one_prompt(p, f"prompt[{i}]", tokenizer) for i, p in enumerate(prompt)]
    if not isinstance(prompt, (str, list)) and prompt is not None:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")
    return [_one_prompt(prompt, "prompt", tokenizer)]


# -- token strings and logprobs ---------------------------------------------------------------
def token_bytes(tokenizer, tok: int) -> bytes:
    if getattr(tokenizer, "byte_level", False):
        return tokenizer.decode_bytes([tok])
    return tokenizer.decode([tok]).encode("utf-8")


def token_str(tokenizer, tok: int) -> str:
    """A token as text; a piece of a UTF-8 character as OpenAI writes it, 'bytes:\\xe2\\x80'."""
    data = token_bytes(tokenizer, tok)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TextOffsets:
    """Character offsets of successive tokens in the text they decode to."""

    def __init__(self, tokenizer, start: int = 0):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = start

    def take(self, tokens: Sequence[int]) -> list[int]:
        out = []
        for t in tokens:
            out.append(self.offset)
            self.offset += len(self._utf8.decode(token_bytes(self._tokenizer, t)))
        return out


def legacy_logprobs(tokenizer, entries: Sequence, offsets: list[int]) -> dict:
    """OpenAI's completions format for TokenLogprob entries (None: a prompt's first token)."""
    tokens, lps, tops = [], [], []
    for e in entries:
        if isinstance(e, tuple):  # (token id, None): nothing predicts a prompt's first token
            tokens.append(token_str(tokenizer, e[0]))
            lps.append(None)
            tops.append(None)
            continue
        tokens.append(token_str(tokenizer, e.token))
        lps.append(e.logprob)
        top = {token_str(tokenizer, t): lp for t, lp in e.top}
        top.setdefault(tokens[-1], e.logprob)  # the sampled token is always listed
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, entries: Sequence) -> dict:
    """OpenAI's chat format: {'content': [{token, logprob, bytes, top_logprobs}]}."""
    def one(t, lp):
        return {"token": token_str(tokenizer, t), "logprob": lp,
                "bytes": list(token_bytes(tokenizer, t))}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


# -- the two APIs --------------------------------------------------------------------------------
class Api:
    """/v1/completions: prompts, choices with `text` and legacy logprobs."""
    id_prefix, object, chunk_object, field = "cmpl-", "text_completion", "text_completion", "prompt"
    logprobs_field = "logprobs"
    extra_stop: tuple = ()

    def prompts(self, body, tokenizer) -> list[list[int]]:
        return prompt_list(body, tokenizer)

    def default_max_tokens(self, room: int) -> int:
        return min(DEFAULT_COMPLETION_TOKENS, room)

    def max_tokens_field(self, body) -> str:
        return "max_tokens"

    def logprobs(self, body) -> tuple[Optional[int], bool]:
        """(logprobs k or None, echo)."""
        return number(body, "logprobs", None, integer=True), boolean(body, "echo")

    def format_logprobs(self, tokenizer, entries, offsets):
        return legacy_logprobs(tokenizer, entries, offsets)

    def choice(self, i: int, text: str, finish: Optional[str], logprobs=None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, i: int, text: Optional[str] = None, finish: Optional[str] = None,
              role: bool = False, logprobs=None) -> dict:
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def opening(self, n: int) -> list[dict]:
        """Chunks that open a stream, before any text."""
        return []


class ChatApi(Api):
    """/v1/chat/completions: messages rendered by render_chat, choices with a `message`."""
    id_prefix, object, chunk_object, field = "chatcmpl-", "chat.completion", "chat.completion.chunk", "messages"
    logprobs_field = "top_logprobs"
    extra_stop = (CHAT_STOP,)

    def __init__(self, template=None):
        # messages -> prompt token ids (the tokenizer's chat template, chat.prompt_ids: the
        # end-of-text token ends a turn, so no extra stop string); None: render_chat
        self.template = template
        if template is not None:
            self.extra_stop = ()

    def prompts(self, body, tokenizer) -> list[list[int]]:
        messages = parse_messages(body)
        if self.template is not None:
            return [list(self.template(messages))]
        return [encode_text(tokenizer, render_chat(messages), "messages")]

    def default_max_tokens(self, room: int) -> int:
        return room

    def max_tokens_field(self, body) -> str:
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"

    def logprobs(self, body) -> tuple[Optional[int], bool]:
        k = number(body, "top_logprobs", 0, integer=True)
        return (k if boolean(body, "logprobs") else None), False

    def format_logprobs(self, tokenizer, entries, offsets):
        return chat_logprobs(tokenizer, entries)

    def choice(self, i, text, finish, logprobs=None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish}

    def delta(self, i, text=None, finish=None, role=False, logprobs=None) -> dict:
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, n: int) -> list[dict]:
        return [self.delta(i, "", role=True) for i in range(n)]  # OpenAI opens with the role


COMPLETIONS, CHAT = Api(), ChatApi()


# -- parsing a generation request --------------------------------------------------------------
@dataclass
class Job:
    """A parsed (chat) completion request: one or more prompts, the same settings for each."""
    prompts: list
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


def _max_tokens(api: Api, body, prompts: list, block_size: int, echo: bool) -> int:
    where = (lambda i: f"prompt[{i}] ") if len(prompts) > 1 else (lambda i: "the prompt ")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n_prompt = len(prompts[longest])
    name = api.max_tokens_field(body)
    # Its bounds: >= 1 (0 with echo) is SamplingParams' rule; the context decides the top,
    # and its message says how much room is left.
    max_tokens = number(body, name, None, integer=True)
    room = block_size - n_prompt
    if room < 1 and not (echo and max_tokens == 0 and room == 0):
        raise ApiError(400, f"{where(longest)}is {n_prompt} tokens long; the model's context is "
                            f"{block_size} tokens, which leaves no room to generate",
                       param=api.field, code="context_length_exceeded")
    if max_tokens is None:
        return api.default_max_tokens(room)
    if n_prompt + max_tokens > block_size:
        raise ApiError(400, f"{where(longest)}({n_prompt} tokens) plus {name} ({max_tokens}) is "
                            f"{n_prompt + max_tokens} tokens, more than the model's context of "
                            f"{block_size} tokens: {name} can be at most {room}",
                       param=name, code="context_length_exceeded")
    return max_tokens


def _sampling(body, api: Api, fields: dict, max_batch: int, vocab_size: int) -> SamplingParams:
    """The request's SamplingParams; a value out of its range is a 400 naming the JSON field."""
    for name, integer, default in SETTINGS:
        fields[name] = number(body, name, default, integer=integer)
    # An extension (as vLLM's): keep going past <|endoftext|>, for fixed-length benchmarks.
    fields["stop_at_eos"] = not boolean(body, "ignore_eos")
    fields["logit_bias"] = _logit_bias(body, vocab_size)
    try:
        params = SamplingParams(**fields)
    except SamplingError as e:
        where = {"max_tokens": api.max_tokens_field(body), "logprobs": api.logprobs_field}
        name = where.get(e.field, e.field)
        raise ApiError(400, f"'{name}' {e.problem}", param=name) from None
    if params.n > max_batch:  # the server's capacity, not a setting's range
        raise ApiError(400, f"'n' must be <= {max_batch} (the server's --max-batch), got "
                            f"{params.n}", param="n")
    return params


# (JSON field = SamplingParams field, integer, default when absent)
SETTINGS = [("temperature", False, 1.0), ("top_p", False, 1.0), ("top_k", True, 0),
            ("min_p", False, 0.0), ("seed", True, None), ("n", True, 1),
            ("presence_penalty", False, 0.0), ("frequency_penalty", False, 0.0),
            ("repetition_penalty", False, 1.0)]


def parse_request(body: Any, api: Api, tokenizer, block_size: int, max_batch: int,
                  model_name: str, vocab_size: Optional[int] = None) -> Job:
    """The JSON body of a (chat) completion request -> Job. Raises ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body, model_name)
    _unsupported(body)
    stop = _stop(body) + list(api.extra_stop)
    prompts = api.prompts(body, tokenizer)
    logprobs, echo = api.logprobs(body)
    max_tokens = _max_tokens(api, body, prompts, block_size, echo)
    params = _sampling(body, api, dict(max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                                       echo=echo), max_batch, vocab_size or tokenizer.vocab_size)
    stream = boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return Job(prompts, params, stream, boolean(opts or {}, "include_usage"))


# -- responses -----------------------------------------------------------------------------------
class ChoiceOutput:
    """One choice as its events arrive: text, logprob entries, finish reason. With echo the
    prompt's text (and its tokens' logprobs) come first."""

    def __init__(self, api: Api, tokenizer, index: int, prompt_ids: list, params: SamplingParams):
        self.api, self.tokenizer, self.index = api, tokenizer, index
        self.prompt_ids, self.want_logprobs = prompt_ids, params.logprobs is not None
        self.text, self.finish_reason = "", None
        self.entries, self.pending = [], []  # all logprob entries; those not yet streamed
        self._pending_ids: list = []
        prompt_text = tokenizer.decode(prompt_ids) if params.echo else ""
        self.head = prompt_text  # text not yet streamed
        self.text = prompt_text
        # text_offset counts from the start of the prompt's text, as OpenAI's does (the prompt
        # is decoded for that only when logprobs are asked for).
        start = len(tokenizer.decode(prompt_ids)) if self.want_logprobs and not params.echo else 0
        self._offsets = TextOffsets(tokenizer, start)

    def on_prompt(self, ev: Event) -> None:
        entries = [(self.prompt_ids[0], None)] + list(ev.logprobs[1:])
        self._add(entries, self.prompt_ids)

    def on_text(self, ev: Event) -> None:
        self.text += ev.text
        self.head += ev.text
        if self.want_logprobs:
            self._add(ev.logprobs, ev.token_ids)

    def _add(self, entries, ids) -> None:
        self.entries += entries
        self.pending += entries
        self._pending_ids += list(ids)

    def _format(self, entries, ids):
        if not self.want_logprobs:
            return None
        return self.api.format_logprobs(self.tokenizer, entries, self._offsets.take(ids))

    def choice(self) -> dict:
        ids = self._pending_ids
        self._pending_ids, self.pending = [], []
        return self.api.choice(self.index, self.text, self.finish_reason,
                               self._format(self.entries, ids))

    def delta(self, finish: bool = False) -> Optional[dict]:
        """The chunk for what arrived since the last one (None if nothing to send)."""
        if not self.head and not finish:  # logprobs of held-back tokens wait for their text
            return None
        text, self.head = self.head, ""
        lp = self._format(self.pending, self._pending_ids) if self.pending else None
        self.pending, self._pending_ids = [], []
        return self.api.delta(self.index, text if text or not finish else None,
                              self.finish_reason if finish else None, logprobs=lp)


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
