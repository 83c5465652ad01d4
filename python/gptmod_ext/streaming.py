"""Turning a stream of token ids into text that is safe to print as it is produced.

Two things go wrong when each token is decoded on its own:
  - a token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK
    characters across tokens), so decoding it alone prints U+FFFD where the next token would
    have completed the character;
  - a stop string can span tokens ("\\n\\n" as "\\n" + "\\n"), so by the time it is seen, part of
    it has already been printed.

TextStreamer fixes both: it holds back an incomplete UTF-8 sequence until the bytes that
complete it arrive, and it holds back any tail of the text that could still grow into a stop
string. Only at finish() does it give up: a held tail that never became a stop string is
released, and a character the model never completed becomes U+FFFD (the model really produced
invalid bytes) or, with finish(truncated=True) when a token limit cut the text, is dropped.

    streamer = TextStreamer(tok, stop=["\\n\\n"])
    for token in tokens:
        print(streamer.put(token), end="", flush=True)
        if streamer.stopped:
            break
    print(streamer.finish())

The sampler CLI and the server share this module. A byte-level tokenizer (`byte_level` true:
ours, and Hugging Face byte-level BPEs such as GPT-2's or an exported run's) is decoded byte by
byte through `decode_bytes(ids)`, so a run directory and its exported folder print the same
text; any other (a SentencePiece one) is decoded by re-decoding the ids so far and printing
what was added (HF's own streamer does the same).
"""
from __future__ import annotations

import codecs
from typing import Iterable, Sequence, Union

REPLACEMENT = "\ufffd"


