"""TextStreamer / StopFilter: UTF-8 safety across token boundaries and stop strings.

References are independent of the streamer: Python's one-shot bytes.decode(errors="replace")
for the text, and str.find for where a stop string cuts it.
"""
import random

import pytest

from gptmod_ext import tokenizer
from gptmod_ext.streaming import REPLACEMENT, StopFilter, TextStreamer

TEXT = "naïve café 你好世界 🙂👍🏽 Ωmega ok"


@pytest.fixture(scope="module")
def tok():
    return tokenizer.byte_tokenizer()


def stream(streamer, ids, step=1):
    """Feeds ids `step` at a time; returns the chunks put() gave and finish()'s rest."""
    chunks = [streamer.put(ids[i:i + step]) for i in range(0, len(ids), step)]
    return chunks, streamer.finish()


def test_multibyte_characters_split_across_byte_tokens(tok):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters really span several tokens
    chunks, rest = stream(TextStreamer(tok), ids)
    assert "".join(chunks) + rest == TEXT
    assert rest == ""
    assert not any(REPLACEMENT in c for c in chunks)  # nothing broken was ever emitted


def test_incomplete_sequence_is_held_until_completed(tok):
    s = TextStreamer(tok)
    emoji = "🙂".encode()
    assert len(emoji) == 4
    assert [s.put(b) for b in emoji[:3]] == ["", "", ""]
    assert s.put(emoji[3]) == "🙂"
    assert s.put(list("z".encode())) == "z"
    assert s.finish() == ""
    assert s.text == "🙂z"


def test_truncated_character_at_the_end_becomes_replacement(tok):
    data = "a你".encode()[:-1]  # the model stopped mid-character
    chunks, rest = stream(TextStreamer(tok), list(data))
    assert "".join(chunks) == "a"
    assert rest == REPLACEMENT
    assert "".join(chunks) + rest == data.decode("utf-8", errors="replace")


def test_truncated_by_a_token_limit_drops_the_half_character(tok):
    data = "ok 你".encode()[:-1]
    chunks, rest = stream(TextStreamer(tok), list(data))
    s = TextStreamer(tok)
    for b in data:
        s.put(b)
    assert s.finish(truncated=True) == ""
    assert s.text == "ok "
    # Invalid bytes are still shown: only a valid but incomplete tail is dropped.
    s = TextStreamer(tok)
    s.put(list(b"a\xffb\xe4\xbd"))
    assert s.finish(truncated=True) == ""
    assert s.text == "a\ufffdb"


def test_invalid_bytes_match_python_replacement(tok):
    data = b"ok\xff\xfe then \xe4\xbd here \xc3( and \xf0\x9f\x99\x82 end\x80"
    chunks, rest = stream(TextStreamer(tok), list(data))
    assert "".join(chunks) + rest == data.decode("utf-8", errors="replace")


def test_bpe_tokens_that_end_mid_character(tok):
    corpus = ["你好世界 🙂🙂 café déjà vu 你好 " * 20]
    bpe = tokenizer.train_bpe(corpus, vocab_size=300)
    ids = bpe.encode(TEXT)
    # Some token boundary falls inside a character, else this test would test nothing.
    pieces = [bpe.decode_bytes([i]) for i in ids]
    assert any(_invalid(p) for p in pieces)
    chunks, rest = stream(TextStreamer(bpe), ids)
    assert "".join(chunks) + rest == TEXT
    assert not any(REPLACEMENT in c for c in chunks)


def _invalid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stop_string_spanning_tokens_is_never_printed(tok):
    s = TextStreamer(tok, stop=["世界"])
    chunks, rest = stream(s, tok.encode(TEXT))
    assert "".join(chunks) + rest == "naïve café 你好"
    assert s.stopped and s.stop_string == "世界"
    assert not any("世" in c for c in chunks)
    assert s.put(tok.encode("more")) == ""  # ignored after the stop


def test_held_prefix_released_when_not_a_stop(tok):
    s = TextStreamer(tok, stop=["abc"])
    assert s.put(tok.encode("xab")) == "x"  # "ab" could start "abc"
    assert s.put(tok.encode("d")) == "abd"
    assert s.put(tok.encode("a")) == ""
    assert s.finish() == "a"  # never became "abc"
    assert not s.stopped


def test_earliest_stop_wins(tok):
    s = TextStreamer(tok, stop=["world", "lo w"])
    chunks, rest = stream(s, tok.encode("hello world"), step=3)
    assert "".join(chunks) + rest == "hel"
    assert s.stop_string == "lo w"


def test_stop_filter_on_text_chunks():
    f = StopFilter(["\n\n", "END"])
    out = [f.put(c) for c in ["line one\n", "\nline two", "E", "N", "D more"]]
    assert "".join(out) == "line one"
    assert f.stopped and f.stop_string == "\n\n"
    assert f.finish() == ""


@pytest.mark.parametrize("seed", range(5))
def test_random_chunkings_against_reference(tok, seed):
    rng = random.Random(seed)
    alphabet = list("ab c\n") + ["é", "你", "🙂", "\x00"]
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data = bytearray(text.encode())
        if rng.random() < 0.3 and data:  # sometimes invalid bytes
            data[rng.randrange(len(data))] = rng.choice([0x80, 0xff, 0xe4])
        full = bytes(data).decode("utf-8", errors="replace")
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(0, 2))]
        cuts = [full.find(s) for s in stops if s in full]
        expected = full[:min(cuts)] if cuts else full
        s = TextStreamer(tok, stop=stops)
        chunks, rest = stream(s, list(data), step=rng.randint(1, 4))
        assert "".join(chunks) + rest == expected, (text, stops)
        assert s.stopped == bool(cuts)


class _DecodeOnly:
    """A tokenizer with decode() only, stripping a leading space like SentencePiece does."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(ids).removeprefix(" ")


def test_decode_only_tokenizer(tok):
    ids = tok.encode(" " + TEXT)
    context = tok.encode("x")
    chunks, rest = stream(TextStreamer(_DecodeOnly(tok), context=context), ids)
    # The context keeps the leading space that decoding the new ids alone would drop.
    assert "".join(chunks) + rest == " " + TEXT
    assert not any(REPLACEMENT in c for c in chunks)


def test_decode_only_tokenizer_truncated(tok):
    s = TextStreamer(_DecodeOnly(tok), context=tok.encode("x"))
    chunks, rest = stream(s, list("ab🙂".encode()[:-2]))
    assert "".join(chunks) == "ab" and rest == REPLACEMENT
    s = TextStreamer(_DecodeOnly(tok), context=tok.encode("x"))
    for b in "ab🙂".encode()[:-2]:
        s.put(b)
    assert s.finish(truncated=True) == "" and s.text == "ab"


def test_decode_only_tokenizer_with_stop(tok):
    s = TextStreamer(_DecodeOnly(tok), stop=["世界"], context=tok.encode("x"))
    chunks, rest = stream(s, tok.encode(TEXT))
    assert "".join(chunks) + rest == "naïve café 你好"
