"""Tokenizers: a byte-level BPE trained on the corpus, raw bytes, GPT-2's encoding, and the
character vocabularies of nanoGPT's char-level runs.

The first three are served the same way (a `Tokenizer` object over a tiktoken encoding) and
have an end-of-text special token `<|endoftext|>` (`tok.eot_id`), the document separator of the
token files. A `CharTokenizer` (kind 'char', read from nanoGPT's meta.pkl) has the same
interface but no end-of-text token (`eot_id` None): generation runs to its token limit, as in
nanoGPT. Every tokenizer is saved as one JSON file (`tokenizer.json`) that holds everything
needed to rebuild it (kind, split pattern, mergeable ranks as base64, special tokens; or the
characters), so a run directory can be sampled from without the corpus or the network.
An `HFTokenizer` (kind 'hf') is a transformers tokenizer behind the same interface: a Hugging
Face folder's, kept in the run and data directories of a model fine-tuned from one as a
save_pretrained folder named `hf_tokenizer`. A tokenizer may carry a chat template
(`tok.chat_template`, a Jinja string, see chat.py): ours in tokenizer.json, an HFTokenizer's
in its folder.

    tok = tokenizer.train_bpe(texts, vocab_size=4096)   # rustbpe trains, tiktoken serves
    tok = tokenizer.byte_tokenizer()                    # 256 bytes + <|endoftext|>
    tok = tokenizer.gpt2(path=None)                     # GPT-2's BPE from a local file/cache
    tok = tokenizer.from_meta_pkl("data/shakespeare_char/meta.pkl")   # nanoGPT's characters
    tok = tokenizer.HFTokenizer("path/to/hf_folder")  # a Hugging Face folder's tokenizer
    tok.save(run_dir); tok = tokenizer.load(run_dir)
    ids = tok.encode(text); text = tok.decode(ids); raw = tok.decode_bytes(ids)

The BPE follows nanochat's recipe (train the merges with rustbpe, then hand the ranks to
tiktoken for fast encoding); the code here is our own.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Iterable

import tiktoken

from .common import UserError, atomic_write, first_line, transformers_module

EOT = "<|endoftext|>"
FILENAME = "tokenizer.json"
HF_DIR = "hf_tokenizer"  # a Hugging Face tokenizer (HFTokenizer) inside a run or data directory
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


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be built or loaded, or a text cannot be encoded (a character outside
    a char vocabulary: a ValueError too, which the server turns into a 400); the message is one
    line that says why."""


class _Saved:
    """describe() and save() of every kind, from its to_json()."""

    def describe(self) -> dict:
        """A short description for config.json / meta.json (no ranks)."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "file": FILENAME,
                "sha1": hashlib.sha1(self.to_json().encode()).hexdigest()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `directory/tokenizer.json` (through a temporary file and a rename), and
        removes a Hugging Face tokenizer an earlier run left there (load would prefer ours, but
        a directory holds one tokenizer)."""
        path = Path(directory) / FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(self.to_json())
        if (path.parent / HF_DIR).is_dir():
            import shutil
            shutil.rmtree(path.parent / HF_DIR, ignore_errors=True)
        return path


class Tokenizer(_Saved):
    """A tiktoken encoding plus the metadata needed to save and describe it."""

    byte_level = True  # decode_bytes gives each token's raw bytes (streaming.TextStreamer)

    def __init__(self, kind: str, name: str, pattern: str,
                 mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 chat_template: str | None = None):
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
        self.chat_template = chat_template  # a Jinja string (chat.py), None for a base model

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

    def with_chat_template(self, marker: str, template: str) -> "Tokenizer":
        """A copy with `marker` added as a special token (the next id) and `template` as its
        chat template (chat.with_template decides when)."""
        specials = {**self.special_tokens, marker: self.special_tokens.get(marker, self.vocab_size)}
        return Tokenizer(self.kind, self.name, self.pattern, self.mergeable_ranks, specials,
                         chat_template=template)

    # -- saving --------------------------------------------------------------------------------
    def to_json(self) -> str:
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        d = {
            "format": FORMAT,
            "kind": self.kind,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            # Ranks are the ids 0..n-1 in order, so a list of base64 byte strings suffices.
            "ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks],
        }
        if self.chat_template is not None:  # absent for base tokenizers: their sha1 stays
            d["chat_template"] = self.chat_template
        return json.dumps(d)