class StopFilter:
    """Cuts text at the first stop string and holds back anything that could start one.

    put(text) returns the text that can no longer be part of a stop string; once a stop string
    is found, everything from its first character on is dropped, `stopped` is True and
    `stop_string` says which one matched (the earliest in the text; the longest on a tie).
    """

    def __init__(self, stop: Iterable[str] = ()):
        self.stops = [s for s in stop if s]
        self.stopped = False
        self.stop_string: str | None = None
        self._held = ""

    def put(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        text = self._held + text
        self._held = ""
        hit = self._find(text)
        if hit is not None:
            self.stopped = True
            self.stop_string = hit[1]
            return text[:hit[0]]
        keep = self._partial_tail(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        return text

    def finish(self) -> str:
        """What is still held back (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _find(self, text: str):
        best = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _partial_tail(self, text: str) -> int:
        # The longest suffix of text that is a proper prefix of some stop string. Any stop string
        # that will appear later must start inside that suffix (or in text not yet seen).
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


class _ByteDecoder:
    """Token ids -> text through the tokenizer's raw bytes and an incremental UTF-8 decoder,
    which keeps an incomplete trailing sequence for the next call and replaces bytes that can
    never form a character as soon as that is certain."""

    def __init__(self, tokenizer):
        self._decode_bytes = tokenizer.decode_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, ids: Sequence[int]) -> str:
        return self._utf8.decode(self._decode_bytes(ids))

    def finish(self, truncated: bool) -> str:
        # The incremental decoder only ever holds a valid but incomplete sequence (bytes that
        # cannot start a character are replaced at once), so dropping it drops nothing else.
        return "" if truncated else self._utf8.decode(b"", final=True)


class _RedecodeDecoder:
    """Token ids -> text for tokenizers that only decode whole id lists (Hugging Face).

    Decodes context + all ids so far and emits the characters beyond what was already emitted.
    A trailing U+FFFD may be half a character, so it is held back until more ids arrive.
    `context` (the prompt's last tokens) makes word-initial spaces come out right for
    tokenizers that strip a leading space at the start of a decode (SentencePiece).
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._decode = tokenizer.decode
        self._context = [int(i) for i in context]
        self._skip = len(self._decode(self._context)) if self._context else 0
        self._ids: list[int] = []
        self._emitted = 0

    def _text(self) -> str:
        return self._decode(self._context + self._ids)[self._skip:]

    def put(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        text = self._text()
        end = len(text.rstrip(REPLACEMENT))
        if end <= self._emitted:
            return ""
        out, self._emitted = text[self._emitted:end], end
        return out

    def finish(self, truncated: bool) -> str:
        text = self._text()
        if truncated:
            text = text.rstrip(REPLACEMENT)
        out, self._emitted = text[self._emitted:], max(self._emitted, len(text))
        return out


class TextStreamer:
    """Token ids in, printable text out: UTF-8 safe across token boundaries, stop strings
    never printed (not even their first characters when they span tokens).

    tokenizer: byte_level and decode_bytes(ids) -> bytes, or decode(ids) -> str.
    stop: strings that end the text; the stop string and everything after it are dropped.
    context: token ids that come before the streamed ones (used only by decode()-only
    tokenizers, see _RedecodeDecoder).

    put(ids) -> str: the text that became safe to print (maybe ""). After a stop string,
    `stopped` is True and put() ignores further ids. finish() -> str: the rest, with U+FFFD for
    bytes that never formed a character; finish(truncated=True) (generation was cut by a length
    limit, not ended by the model) drops an incomplete last character instead. `text` is
    everything returned so far.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = (), context: Sequence[int] = ()):
        if getattr(tokenizer, "byte_level", False):
            self._decoder = _ByteDecoder(tokenizer)
        else:
            self._decoder = _RedecodeDecoder(tokenizer, context)
        self._stop = StopFilter(stop)
        self.text = ""
        self.num_tokens = 0
        self._finished = False

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def stop_string(self) -> str | None:
        return self._stop.stop_string

    def put(self, ids: Union[int, Iterable[int]]) -> str:
        if self.stopped or self._finished:
            return ""
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        self.num_tokens += len(ids)
        return self._emit(self._stop.put(self._decoder.put(ids)))

    def finish(self, truncated: bool = False) -> str:
        if self._finished:
            return ""
        self._finished = True
        if self.stopped:
            return ""
        out = self._stop.put(self._decoder.finish(truncated))
        if not self.stopped:
            out += self._stop.finish()
        return self._emit(out)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


class SequenceOutput:
    """One generated sequence's tokens -> the text to show and, once it ends, why: the one rule
    of the sampler CLI and the server.

    add(token) takes the next generated token and returns the text that became safe to show
    (maybe ""); once the sequence ends, `finish_reason` is set: 'stop' for the end-of-text token
    (when params.stop_at_eos) or a stop string, 'length' for params.max_tokens tokens, or a cut
    from outside (cut(): a timeout). A sequence cut by a length drops a character the next token
    would have completed, rather than show it as U+FFFD; one the model ended shows its invalid
    bytes as U+FFFD. Special tokens (and ids the tokenizer lacks: a model vocabulary larger than
    its tokenizer's) have no text.

    params: anything with max_tokens, stop and stop_at_eos (sampling.SamplingParams).
    context: the prompt's last token ids (see TextStreamer).
    """

    def __init__(self, tokenizer, params, eos_id, context: Sequence[int] = ()):
        self.stream = TextStreamer(tokenizer, params.stop, context=context)
        self.max_tokens, self.stop_at_eos, self.eos_id = params.max_tokens, params.stop_at_eos, eos_id
        self._tokenizer = tokenizer
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return self.stream.text

    def add(self, token: int) -> str:
        self.num_tokens += 1
        if self.stop_at_eos and token == self.eos_id:
            return self._end("stop", self.stream.finish())
        tok = self._tokenizer
        shown = 0 <= token < tok.vocab_size and not tok.is_special(token)
        text = self.stream.put([token] if shown else [])
        if self.stream.stopped:
            return self._end("stop", text)
        if self.num_tokens >= self.max_tokens:
            return self._end("length", text + self.stream.finish(truncated=True))
        return text

    def cut(self) -> str:
        """Ends the sequence before the model did (a timeout): 'length'; returns the rest."""
        return self._end("length", self.stream.finish(truncated=True))

    def _end(self, reason: str, text: str) -> str:
        self.finish_reason = reason
        return text
