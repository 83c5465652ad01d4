"""`python -m gptmod_ext.export --format gguf`: small runs trained here become GGUF files that
llama.cpp runs with our tokenizer.

The files are read back with the gguf package (llama.cpp's own reader) and checked against our
weights with formulas written here: the q/k rows llama.cpp's RoPE needs, bf16 rounding, Q8_0
blocks (one fp16 scale, 32 int8) decoded by hand. Then llama.cpp's own tools run the files:
llama-tokenize must give our ids on hard texts, llama-simple our sampler's greedy text (runs
trained until their argmaxes are confident; where our float64 logits have a near tie, which a
CPU's rounding may break either way, the texts are compared up to it), and the bf16 and q8_0
files must load and generate. Those tests need a
llama.cpp build (benchmarks/build_llama_cpp.sh) and skip with that command without one.
Runs: a byte-level BPE with the modern architecture (llama.cpp's llama; GQA, untied) and the
bytes tokenizer with the GPT-2 architecture (llama.cpp's gpt2; tied, learned positions).
"""
import codecs
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CORPUS, PKG_PARENT, PROMPTS, TEXTS, assert_export_error, llama_cpp_tool

from gptmod_ext import GPT, GPTConfig, chat, checkpoint, export, gguf_export, sample, tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 40
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def runs(export_runs):
    return export_runs


@pytest.fixture(scope="module")
def ours(runs):
    return {k: checkpoint.load_model(d, device="cpu", backend="torch")[:2] for k, d in runs.items()}