class CharTokenizer(_Saved):
    """A character vocabulary: id i is the character chars[i] (nanoGPT's char-level runs,
    whose prepare.py numbers the sorted characters of the corpus). There is no end-of-text
    token (eot_id None) and nothing is special; a character outside the vocabulary cannot be
    encoded (TokenizerError, as nanoGPT's own encode would fail on it)."""
    kind = "char"

    def __init__(self, chars: list[str], name: str = "char"):
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise TokenizerError(f"tokenizer {name!r}: a char vocabulary is a non-empty list of "
                                 "single characters")
        if len(set(chars)) != len(chars):
            raise TokenizerError(f"tokenizer {name!r}: a character appears twice")
        self.name = name
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None
        self.special_tokens: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"CharTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, one per character (allow_special changes nothing: none are)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"the character {e.args[0]!r} is not in the "
                                 f"{self.vocab_size}-character vocabulary of tokenizer "
                                 f"{self.name!r}") from None

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.chars[int(i)] for i in ids)
        except IndexError:
            raise TokenizerError(f"a token id is outside the {self.vocab_size}-character "
                                 f"vocabulary of tokenizer {self.name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return False

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kind": self.kind, "name": self.name,
                           "chars": self.chars})


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data (dicts, lists, tuples, str, int, ...), which pickle builds from
    opcodes alone; a pickle that names any class or function (the way a pickle runs code) is
    refused before anything is called."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain dicts, strings "
                                     "and integers are read")


def from_meta_pkl(path: str | os.PathLike) -> CharTokenizer:
    """The char vocabulary of a nanoGPT meta.pkl ({'vocab_size', 'stoi', 'itos'}, written by
    data/shakespeare_char/prepare.py), read without running any code from the file."""
    path = Path(path)
    try:
        meta = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # pickle raises many types for files that are not pickles
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"{path} is not a nanoGPT meta.pkl ({msg})") from None
    try:
        itos, stoi, size = meta["itos"], meta["stoi"], meta["vocab_size"]
        chars = [itos[i] for i in range(len(itos))]
        ok = (size == len(chars) and isinstance(stoi, dict)
              and stoi == {c: i for i, c in enumerate(chars)})
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise TokenizerError(f"{path} is not a nanoGPT char-level meta.pkl (expected "
                             "vocab_size, and stoi / itos mapping characters to ids 0..n-1)")
    return CharTokenizer(chars, name=f"char{len(chars)}")


def from_json(text: str, where: str = "tokenizer.json") -> Tokenizer | CharTokenizer:
    try:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise TokenizerError(f"{where} is not a gptmod_ext tokenizer file "
                                 f"(format {d.get('format')!r}, expected {FORMAT!r})")
        if d["kind"] == CharTokenizer.kind:
            return CharTokenizer(d["chars"], d["name"])
        ranks = {base64.b64decode(s): i for i, s in enumerate(d["ranks"])}
        return Tokenizer(d["kind"], d["name"], d["pattern"], ranks,
                         {k: int(v) for k, v in d["special_tokens"].items()},
                         chat_template=d.get("chat_template"))
    except TokenizerError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{where} is corrupt ({type(e).__name__}: {e})") from None


def load(directory_or_file: str | os.PathLike) -> Tokenizer | CharTokenizer | HFTokenizer:
    """Loads the tokenizer saved in a run or data directory (our tokenizer.json, or a Hugging
    Face tokenizer in its HF_DIR folder), or a tokenizer.json path."""
    path = Path(directory_or_file)
    if path.is_dir() and not (path / FILENAME).is_file() and (path / HF_DIR).is_dir():
        return HFTokenizer(path / HF_DIR)
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


