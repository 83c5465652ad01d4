"""Tokenizers: exact round trips, the end-of-text token, save/load, and agreement of the
tiktoken-served BPE with rustbpe's own encoder (an independent implementation)."""
import base64
import json
import random

import pytest

from gptmod_ext import tokenizer as T

CORPUS = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Grüße aus Köln! Ça va? 日本語のテキスト、中文文本。 Emoji: 🎉🚀👩‍💻",
    "for i in range(10):\n    print(i * i)\n" * 10,
]

TEXTS = [
    "",
    "a",
    "hello world",
    "  leading and trailing spaces  \n\n\t",
    "héllo wörld, naïve café",
    "日本語のテキスト、中文文本、한국어",
    "emoji 🎉🚀 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "mixed\r\nline\rendings\n",
    "\x00\x01 control \x7f chars",
    "def f(x):\n    return {'k': [1, 2, 3]}  # comment\n",
]


@pytest.fixture(scope="module")
def bpe():
    return T.train_bpe(CORPUS * 3, vocab_size=400)


@pytest.fixture(scope="module", params=["bpe", "bytes"])
def tok(request, bpe):
    return bpe if request.param == "bpe" else T.byte_tokenizer()


def random_unicode(n, seed):
    rng = random.Random(seed)
    # Letters from several scripts, emoji, whitespace, but no lone surrogates (not valid text).
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0400, 0x04FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)) if rng.random() > 0.1 else rng.choice(" \n\t"))
    return "".join(out)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_long_random(tok):
    text = random_unicode(20_000, seed=1)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_empty(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_bytes_tokenizer_ids_are_utf8_bytes():
    tok = T.byte_tokenizer()
    text = "naïve 日本 🎉"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.vocab_size == 257 and tok.eot_id == 256


def test_special_token(tok):
    text = "one<|endoftext|>two"
    ids = tok.encode(text)
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == text
    # As plain text (corpora), the marker is ordinary characters and round-trips too.
    plain = tok.encode_ordinary(text)
    assert tok.eot_id not in plain
    assert tok.decode(plain) == text
    assert tok.is_special(tok.eot_id) and not tok.is_special(plain[0])


def test_streaming_bytes_reassemble(tok):
    # Tokens can cut a UTF-8 character; per-token bytes must still concatenate to the text.
    text = "日本語 🎉 naïve"
    ids = tok.encode(text)
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_bpe_matches_rustbpe_encoder():
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(CORPUS * 3), 399)
    ranks = {bytes(t): r for t, r in trainer.get_mergeable_ranks()}
    tok = T.Tokenizer("bpe", "ref", trainer.get_pattern(), ranks, {T.EOT: len(ranks)})
    for text in TEXTS + [CORPUS[0], random_unicode(2000, seed=2)]:
        assert tok.encode_ordinary(text) == list(trainer.encode(text))


def test_bpe_compresses_and_has_eot_last(bpe):
    assert bpe.kind == "bpe"
    assert bpe.eot_id == bpe.vocab_size - 1
    assert 256 < bpe.vocab_size <= 400
    text = CORPUS[0] + CORPUS[3]
    assert len(bpe.encode(text)) < len(text.encode()) / 2


def test_save_load(tmp_path, tok):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    d = json.loads(path.read_text())
    assert d["kind"] == tok.kind and d["special_tokens"] == {T.EOT: tok.eot_id}
    loaded = T.load(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    for text in TEXTS + [random_unicode(3000, seed=3)]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.describe()["sha1"] == tok.describe()["sha1"]


def test_load_errors(tmp_path):
    with pytest.raises(T.TokenizerError, match="no tokenizer file"):
        T.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(T.TokenizerError, match="corrupt"):
        T.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(T.TokenizerError, match="not a gptmod_ext tokenizer"):
        T.load(tmp_path)


def test_gpt2_without_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(T.TokenizerError, match="no network here"):
        T.gpt2()
    with pytest.raises(T.TokenizerError, match="no GPT-2 tokenizer files"):
        T.gpt2(tmp_path)


def test_gpt2_from_local_tiktoken_file(tmp_path, bpe):
    # A .tiktoken file (base64 token + rank per line), the format of r50k_base.tiktoken; the
    # real GPT-2 file needs the network, so a small one built from our BPE stands in.
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in bpe.mergeable_ranks.items()]
    f = tmp_path / "small.tiktoken"
    f.write_text("\n".join(lines) + "\n")
    tok = T.gpt2(f)
    assert tok.kind == "gpt2" and tok.eot_id == len(bpe.mergeable_ranks)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert T.load(tmp_path).encode("hello world") == tok.encode("hello world")


def test_build_rejects_unknown_kind():
    with pytest.raises(T.TokenizerError, match="unknown tokenizer"):
        T.build("sentencepiece")
    with pytest.raises(T.TokenizerError, match="at least 257"):
        T.train_bpe(CORPUS, vocab_size=100)


# -- char vocabularies (nanoGPT's meta.pkl) -----------------------------------------------------

def write_meta(path, chars):
    # As nanoGPT's data/shakespeare_char/prepare.py writes it.
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return path


def test_char_tokenizer_from_meta_pkl_saves_and_loads(tmp_path):
    chars = sorted(set("héllo wörld, naïve café\n日本🎉!"))
    tok = T.from_meta_pkl(write_meta(tmp_path / "meta.pkl", chars))
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("char", len(chars), None)
    text = "café wörld\n日本🎉!"
    ids = tok.encode(text)
    assert ids == [chars.index(c) for c in text]
    assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode("utf-8")
    assert not any(tok.is_special(i) for i in ids)
    tok.save(tmp_path)
    back = T.load(tmp_path)
    assert type(back) is T.CharTokenizer and back.chars == chars and back.name == tok.name
    assert back.describe() == tok.describe() and back.describe()["kind"] == "char"
    with pytest.raises(T.TokenizerError, match="'x' is not in the"):
        tok.encode("x")
    with pytest.raises(T.TokenizerError, match="outside"):
        tok.decode([len(chars)])


@pytest.mark.parametrize("meta", [
    {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 2}},   # disagree
    {"vocab_size": 3, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}},   # wrong size
    {"vocab_size": 2, "itos": {0: "ab", 1: "c"}, "stoi": {"ab": 0, "c": 1}},  # not characters
    {"vocab_size": 2, "stoi": {"a": 0, "b": 1}},                              # no itos
    ["a", "b"],
])
def test_meta_pkl_that_is_not_a_char_vocabulary_is_refused(tmp_path, meta):
    import pickle

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(T.TokenizerError, match="char"):
        T.from_meta_pkl(tmp_path / "meta.pkl")


def test_meta_pkl_never_runs_code(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('x')",)

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 1, "stoi": Exploit()}))
    with pytest.raises(T.TokenizerError, match="builtins.exec"):
        T.from_meta_pkl(tmp_path / "meta.pkl")
    assert not marker.exists()
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(T.TokenizerError, match="not a nanoGPT meta.pkl"):
        T.from_meta_pkl(tmp_path / "meta.pkl")