@pytest.fixture(scope="module")
def files(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {"bpe": root / "bpe.gguf", "bytes": root / "bytes.gguf",
           "bpe_bf16": root / "bpe-bf16.gguf", "bpe_q8_0": root / "bpe-q8_0.gguf"}
    r = subprocess.run([sys.executable, "-m", "gptmod_ext.export", "--ckpt", str(runs["bpe"]),
                        "--out", str(out["bpe"]), "--format", "gguf"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=PKG_PARENT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out['bpe']}: llama.cpp llama")
    for name, run, dtype in (("bytes", "bytes", "fp32"), ("bpe_bf16", "bpe", "bf16"),
                             ("bpe_q8_0", "bpe", "q8_0")):
        assert export.main(["--ckpt", str(runs[run]), "--out", str(out[name]), "--format",
                            "gguf", "--dtype", dtype]) == 0
    return out


def stdlib_text(names):
    """Standard-library source files (real code, found offline through sysconfig), joined."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "".join((lib / n).read_text(encoding="utf-8") for n in names)


@pytest.fixture(scope="module")
def big_bpe(tmp_path_factory):
    """A 2048-id BPE trained on real code (where a token has more than one way to split into
    two tokens, and llama.cpp needs the merges of each), in a GGUF with a small random model:
    for the tokenizer only."""
    tok = tokenizer.train_bpe([stdlib_text(["argparse.py", "textwrap.py", "csv.py"])], 2048)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                          n_embd=32))
    path = tmp_path_factory.mktemp("big") / "big.gguf"
    gguf_export.save_gguf(model, tok, path)
    return path, tok


def read(path):
    """(metadata {key: value}, tensors {name: ReaderTensor}) of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    return ({k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors})


def spelled_bytes(s):
    """The bytes a byte-level BPE token string stands for (GPT-2's byte-to-unicode map, from its
    definition: printable Latin-1 characters other than spaces stand for themselves, the other
    bytes in order for U+0100, U+0101, ...)."""
    keep = [b for b in range(256) if chr(b).isprintable() and not chr(b).isspace()]
    moved = [b for b in range(256) if b not in keep]
    decode = {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(moved)}
    return bytes(decode[ch] for ch in s)


# -- the file: metadata and tensors -----------------------------------------------------------

@pytest.mark.parametrize("name,arch,pre", [("bpe", "llama", "llama-bpe"),
                                           ("bytes", "gpt2", "gpt-2")])
def test_metadata_and_vocabulary(files, ours, name, arch, pre):
    meta, _ = read(files[name])
    model, tok = ours[name.split("_")[0]]
    c = model.config
    assert meta["general.architecture"] == arch
    want = {"context_length": c.block_size, "embedding_length": c.n_embd, "block_count": c.n_layer,
            "feed_forward_length": c.ffn_hidden, "attention.head_count": c.n_head}
    for key, v in want.items():
        assert meta[f"{arch}.{key}"] == v, key
    if arch == "llama":
        assert meta["llama.attention.head_count_kv"] == c.n_kv_head == 1
        assert meta["llama.rope.freq_base"] == c.rope_base == 5000.0
        assert meta["llama.rope.dimension_count"] == c.head_dim
        assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    else:
        assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(c.norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == tok.eot_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size == c.vocab_size
    for i, (s, t) in enumerate(zip(tokens, types)):
        if i == tok.eot_id:
            assert (s, t) == (tokenizer.EOT, 3)  # CONTROL: parsed from text only as special
        else:
            assert (spelled_bytes(s), t) == (tok.decode_bytes([i]), 1), i
    assert "tokenizer.chat_template" not in meta  # these runs have none


def llama_layout(w, heads):
    """Our half-split q/k rows as llama.cpp's RoPE wants them: per head, the pair (i, i + D/2)
    on adjacent rows 2i, 2i + 1."""
    d = w.shape[0] // heads
    first, second = w.view(heads, 2, d // 2, -1).unbind(1)
    return torch.stack([first, second], dim=2).reshape(w.shape)


def expected_tensors(model):
    """What the GGUF should hold, from our state dict, by llama.cpp's tensor names."""
    c, V = model.config, model.config.vocab_size
    sd = model.state_dict()
    want = {"token_embd.weight": sd["wte.weight"][:V], "output_norm.weight": sd["ln_f.weight"]}
    if c.pos_emb == "learned":
        want |= {"position_embd.weight": sd["wpe.weight"], "output_norm.bias": sd["ln_f.bias"]}
    if not c.tie_embeddings:
        want["output.weight"] = sd["lm_head.weight"][:V]
    for i in range(c.n_layer):
        h, b = f"h.{i}.", f"blk.{i}."
        if c.pos_emb == "learned":
            names = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn",
                     "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
            for g, o in names.items():
                want[f"{b}{g}.weight"] = sd[f"{h}{o}.weight"]
                want[f"{b}{g}.bias"] = sd[f"{h}{o}.bias"]
            continue
        qkv, F = sd[h + "attn.c_attn.weight"], c.ffn_hidden
        nq, nkv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
        want |= {b + "attn_norm.weight": sd[h + "ln_1.weight"],
                 b + "ffn_norm.weight": sd[h + "ln_2.weight"],
                 b + "attn_q.weight": llama_layout(q, c.n_head),
                 b + "attn_k.weight": llama_layout(k, c.n_kv_head), b + "attn_v.weight": v,
                 b + "attn_output.weight": sd[h + "attn.c_proj.weight"],
                 b + "ffn_gate.weight": sd[h + "mlp.c_fc.weight"][:F],
                 b + "ffn_up.weight": sd[h + "mlp.c_fc.weight"][F:],
                 b + "ffn_down.weight": sd[h + "mlp.c_proj.weight"]}
    return want


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_fp32_tensors_are_our_weights(files, ours, name):
    _, tensors = read(files[name])
    want = expected_tensors(ours[name][0])
    assert sorted(tensors) == sorted(want)
    for k, w in want.items():
        t = tensors[k]
        assert t.tensor_type == Q.F32, k
        assert list(t.shape) == list(reversed(w.shape)), k  # ggml lists the row length first
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(w.shape), w), k


def q8_0_decode(raw, shape):
    """llama.cpp's block_q8_0, decoded by hand: per 32 weights an fp16 scale d, then 32 int8 q;
    the weights are d * q."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return torch.from_numpy(d * q).reshape(shape), torch.from_numpy(d[:, 0])


def test_bf16_and_q8_0_files(files, ours):
    want = expected_tensors(ours["bpe"][0])
    _, bf16 = read(files["bpe_bf16"])
    _, q8 = read(files["bpe_q8_0"])
    for k, w in want.items():
        if w.dim() == 1:  # norms stay fp32, as llama.cpp's converter leaves them
            assert bf16[k].tensor_type == q8[k].tensor_type == Q.F32, k
            continue
        assert bf16[k].tensor_type == Q.BF16, k
        bits = np.asarray(bf16[k].data).reshape(-1).copy().view(np.uint16).astype(np.int32) << 16
        got = torch.from_numpy(bits.view(np.float32)).reshape(w.shape)
        assert torch.equal(got, w.to(torch.bfloat16).float()), k  # round to nearest even
        assert q8[k].tensor_type == Q.Q8_0, k
        got, d = q8_0_decode(q8[k].data, w.shape)
        blocks = w.reshape(-1, 32)
        # The scale is the block's largest |w| / 127 (in fp16); each weight is off by at most
        # half a step, plus what rounding the scale to fp16 moves 127 steps.
        torch.testing.assert_close(d, (blocks.abs().amax(1) / 127).half().float(), rtol=0, atol=0)
        bound = d[:, None] * (0.5 + 127 * 2 ** -11) + 1e-12
        assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), k
        assert not torch.equal(got, w), k


def test_interleaved_rope_is_written_as_it_is(runs, files, ours, tmp_path):
    # The same network with interleaved RoPE (pairs (2i, 2i + 1), llama.cpp's own convention):
    # the q/k rows reordered by hand give the same logits, and the export must give the same file.
    model, tok = ours["bpe"]
    c = model.config
    inter = copy.deepcopy(model)
    inter.config = dataclasses.replace(c, rope_interleaved=True)
    for block in inter.h:
        block.attn.interleaved = True
        w = block.attn.c_attn.weight.data
        nq, nk = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        w[:nq] = llama_layout(w[:nq].clone(), c.n_head)
        w[nq:nq + nk] = llama_layout(w[nq:nq + nk].clone(), c.n_kv_head)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(inter(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)
    run = tmp_path / "run"
    checkpoint.save_model(run, inter, tok)
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "i.gguf"),
                        "--format", "gguf"]) == 0
    _, got = read(tmp_path / "i.gguf")
    _, want = read(files["bpe"])
    for k in want:
        assert np.array_equal(np.array(got[k].data), np.array(want[k].data)), k


def test_chat_template_goes_into_the_file(ours, tmp_path):
    # A tokenizer made for chat (chat.with_template: <|im_start|> added, ChatML-style template),
    # as a chat fine-tuning run keeps it; a model with a row for the added token.
    tok = chat.with_template(ours["bpe"][1])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                          n_embd=32))
    run = tmp_path / "run"
    checkpoint.save_model(run, model, tok)
    assert export.main(["--ckpt", str(run), "--out", str(tmp_path / "c.gguf"),
                        "--format", "gguf"]) == 0
    meta, _ = read(tmp_path / "c.gguf")
    assert meta["tokenizer.chat_template"] == tok.chat_template == chat.CHAT_TEMPLATE
    i = tok.special_tokens[chat.IM_START]
    assert meta["tokenizer.ggml.tokens"][i] == chat.IM_START
    assert meta["tokenizer.ggml.token_type"][i] == 3  # CONTROL, as <|endoftext|>
    # llama.cpp reads the rendered turns into our ids.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, it's me"}]
    text = chat.render(tok, messages, add_generation_prompt=True)
    assert llama_ids(tmp_path / "c.gguf", text, tmp_path) == chat.prompt_ids(tok, messages)


# -- llama.cpp's own tools --------------------------------------------------------------------

def llama(tool, *args):
    r = subprocess.run([llama_cpp_tool(tool), *map(str, args)], capture_output=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    return r.stdout


def llama_ids(path, text, tmp_path, special=True):
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode())
    out = llama("llama-tokenize", "-m", path, "-f", f, "--ids", "--no-escape", "--log-disable",
                *([] if special else ["--no-parse-special"]))
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["bpe", "bytes", "big"])
def test_llama_cpp_tokenizer_gives_our_ids(files, ours, big_bpe, name, tmp_path):
    path, tok = big_bpe if name == "big" else (files[name], ours[name][1])
    held_out = stdlib_text(["shlex.py"])[:8000] if name == "big" else CORPUS
    for text in TEXTS + [held_out, tokenizer.EOT]:
        assert llama_ids(path, text, tmp_path) == tok.encode(text), repr(text)
        # Without special-token parsing, a literal <|endoftext|> is plain text, as in a corpus.
        assert llama_ids(path, text, tmp_path, special=False) == tok.encode_ordinary(text), \
            repr(text)


# Our top two logits closer than this (float64) are a near tie that another implementation's
# rounding may break the other way: llama.cpp's logits differ from ours by about 1e-5 (llama),
# 1e-3 (gpt2, whose GELU llama.cpp reads from an fp16 table).
TIE = 0.01


def decided(model, ids, new):
    """The tokens of `new` (our greedy continuation of ids) before the first near tie."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(torch.tensor([ids + new]))[0][0, len(ids) - 1:-1, :model.config.vocab_size]
    top2 = logits.topk(2, dim=-1).values
    close = ((top2[:, 0] - top2[:, 1]) < TIE).nonzero()
    return new if len(close) == 0 else new[:close[0, 0]]


def llama_greedy(path, prompt, n=N_NEW):
    """llama.cpp's greedy continuation of prompt (bytes), and whether it stopped at an end of
    generation. llama-simple is llama.cpp's own minimal loop: greedy sampler, no BOS unless the
    file asks for one; it prints the prompt's tokens, the new ones, then a newline."""
    r = subprocess.run([llama_cpp_tool("llama-simple"), "-m", str(path), "-n", str(n), prompt],
                       capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    head = prompt.encode()
    assert r.stdout.startswith(head) and r.stdout.endswith(b"\n"), r.stdout
    decoded = int(re.search(rb"decoded (\d+) tokens", r.stderr).group(1))
    return r.stdout[len(head):-1], decoded < n


def sampler_text(capsys, run, prompt):
    code = sample.main(["--ckpt", str(run), "--prompt", prompt, "--temperature", "0",
                        "--max-new-tokens", str(N_NEW), "--backend", "torch", "--no-echo", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out[:-1]  # the sampler ends with one newline


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_llama_cpp_greedy_text_equals_our_sampler(runs, files, ours, name, capsys):
    model, tok = ours[name]
    whole = 0
    # The empty prompt: our sampler starts a document with <|endoftext|>; in llama.cpp (no BOS
    # added) that is the literal prompt "<|endoftext|>".
    for prompt, theirs in [(p, p) for p in PROMPTS] + [("", tokenizer.EOT)]:
        ids = sample.encode_prompt(tok, prompt)
        new = list(model.generate([ids], N_NEW, temperature=0, eos_id=tok.eot_id)[0][len(ids):])
        raw, ended = llama_greedy(files[name], theirs)
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=ended)
        ref = sampler_text(capsys, runs[name], prompt)
        sure = decided(model, ids, new)
        if sure == new:
            assert text == ref, prompt
            assert ended == (new[-1] == tok.eot_id), prompt
            whole += 1
        else:  # the same text up to our first near tie
            head = codecs.getincrementaldecoder("utf-8")("replace").decode(tok.decode_bytes(sure))
            assert ref.startswith(head) and text.startswith(head), prompt
    # The runs learned real, confident continuations: most prompts are compared whole.
    assert whole >= 3 and len(ref) > 10


@pytest.mark.parametrize("name", ["bpe_bf16", "bpe_q8_0"])
def test_llama_cpp_runs_bf16_and_q8_0(files, name):
    raw, ended = llama_greedy(files[name], PROMPTS[0], n=16)
    assert ended or len(raw) > 0


# -- bad input --------------------------------------------------------------------------------

def run_export(capsys, *args):
    code = export.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_model_llama_cpp_cannot_express(runs, tmp_path, capsys):
    model, tok = checkpoint.load_model(runs["bpe"], device="cpu")[:2]
    gpt2 = dataclasses.replace(checkpoint.load_model(runs["bytes"], device="cpu")[0].config,
                               vocab_size=model.config.vocab_size)
    for config, words in [(dataclasses.replace(model.config, logit_softcap=30.0), "soft-cap"),
                          (dataclasses.replace(model.config, qk_norm=True), "QK-norm"),
                          (dataclasses.replace(model.config, parallel_block=True),
                           "parallel blocks"),
                          (dataclasses.replace(gpt2, gelu_approx="none"), "exact (erf) GELU")]:
        run = tmp_path / "run"
        checkpoint.save_model(run, GPT(config), tok)
        code, out, err = run_export(capsys, "--ckpt", str(run), "--out", str(tmp_path / "m.gguf"),
                                    "--format", "gguf")
        assert code == 1 and out == ""
        assert_export_error(err, words)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_file_needs_force(runs, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    args = ["--ckpt", str(runs["bytes"]), "--out", str(out), "--format", "gguf"]
    code, _, err = run_export(capsys, *args)
    assert code == 1
    assert_export_error(err, "--force")
    assert out.read_text() == "mine"
    assert run_export(capsys, *args, "--force")[0] == 0
    assert read(out)[0]["general.architecture"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporaries left
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(tmp_path),
                              "--format", "gguf", "--force")
    assert code == 1
    assert_export_error(err, "is a directory")


def test_tokenizer_llama_cpp_cannot_carry(tmp_path, capsys):
    # A char vocabulary (nanoGPT's Shakespeare) is no byte-level BPE.
    tok = tokenizer.CharTokenizer(list("\n !',.:;?abcdefghijklmnopqrstuvwxyz"))
    run = tmp_path / "run"
    checkpoint.save_model(run, GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32,
                                             n_layer=1, n_head=2, n_embd=32)), tok)
    code, out, err = run_export(capsys, "--ckpt", str(run), "--out", str(tmp_path / "m.gguf"),
                                "--format", "gguf")
    assert code == 1 and out == ""
    assert_export_error(err, "not one of our byte-level BPEs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_gpt2_without_biases_gets_zero_biases(tmp_path):
    # nanoGPT's bias=False: llama.cpp's gpt2 needs every bias; zeros are the same function.
    tok = tokenizer.byte_tokenizer()
    model = GPT(GPTConfig.from_preset("gpt2", vocab_size=tok.vocab_size, block_size=32,
                                      n_layer=1, n_head=2, n_embd=32, bias=False))
    path = gguf_export.save_gguf(model, tok, tmp_path / "m.gguf")
    _, tensors = read(path)
    biases = [k for k in tensors if k.endswith(".bias")]
    assert len(biases) == 1 + 6 * 1  # output_norm, and six per block
    assert all(not np.array(tensors[k].data).any() for k in biases)
    raw, _ = llama_greedy(path, "ab", n=4)  # llama.cpp loads and runs it


@pytest.mark.parametrize("fmt,dtype", [("gguf", "fp16"), ("hf", "q8_0")])
def test_dtype_of_the_other_format(runs, tmp_path, capsys, fmt, dtype):
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(tmp_path / "x"),
                              "--format", fmt, "--dtype", dtype)
    assert code == 1
    assert_export_error(err, f"--dtype {dtype} is not a {fmt} dtype")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        raise OSError(28, "No space left on device", "x")
    monkeypatch.setattr(gguf_export, "_add_tensor", fail)
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out",
                              str(tmp_path / "new" / "deeper" / "m.gguf"), "--format", "gguf")
    assert code == 1
    assert_export_error(err, "No space left")
    assert list(tmp_path.iterdir()) == []  # made parents and the temporary file removed


def test_gguf_missing_is_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out",
                              str(tmp_path / "m.gguf"), "--format", "gguf")
    assert code == 1
    assert_export_error(err, "pip install 'gptmod_ext[gguf]'")
