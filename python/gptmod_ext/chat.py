"""Chat: how a conversation becomes token ids, one rule for chat SFT (prepare, train), the
sampler's --chat, the server's /v1/chat/completions and an exported folder's tokenizer.

A tokenizer's chat template (`tok.chat_template`, a Jinja string as transformers' chat
templates) renders the messages; it is stored with the tokenizer (ours in tokenizer.json, a
Hugging Face tokenizer in its folder), so a run directory, its data directory and its exported
folder all carry it. A Hugging Face folder's own template is used as it is. A tokenizer without
one gets ours (with_template) when it is first trained on chat data:

    <|im_start|>system\\nBe brief.<|endoftext|><|im_start|>user\\nHi<|endoftext|>
    <|im_start|>assistant\\nHello!<|endoftext|>          (no line breaks between turns)

ChatML's layout (a special token opens each turn, the role and a newline follow), with the
tokenizer's own end-of-text token (`eos_token`: <|endoftext|> for ours and GPT-2's) ending
every turn. One token is added to the vocabulary, <|im_start|>, a special token, so turn starts
tokenize the same whatever text surrounds them; the model never has to predict it (its targets
are never trained), so its rows can start at the other rows' mean, frozen under LoRA. The end
of a turn is the token every sampler, the server, the exported generation_config and
transformers' generate already stop at, and one the model has been trained to predict.

For SFT (conversation_ids) each assistant turn is found by rendering the conversation up to it
twice: with the generation prompt (what the model is given at inference) and with the answer;
the difference is the answer, trained up to and including its end-of-text token (anything a
template writes after that token is not trained). Each piece is tokenized on its own, so the
prompt tokens are those a server sends and the answer's are those the model generates. A
template that does not render a conversation that way, or does not end an answer with the
end-of-text token, is refused (ChatError).

Without any template (a base model's sampler --chat and server), messages are plain lines,
"{role}: {content}\\n" ... "assistant:", and a reply stops at "\\nuser:" (render_chat).
"""
from __future__ import annotations

import functools
import json

from .common import UserError, first_line

IM_START = "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant")
CHAT_STOP = "\nuser:"  # where a reply ends without a template (render_chat)


class ChatError(UserError, ValueError):
    """A conversation or a chat template that cannot be used; one line that says why."""


def render_chat(messages: list[dict]) -> str:
    """Without a template: '{role}: {content}\\n' per message, then 'assistant:'."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def template_of(tok) -> str | None:
    return getattr(tok, "chat_template", None) or None


def with_template(tok):
    """tok itself when it has a chat template; else a copy with <|im_start|> added (its next
    id) and CHAT_TEMPLATE. A vocabulary without an end-of-text token (a char vocabulary) has
    nothing to end a turn with: ChatError."""
    if template_of(tok):
        return tok
    if getattr(tok, "eot_id", None) is None or not hasattr(tok, "with_chat_template"):
        raise ChatError(f"the tokenizer {getattr(tok, 'name', '')!r} has no end-of-text token to "
                        "end a chat turn with (a char vocabulary); chat needs a BPE, bytes, gpt2 "
                        "or Hugging Face tokenizer")
    return tok.with_chat_template(IM_START, CHAT_TEMPLATE)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled as transformers compiles it (a sandbox, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, an unescaped tojson), so the text is theirs."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """The template's text for messages; a Hugging Face tokenizer renders its own."""
    hf = getattr(tok, "hf", None)
    try:
        if hf is not None:
            return hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        eos = next(s for s, i in tok.special_tokens.items() if i == tok.eot_id)
        return _compiled(template_of(tok)).render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos,
            bos_token=eos)
    except Exception as e:  # jinja2 and transformers raise many types for a failing template
        raise ChatError(f"the chat template cannot render this conversation: "
                        f"{first_line(e)}") from None


def encode(tok, text: str) -> list[int]:
    """A template's text as ids: its special tokens recognized, nothing added (as transformers'
    apply_chat_template tokenizes)."""
    hf = getattr(tok, "hf", None)
    if hf is not None:
        return hf(text, add_special_tokens=False)["input_ids"]
    return tok.encode(text, allow_special=True)


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The ids a reply to messages continues: the template with its generation prompt, the ids
    of transformers' apply_chat_template(messages, add_generation_prompt=True)."""
    return encode(tok, render(tok, messages, add_generation_prompt=True))


def prompt(tok, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, stop strings) of a reply to messages: the tokenizer's template (the reply
    ends at its end-of-text token), or render_chat's plain lines (it ends at CHAT_STOP)."""
    if template_of(tok):
        return prompt_ids(tok, messages), ()
    return tok.encode(render_chat(messages)), (CHAT_STOP,)


def conversation_ids(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, trained) of a conversation for SFT: trained[t] says whether ids[t] is a target
    the loss sees (an assistant answer's tokens and its end-of-text token). Turns after the
    last answer train nothing and are left out. ChatError for a template that cannot be used."""
    ids: list[int] = []
    trained: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head_text = render(tok, messages[:i], add_generation_prompt=True)
        turn_text = render(tok, messages[:i + 1], add_generation_prompt=False)
        if not (head_text.startswith(done) and turn_text.startswith(head_text)):
            raise ChatError("the chat template does not render a conversation as its history, "
                            "the generation prompt and then the answer, so its answers cannot "
                            "be found")
        head = encode(tok, head_text[len(done):])
        answer = encode(tok, turn_text[len(head_text):])
        end = next((k for k, t in enumerate(answer) if t == tok.eot_id), None)
        if end is None:
            raise ChatError("the chat template does not end an assistant turn with the "
                            "end-of-text token, where the sampler and the server stop")
        ids += head + answer
        trained += [False] * len(head) + [True] * (end + 1) + [False] * (len(answer) - end - 1)
        done = turn_text
    return ids, trained


# -- chat data: {"messages": [...]} rows (prepare.py reads the files) ----------------------------
def check_messages(row, where: str) -> list[dict]:
    """The messages of one chat row ({"messages": [{"role", "content"}, ...]}, the OpenAI /
    transformers chat format), as plain {"role", "content"} dicts; ChatError naming `where`
    (file:line) and the problem otherwise."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise ChatError(f"{where}: no 'messages' list (a chat row is {{\"messages\": "
                        "[{\"role\": ..., \"content\": ...}, ...]})")
    out = []
    for k, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ChatError(f"{where}: messages[{k}] has role {role!r}; the roles are system, "
                            "user and assistant")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"{where}: messages[{k}].content is not a string")
        out.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError(f"{where}: no assistant turn (nothing to train on)")
    return out
