"""Starting a run from a trained model: what `python -m gptmod_ext.train --init-from SRC` does
before its loop (train.py calls it; the loop is the same for every run).

SRC is anything checkpoint.load_model reads: a run directory, a Hugging Face Llama / GPT-2
folder with its tokenizer (save_pretrained, `python -m gptmod_ext.export`, a downloaded
GPT-2), or a nanoGPT ckpt.pt / nanoGPT-moderno model_XXXXX.pt (with --tokenizer-path where its
tokenizer is not found by itself). The run takes from it:
- the architecture and every weight (load_source). --model-args may change what leaves every
  weight's shape as it is (dropout, say); a field that would change a shape is refused by name
  (build_model), as are --preset, --tokenizer and --vocab-size (check_options);
- the tokenizer (ours, a char vocabulary, or the folder's through tokenizer.HFTokenizer), which
  prepares --data; chat data adds the chat template's one token (chat.with_template), whose
  embedding and output rows start at the mean of the others (add_token_rows), in the padding
  the model already has (vocabularies are padded to a multiple of 64) or in 64 new rows.
So the first evaluation sees SRC's own loss on the data (with added rows, the loss over a
vocabulary one token larger). config.json records where the run started (record: the path,
its kind, step and a sha1 of its weights, which a LoRA run's --resume checks: it rebuilds the
frozen base from SRC).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import checkpoint as ckpt
from .common import UserError


class FinetuneError(UserError):
    """A source or an option that --init-from cannot use; one line that says why."""


class Source(NamedTuple):
    model: Any      # GPT, fp32 on the CPU, as SRC holds it
    tok: Any        # its tokenizer
    record: dict    # config.json's "init_from"


def weights_sha1(model) -> str:
    """A sha1 of a model's weights (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_source(path, tokenizer_path=None) -> Source:
    """SRC's model (fp32, CPU, torch backend) and tokenizer, through checkpoint.load_model;
    FinetuneError (one line) for a missing path or one that holds no model."""
    try:
        model, tok, info = ckpt.load_model(path, device="cpu", dtype="float32", backend="torch",
                                           tokenizer_path=tokenizer_path)
    except ckpt.CheckpointError as e:
        raise FinetuneError(f"--init-from: {e}") from None
    record = {"path": str(Path(path).resolve()), "kind": info.kind,
              "step": info.config.get("step"), "sha1": weights_sha1(model)}
    return Source(model, tok, record)


def check_options(args, defaults: dict) -> None:
    """Options that would make another model or tokenizer than SRC's, refused by name when
    they differ from their defaults (the parser's, in `defaults`)."""
    for key in ("preset", "tokenizer", "vocab_size"):
        if getattr(args, key) != defaults[key]:
            raise FinetuneError(f"--{key.replace('_', '-')}: --init-from takes the architecture "
                                "and the tokenizer from its source; leave it out")


def made_with(meta: dict, tok) -> bool:
    """Whether a data directory's meta.json says it was prepared with tok, or with tok given
    the chat template (chat data)."""
    from .chat import ChatError, with_template

    sha1s = {tok.describe()["sha1"]}
    try:
        sha1s.add(with_template(tok).describe()["sha1"])
    except ChatError:  # a char vocabulary takes no template
        pass
    return meta.get("tokenizer", {}).get("sha1") in sha1s


def check_data(data_dir: Path, tok) -> None:
    """A prepared data directory for --init-from: made with the source's tokenizer, or refused."""
    import json

    from .data import META

    meta = json.loads((data_dir / META).read_text())
    if not made_with(meta, tok):
        theirs = meta.get("tokenizer", {})
        raise FinetuneError(
            f"--data {data_dir} was prepared with the tokenizer {theirs.get('name')!r} (sha1 "
            f"{str(theirs.get('sha1'))[:8]}), not with --init-from's ({tok.name!r}, sha1 "
            f"{tok.describe()['sha1'][:8]}); pass the raw text to --data to prepare it with "
            "that one")


def _shapes(config) -> dict:
    """Parameter shapes of GPT(config), built on the meta device (no memory, no init cost)."""
    from .model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(source: Source, tok, overrides: dict):
    """SRC's model with the --model-args overrides (refused by name when one would change a
    weight's shape) and the rows of the tokens tok adds to SRC's tokenizer (add_token_rows)."""
    from .model import GPT

    model = source.model
    if overrides:
        base = dataclasses.asdict(model.config)
        want = _shapes(model.config)
        for name, value in overrides.items():
            try:
                changed = _shapes(type(model.config)(**{**base, name: value})) != want
            except (ValueError, TypeError) as e:
                raise FinetuneError(f"--model-args {name}={value}: {e}") from None
            if changed:
                raise FinetuneError(f"--model-args {name}={value} would change the shape of "
                                    "the source's weights; --init-from keeps its architecture")
        new = GPT(type(model.config)(**{**base, **overrides}))
        new.load_state_dict(model.state_dict())
        model = new
    if tok.vocab_size > source.tok.vocab_size:
        add_token_rows(model, source.tok.vocab_size, tok.vocab_size)
    return model


@torch.no_grad()
def add_token_rows(model, old: int, new: int) -> None:
    """Makes room for token ids old..new-1 (tokens a tokenizer added) and sets their embedding
    and output rows to the mean of rows 0..old-1: the padding rows when the padded vocabulary
    has them, else a table grown by a multiple of pad_vocab_multiple (64) rows."""
    cfg = model.config
    cfg.vocab_size = max(cfg.vocab_size, new)
    rows = cfg.padded_vocab_size
    tables = [model.wte] + ([] if cfg.tie_embeddings else [model.lm_head])
    for module in tables:
        w = module.weight
        if w.size(0) < rows:
            grown = w.new_zeros(rows, w.size(1))
            grown[:w.size(0)] = w
            module.weight = torch.nn.Parameter(grown, requires_grad=w.requires_grad)
        module.weight[old:new] = module.weight[:old].mean(dim=0)
    model.wte.num_embeddings = model.lm_head.out_features = rows
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
