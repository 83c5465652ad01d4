"""Tokenizers: a byte-level BPE trained on the corpus, raw bytes, and GPT-2's encoding.

Every tokenizer is served the same way (a `Tokenizer` object) and has an end-of-text special
token `<|endoftext|>` (`tok.eot_id`), the document separator of the token files. A tokenizer
is saved as one JSON file (`tokenizer.json`) that holds everything needed to rebuild it
(kind, split pattern, mergeable ranks as base64, special tokens), so a run directory can be
sampled from without the corpus or the network.

    tok = tokenizer.train_bpe(texts, vocab_size=4096)   # rustbpe trains, tiktoken serves
    tok = tokenizer.byte_tokenizer()                    # 256 bytes + <|endoftext|>
    tok = tokenizer.gpt2(path=None)                     # GPT-2's BPE from a local file/cache
    tok.save(run_dir); tok = tokenizer.load(run_dir)
    ids = tok.encode(text); text = tok.decode(ids); raw = tok.decode_bytes(ids)

The BPE follows nanochat's recipe (train the merges with rustbpe, then hand the ranks to
tiktoken for fast encoding); the code here is our own.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import tiktoken

from .common import UserError, atomic_write

EOT = "<|endoftext|>"
FILENAME = "tokenizer.json"
FORMAT = "gptmod_ext.tokenizer/1"

# GPT-4's split pattern (cl100k_base), also rustbpe's default: case-insensitive contractions,
# words with one leading non-letter, numbers in groups of at most 3, punctuation runs, newlines
# and whitespace. Splitting keeps merges from crossing word boundaries.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Raw bytes need no pre-split; this pattern cuts text into runs of at most 64 characters so
# tiktoken never works on one huge piece (every piece is then split into its bytes).
BYTES_PATTERN = r"""[\s\S]{1,64}"""

_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


class TokenizerError(UserError):
    """A tokenizer cannot be built or loaded; the message is one line that says why."""


class Tokenizer:
    """A tiktoken encoding plus the metadata needed to save and describe it."""

    byte_level = True  # decode_bytes gives each token's raw bytes (streaming.TextStreamer)

    def __init__(self, kind: str, name: str, pattern: str,
                 mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]):
        if EOT not in special_tokens:
            raise TokenizerError(f"tokenizer {name!r} has no {EOT} special token")
        self.kind = kind
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(name=f"gptmod_{name}", pat_str=pattern,
                                     mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.eot_id = self.special_tokens[EOT]
        self.vocab_size = self.enc.n_vocab
        self._special_ids = set(self.special_tokens.values())

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, name={self.name!r}, vocab_size={self.vocab_size})"

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`. With allow_special (the default, for prompts), a literal
        `<|endoftext|>` in the text becomes the special token; otherwise it is plain text."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids with special-token strings treated as plain text (for corpora)."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    # -- decoding ------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids`. A token can end mid UTF-8 character, so streaming code should
        accumulate bytes and decode only complete characters."""
        return self.enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; invalid UTF-8 (a cut character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    # -- saving --------------------------------------------------------------------------------
    def describe(self) -> dict:
        """A short description for config.json / meta.json (no ranks)."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "file": FILENAME,
                "sha1": hashlib.sha1(self.to_json().encode()).hexdigest()}

    def to_json(self) -> str:
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return json.dumps({
            "format": FORMAT,
            "kind": self.kind,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            # Ranks are the ids 0..n-1 in order, so a list of base64 byte strings suffices.
            "ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks],
        })

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `directory/tokenizer.json` (through a temporary file and a rename)."""
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(self.to_json())
        return path


def from_json(text: str, where: str = "tokenizer.json") -> Tokenizer:
    try:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise TokenizerError(f"{where} is not a gptmod_ext tokenizer file "
                                 f"(format {d.get('format')!r}, expected {FORMAT!r})")
        ranks = {base64.b64decode(s): i for i, s in enumerate(d["ranks"])}
        return Tokenizer(d["kind"], d["name"], d["pattern"], ranks,
                         {k: int(v) for k, v in d["special_tokens"].items()})
    except TokenizerError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{where} is corrupt ({type(e).__name__}: {e})") from None


def load(directory_or_file: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer saved in a run or data directory (or a tokenizer.json path)."""
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file at {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    return from_json(text, str(path))


def document_start(tok) -> int | None:
    """The token that opens a new document, what an empty prompt becomes: BOS where the
    tokenizer has one (a Hugging Face folder's), else <|endoftext|> (ours put it between
    documents); None when it has neither."""
    bos = getattr(tok, "bos_id", None)
    return bos if bos is not None else getattr(tok, "eot_id", None)


# -- the three kinds ----------------------------------------------------------------------------
def byte_tokenizer() -> Tokenizer:
    """Raw UTF-8 bytes: ids 0..255 are the bytes, 256 is <|endoftext|>."""
    ranks = {bytes([b]): b for b in range(256)}
    return Tokenizer("bytes", "bytes", BYTES_PATTERN, ranks, {EOT: 256})


def train_bpe(texts: Iterable[str], vocab_size: int = 4096,
              pattern: str = GPT4_PATTERN) -> Tokenizer:
    """Trains a byte-level BPE on `texts` with rustbpe; the last id is <|endoftext|>.

    vocab_size counts the 256 byte tokens, the merges and the special token. A corpus too
    small to support that many merges gives a smaller vocabulary (rustbpe stops early)."""
    import rustbpe

    if vocab_size < 257:
        raise TokenizerError(f"BPE vocab size must be at least 257 (256 bytes + {EOT}), "
                             f"got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=pattern)
    ranks = {bytes(tok): int(rank) for tok, rank in trainer.get_mergeable_ranks()}
    return Tokenizer("bpe", f"bpe{len(ranks) + 1}", trainer.get_pattern(), ranks,
                     {EOT: len(ranks)})


def _gpt2_cache_paths() -> list[Path]:
    # Where tiktoken would have cached the GPT-2 files after a download (see tiktoken.load).
    import tempfile
    cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    return [Path(cache_dir) / hashlib.sha1(u.encode()).hexdigest() for u in _GPT2_URLS]


def gpt2(path: str | os.PathLike | None = None) -> Tokenizer:
    """GPT-2's BPE (50257 ids, <|endoftext|> = 50256) from local files only.

    `path` is one of: a `.tiktoken` ranks file (r50k_base.tiktoken), a directory with
    `vocab.bpe` + `encoder.json` (OpenAI's release) or `merges.txt` + `vocab.json` (Hugging
    Face's gpt2 repository). Without a path, tiktoken's download cache is used."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    if path is None:
        cached = _gpt2_cache_paths()
        if not all(p.exists() for p in cached):
            raise TokenizerError(
                "no network here and GPT-2's tokenizer files are not in tiktoken's cache "
                f"({cached[0].parent}); pass --tokenizer-path to r50k_base.tiktoken or to a "
                "directory with vocab.bpe + encoder.json, or use --tokenizer bpe")
        enc = tiktoken.get_encoding("gpt2")  # reads the cache, no download
        ranks = enc._mergeable_ranks
        pattern = enc._pat_str
    else:
        p = Path(path)
        try:
            if p.is_file():
                ranks = load_tiktoken_bpe(str(p))
            elif (p / "vocab.bpe").is_file() and (p / "encoder.json").is_file():
                ranks = data_gym_to_mergeable_bpe_ranks(str(p / "vocab.bpe"),
                                                        str(p / "encoder.json"))
            elif (p / "merges.txt").is_file() and (p / "vocab.json").is_file():
                ranks = data_gym_to_mergeable_bpe_ranks(str(p / "merges.txt"),
                                                        str(p / "vocab.json"))
            else:
                raise TokenizerError(
                    f"no GPT-2 tokenizer files at {p} (expected a .tiktoken file, or a "
                    "directory with vocab.bpe + encoder.json or merges.txt + vocab.json)")
        except TokenizerError:
            raise
        except Exception as e:  # tiktoken raises assorted errors on malformed files
            raise TokenizerError(f"cannot read GPT-2 tokenizer files at {p}: "
                                 f"{type(e).__name__}: {e}") from None
        from tiktoken_ext.openai_public import r50k_pat_str as pattern  # GPT-2's split
    return Tokenizer("gpt2", "gpt2", pattern, dict(ranks), {EOT: len(ranks)})


def build(kind: str, texts: Iterable[str] | None = None, vocab_size: int = 4096,
          path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer named by the CLI's --tokenizer option."""
    if kind == "bpe":
        if texts is None:
            raise TokenizerError("training a BPE needs the corpus")
        return train_bpe(texts, vocab_size)
    if kind == "bytes":
        return byte_tokenizer()
    if kind == "gpt2":
        return gpt2(path)
    raise TokenizerError(f"unknown tokenizer {kind!r} (expected bpe, bytes or gpt2)")