# -- a Hugging Face tokenizer -------------------------------------------------------------------
class HFTokenizer:
    """A transformers tokenizer behind the interface of ours (kind 'hf'): a Hugging Face
    folder's (checkpoint.load_model returns it for those), and the tokenizer of a run
    fine-tuned from one, kept in the run and data directories as a save_pretrained folder
    named HF_DIR. A byte-level BPE streams through decode_bytes as ours do; any other has no
    decode_bytes, and streaming.TextStreamer re-decodes it.

    path_or_tokenizer: a folder with tokenizer files, or a transformers tokenizer object."""

    kind = "hf"
    FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")

    def __init__(self, path_or_tokenizer):
        if isinstance(path_or_tokenizer, (str, os.PathLike)):
            path_or_tokenizer = _load_hf_tokenizer(Path(path_or_tokenizer))
        self.hf = path_or_tokenizer
        self.name = Path(self.hf.name_or_path or "hf").name
        self.eot_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id
        self.vocab_size = len(self.hf)
        # Every added token marked special (a chat template's markers too) has no text.
        self._special_ids = frozenset(self.hf.all_special_ids) | frozenset(
            i for i, t in self.hf.added_tokens_decoder.items() if t.special)
        self._token_bytes = _byte_level_tokens(self.hf, self._special_ids)
        # A byte-level BPE (GPT-2's, Llama 3's, every folder `export` writes) streams through
        # decode_bytes exactly as our own tokenizers do; others are re-decoded as whole texts.
        self.byte_level = self._token_bytes is not None

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template or None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """A prompt's ids: the tokenizer's own special tokens added (a BOS, for most), and its
        special tokens' text recognized unless allow_special is False."""
        if allow_special:
            return self.hf.encode(text, add_special_tokens=True)
        return self.hf.encode(text, add_special_tokens=True, split_special_tokens=True)

    def encode_ordinary(self, text: str) -> list[int]:
        """A document's ids, as prepare writes them: the tokenizer's own BOS where it adds one,
        special tokens' text as plain text."""
        return self.encode(text, allow_special=False)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self.hf(list(texts), add_special_tokens=True, split_special_tokens=True)["input_ids"]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of ids (special tokens skipped, as decode does); byte-level
        tokenizers only."""
        if self._token_bytes is None:
            raise TypeError("decode_bytes: this tokenizer is not a byte-level BPE")
        return b"".join(self._token_bytes[int(i)] for i in ids)

    def with_chat_template(self, marker: str, template: str) -> "HFTokenizer":
        """A copy with `marker` added as a special token (its next free id) and `template` as
        its chat template (chat.with_template decides when)."""
        import copy

        hf = copy.deepcopy(self.hf)
        hf.add_special_tokens({"additional_special_tokens": [marker]})
        hf.chat_template = template
        return HFTokenizer(hf)

    def describe(self) -> dict:
        """As _Saved.describe: sha1 covers the vocabulary, merges, normalization, special
        tokens and chat template (what decides the ids), not where the files were read."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else json.dumps(
            sorted(self.hf.get_vocab().items()))
        key = json.dumps([body, self.chat_template, self.eot_id, self.bos_id])
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "eot_id": self.eot_id, "file": HF_DIR,
                "sha1": hashlib.sha1(key.encode()).hexdigest()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer's files (save_pretrained) into `directory/HF_DIR`, through a
        temporary folder that replaces the old one."""
        import shutil

        target = Path(directory) / HF_DIR
        tmp = target.with_name(f".{HF_DIR}.tmp{os.getpid()}")
        old = target.with_name(f".{HF_DIR}.old{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.hf.save_pretrained(str(tmp))
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        ours = Path(directory) / FILENAME  # an earlier run's tokenizer.json would win in load()
        if ours.is_file() and ours.read_bytes()[:64].startswith(b'{"format": "' + FORMAT.encode()):
            ours.unlink()
        return target


def _load_hf_tokenizer(path: Path):
    if not any((path / f).is_file() for f in HFTokenizer.FILES):
        raise TokenizerError(f"{path} holds no tokenizer files ({', '.join(HFTokenizer.FILES)}); "
                             "save one there with tokenizer.save_pretrained()")
    transformers = transformers_module()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for unusable files
        raise TokenizerError(f"cannot load the tokenizer in {path}: {first_line(e)}") from None


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character: the printable
    Latin-1 bytes as themselves, the other 68 as chr(256 + n) in byte order. char -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _byte_level_tokens(hf_tok, special_ids) -> list[bytes] | None:
    """Each id's bytes when the tokenizer is a plain byte-level BPE (its decoder is ByteLevel
    and every ordinary token is spelled in the byte alphabet), else None. Special tokens
    decode to nothing; other added tokens to their UTF-8 text."""
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return None
    alphabet = _gpt2_byte_alphabet()
    added = {i: t.content for i, t in hf_tok.added_tokens_decoder.items()}
    out = []
    for i, piece in enumerate(hf_tok.convert_ids_to_tokens(list(range(len(hf_tok))))):
        if i in special_ids:
            out.append(b"")
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif piece is not None and all(ch in alphabet for ch in piece):
            out.append(bytes(alphabet[ch] for ch in piece))
        else:
            return None
    return out


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

