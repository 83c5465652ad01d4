"""nanoGPT's out_dir/ckpt.pt and nanoGPT-moderno's model_XXXXX.pt through checkpoint.load_model
and the command lines that take a model (sample, serve, export).

The checkpoints are built here in both formats: random weights under the sources' own key names
and dict layout (with and without torch.compile's `_orig_mod.` prefix; RoPE / RMSNorm / SwiGLU /
GQA and the classic variants). The expected logits come from float64 implementations of the two
original architectures, written here from the sources' public model.py (karpathy/nanoGPT;
BayesTheory/GPT2-Mod-Arch, the code behind rianagario/GPT2-Mod-Arch), on the sources' weights
and key names, sharing nothing with our model.
"""
import base64
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import PKG_PARENT, needs_ext

from gptmod_ext import checkpoint, export, sample

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = list("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZé")
PROG_ERROR = f"{sample.PROG}: error: "
BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]


# -----------------------------------------------------------------------------------------------
# Checkpoints in the sources' formats


def rand(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


class Builder:
    """A source state dict, filled in the sources' key order with random weights that keep
    activations O(1): Linear weights std 1/sqrt(in), small biases, norm weights near 1."""

    def __init__(self, seed):
        self.g, self.sd = torch.Generator().manual_seed(seed), {}

    def linear(self, name, out, inp, bias):
        self.sd[name + ".weight"] = rand(self.g, out, inp, std=inp ** -0.5)
        if bias:
            self.sd[name + ".bias"] = rand(self.g, out, std=0.1)

    def norm(self, name, dim, bias, scale=1.0):
        self.sd[name + ".weight"] = scale * (1 + rand(self.g, dim, std=0.1))
        if bias:
            self.sd[name + ".bias"] = rand(self.g, dim, std=0.1)


def nanogpt_state(a, seed=0, lnf_scale=1.0):
    """nanoGPT's GPT.state_dict() for model_args a (lm_head.weight is wte's tensor, as tied)."""
    C, L, V, bias = a["n_embd"], a["n_layer"], a["vocab_size"], a["bias"]
    b = Builder(seed)
    b.sd["transformer.wte.weight"] = rand(b.g, V, C)
    b.sd["transformer.wpe.weight"] = rand(b.g, a["block_size"], C, std=0.5)
    for i in range(L):
        p = f"transformer.h.{i}."
        b.norm(p + "ln_1", C, bias)
        b.linear(p + "attn.c_attn", 3 * C, C, bias)
        b.linear(p + "attn.c_proj", C, C, bias)
        b.norm(p + "ln_2", C, bias)
        b.linear(p + "mlp.c_fc", 4 * C, C, bias)
        b.linear(p + "mlp.c_proj", C, 4 * C, bias)
    b.norm("transformer.ln_f", C, bias, scale=lnf_scale)
    b.sd["lm_head.weight"] = b.sd["transformer.wte.weight"]
    return b.sd


MODERNO_DEFAULTS = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                        n_kv_head=None, use_rope=True, use_rmsnorm=True, use_swiglu=True,
                        no_bias=True, logit_soft_cap=50.0)


def moderno_state(args, seed=0):
    """nanoGPT-moderno's GPT.state_dict() for model_args (its defaults fill what is missing)."""
    a = {**MODERNO_DEFAULTS, **args}
    C, H, L, V = a["n_embd"], a["n_head"], a["n_layer"], a["vocab_size"]
    D, Hkv, bias, ln = C // H, a["n_kv_head"] or H, not a["no_bias"], not a["use_rmsnorm"]
    F_ = int(2 * 4 * C / 3)
    b = Builder(seed)
    b.sd["transformer.wte.weight"] = rand(b.g, V, C)
    for i in range(L):
        p = f"transformer.h.{i}."
        b.norm(p + "ln_1", C, ln)
        b.linear(p + "attn.Wq", H * D, C, bias)
        b.linear(p + "attn.Wk", Hkv * D, C, bias)
        b.linear(p + "attn.Wv", Hkv * D, C, bias)
        b.linear(p + "attn.c_proj", C, C, bias)
        b.norm(p + "ln_2", C, ln)
        if a["use_swiglu"]:
            b.linear(p + "mlp.w1", F_, C, bias)
            b.linear(p + "mlp.w3", F_, C, bias)
            b.linear(p + "mlp.w2", C, F_, bias)
        else:
            b.linear(p + "mlp.c_fc", 4 * C, C, bias)
            b.linear(p + "mlp.c_proj", C, 4 * C, bias)
    b.norm("transformer.ln_f", C, ln)
    b.sd["lm_head.weight"] = b.sd["transformer.wte.weight"]
    if not a["use_rope"]:  # moderno adds wpe after the tie
        b.sd["transformer.wpe.weight"] = rand(b.g, a["block_size"], C, std=0.5)
    return b.sd


def compiled_keys(sd):
    """The state dict of a torch.compile'd model (what both trainers save when compiling)."""
    return {"_orig_mod." + k: v for k, v in sd.items()}


def save_nanogpt(path, sd, a, dataset="shakespeare_char"):
    """nanoGPT train.py's checkpoint dict."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": a, "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": {"dataset": dataset,
                                                                   "batch_size": 64}}, path)
    return path


def save_moderno(path, sd, args):
    """nanoGPT-moderno train.py's checkpoint dict."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": args, "step": 499,
                "val_loss": 2.25}, path)
    return path


def write_meta(path, chars=CHARS):
    """nanoGPT data/shakespeare_char/prepare.py's meta.pkl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return path


def write_tiktoken(path):
    """A .tiktoken ranks file (the format of r50k_base.tiktoken) of the 256 bytes: GPT-2's file
    needs the network, and any ranks file goes through the same --tokenizer-path code."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


# -----------------------------------------------------------------------------------------------
# The original architectures in float64, from the sources' weights and names


def layer_norm(x, W, name, eps):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * W[name + ".weight"]
    return y + W[name + ".bias"] if name + ".bias" in W else y


def rms_norm(x, W, name):  # moderno's RMSNorm: eps 1e-6, weight only
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * W[name + ".weight"]


def lin(x, W, name):
    y = x @ W[name + ".weight"].T
    return y + W[name + ".bias"] if name + ".bias" in W else y


def gelu_erf(x):  # nn.GELU(): the exact form
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def causal_attention(q, k, v):
    """q [B, T, H, D], k, v [B, T, Hkv, D]: query head h reads KV head h // (H / Hkv)."""
    B, T, H, D = q.shape
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        kv = h // (H // k.shape[2])
        s = (q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)).masked_fill(~mask, -math.inf)
        heads.append(s.softmax(-1) @ v[:, :, kv])
    return torch.cat(heads, dim=-1)


def nanogpt_reference(sd, a, idx):
    """nanoGPT's GPT.forward logits for every position, float64."""
    W = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    C, H = a["n_embd"], a["n_head"]
    x = W["transformer.wte.weight"][idx] + W["transformer.wpe.weight"][:T]
    for i in range(a["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = lin(layer_norm(x, W, p + "ln_1", 1e-5), W, p + "attn.c_attn").split(C, dim=-1)
        y = causal_attention(*(t.reshape(B, T, H, C // H) for t in (q, k, v)))
        x = x + lin(y, W, p + "attn.c_proj")
        h = gelu_erf(lin(layer_norm(x, W, p + "ln_2", 1e-5), W, p + "mlp.c_fc"))
        x = x + lin(h, W, p + "mlp.c_proj")
    return layer_norm(x, W, "transformer.ln_f", 1e-5) @ W["lm_head.weight"].T


def rope_pairs(x):
    """moderno's RoPE: pairs (2i, 2i+1) of x [B, T, H, D] rotated by p * 10000^(-2i/D)."""
    T, D = x.shape[1], x.shape[3]
    theta = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def moderno_reference(sd, args, idx, targets=None):
    """nanoGPT-moderno's GPT.forward: (logits, loss), float64; the soft-cap only without
    targets (the loss, and the logits returned with it, are uncapped)."""
    a = {**MODERNO_DEFAULTS, **args}
    W = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    C, H = a["n_embd"], a["n_head"]
    D, Hkv = C // H, a["n_kv_head"] or H

    def norm(x, name):
        return rms_norm(x, W, name) if a["use_rmsnorm"] else layer_norm(x, W, name, 1e-5)

    x = W["transformer.wte.weight"][idx]
    if not a["use_rope"]:
        x = x + W["transformer.wpe.weight"][:T]
    for i in range(a["n_layer"]):
        p = f"transformer.h.{i}."
        n1, n2 = norm(x, p + "ln_1"), norm(x, p + "ln_2")
        q = lin(n1, W, p + "attn.Wq").reshape(B, T, H, D)
        k = lin(n1, W, p + "attn.Wk").reshape(B, T, Hkv, D)
        v = lin(n1, W, p + "attn.Wv").reshape(B, T, Hkv, D)
        if a["use_rope"]:
            q, k = rope_pairs(q), rope_pairs(k)
        att = lin(causal_attention(q, k, v), W, p + "attn.c_proj")
        if a["use_swiglu"]:
            g, u = lin(n2, W, p + "mlp.w1"), lin(n2, W, p + "mlp.w3")
            mlp = lin(g * torch.sigmoid(g) * u, W, p + "mlp.w2")
        else:
            mlp = lin(gelu_erf(lin(n2, W, p + "mlp.c_fc")), W, p + "mlp.c_proj")
        x = x + att + mlp
    logits = norm(x, "transformer.ln_f") @ W["lm_head.weight"].T
    if targets is not None:
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    cap = a["logit_soft_cap"]
    return (cap * torch.tanh(logits / cap) if cap is not None else logits), None


def assert_logits_close(ours, ref):
    """fp32 against float64: within a small fraction of the logits' scale."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=2e-5 * max(scale, 1.0))


# -----------------------------------------------------------------------------------------------
# nanoGPT

NANO_ARGS = dict(n_layer=2, n_head=4, n_embd=32, block_size=48, bias=True, vocab_size=len(CHARS),
                 dropout=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_logits_and_loss(tmp_path, backend, bias, compiled):
    a = dict(NANO_ARGS, bias=bias)
    sd = nanogpt_state(a)
    save_nanogpt(tmp_path / "ckpt.pt", compiled_keys(sd) if compiled else sd, a)
    write_meta(tmp_path / "meta.pkl")
    # The directory and the file both load.
    for path in (tmp_path, tmp_path / "ckpt.pt"):
        model, tok, info = checkpoint.load_model(path, device="cpu", dtype="float32",
                                                 backend=backend)
    assert (info.kind, info.path, info.config["step"]) == ("nanogpt", tmp_path / "ckpt.pt", 250)
    assert info.config["val_loss"] == pytest.approx(1.4697)
    assert info.config["model_args"] == a and tok.kind == "char" and tok.vocab_size == len(CHARS)
    assert model.config.dropout == 0.0 and model.backend == backend
    idx = torch.randint(0, a["vocab_size"], (2, a["block_size"]),
                        generator=torch.Generator().manual_seed(1))
    ref = nanogpt_reference(sd, a, idx)
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert_logits_close(logits, ref)
    # The loss a fine-tuning run starts from is the source's own.
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.size(-1)), idx[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def cached_logits(model, idx, n_steps):
    """Next-token logits of the last n_steps positions through the KV cache (prefill, then one
    token per step): generation's path."""
    T = idx.size(1)
    cache = model.new_kv_cache(idx.size(0), T)
    out = [model.forward_cached(idx[:, :T - n_steps + 1], cache)]
    for t in range(T - n_steps + 1, T):
        out.append(model.forward_cached(idx[:, t:t + 1], cache))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nanogpt_cached_generation_path(tmp_path, backend):
    sd = nanogpt_state(NANO_ARGS, seed=3)
    save_nanogpt(tmp_path / "ckpt.pt", sd, NANO_ARGS)
    write_meta(tmp_path / "meta.pkl")
    model, _, _ = checkpoint.load_model(tmp_path, device="cpu", dtype="float32", backend=backend)
    idx = torch.randint(0, len(CHARS), (2, 20), generator=torch.Generator().manual_seed(2))
    assert_logits_close(cached_logits(model, idx, 4), nanogpt_reference(sd, NANO_ARGS, idx)[:, -4:])


# -----------------------------------------------------------------------------------------------
# nanoGPT-moderno

MODERNO = {
    # The published shape, smaller: RoPE, RMSNorm, SwiGLU, GQA, no biases, an active soft-cap.
    "rope_rms_swiglu_gqa": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=48, block_size=40,
                                vocab_size=300, use_rope=True, use_rmsnorm=True, use_swiglu=True,
                                no_bias=True, logit_soft_cap=3.0),
    # MQA, biases, F = int(8·40/3) = 106 (not rounded), no cap.
    "mqa_bias_f106": dict(n_layer=2, n_head=4, n_kv_head=1, n_embd=40, block_size=40,
                          vocab_size=300, use_rope=True, use_rmsnorm=True, use_swiglu=True,
                          no_bias=False, logit_soft_cap=None),
    # Classic: learned positions, LayerNorm (with its bias even without Linear biases), GELU.
    "classic": dict(n_layer=2, n_head=4, n_kv_head=None, n_embd=32, block_size=40, vocab_size=300,
                    use_rope=False, use_rmsnorm=False, use_swiglu=False, no_bias=True,
                    logit_soft_cap=50.0),
    # model_args without the architecture switches: moderno's defaults (RoPE, RMSNorm,
    # SwiGLU, MHA, no biases, cap 50).
    "defaults": dict(n_layer=1, n_head=2, n_embd=32, block_size=40, vocab_size=300),
}


@pytest.fixture
def gpt2_files(tmp_path):
    return write_tiktoken(tmp_path / "gpt2.tiktoken")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(MODERNO))
def test_moderno_logits_loss_and_cache(tmp_path, gpt2_files, backend, variant):
    args = MODERNO[variant]
    sd = moderno_state(args, seed=5)
    ckpt = save_moderno(tmp_path / "model_00499.pt",
                        compiled_keys(sd) if variant != "classic" else sd, args)
    save_moderno(tmp_path / "model_00300.pt", sd, args)  # an older one: the directory's newest wins
    model, tok, info = checkpoint.load_model(tmp_path, device="cpu", dtype="float32",
                                             backend=backend, tokenizer_path=gpt2_files)
    assert (info.kind, info.path, info.config["step"]) == ("moderno", ckpt, 499)
    assert tok.kind == "gpt2" and tok.vocab_size == 257
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(4))
    ref, _ = moderno_reference(sd, args, idx)
    ref_uncapped, ref_loss = moderno_reference(sd, args, idx[:, :-1], idx[:, 1:])
    with torch.no_grad():
        logits, _ = model(idx)
        logits_t, loss = model(idx[:, :-1], idx[:, 1:])
    assert_logits_close(logits, ref)
    assert_logits_close(logits_t, ref_uncapped)  # with targets, as moderno: uncapped
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert_logits_close(cached_logits(model, idx, 4), ref[:, -4:])


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["nanogpt"] + sorted(MODERNO))
def test_checkpoints_on_cuda(tmp_path, gpt2_files, variant):
    # The GPU's backend ('auto': ext where its CUDA kernels are built): forward and cached path.
    if variant == "nanogpt":
        args, sd = NANO_ARGS, nanogpt_state(NANO_ARGS)
        save_nanogpt(tmp_path / "ckpt.pt", sd, args)
        write_meta(tmp_path / "meta.pkl")
        tokenizer_path, vocab = None, len(CHARS)
    else:
        args = MODERNO[variant]
        sd, tokenizer_path, vocab = moderno_state(args), gpt2_files, 300
        save_moderno(tmp_path / "model_00001.pt", sd, args)
    model, _, _ = checkpoint.load_model(tmp_path, device="cuda", dtype="float32",
                                        tokenizer_path=tokenizer_path)
    idx = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(4))
    ref = (nanogpt_reference(sd, args, idx) if variant == "nanogpt"
           else moderno_reference(sd, args, idx)[0])
    with torch.no_grad():
        assert_logits_close(model(idx.cuda())[0].cpu(), ref)
    assert_logits_close(cached_logits(model, idx.cuda(), 4).cpu(), ref[:, -4:])


def test_fused_decode_refuses_the_new_variants(tmp_path, gpt2_files):
    # The fused CPU decode step covers sequential RMSNorm/RoPE/SwiGLU blocks only: moderno's
    # parallel two-norm block and nanoGPT's exact GELU must take the plain path.
    from gptmod_ext.decode import FusedDecode

    args = MODERNO["rope_rms_swiglu_gqa"]
    save_moderno(tmp_path / "model_00001.pt", moderno_state(args), args)
    model, _, _ = checkpoint.load_model(tmp_path, device="cpu", dtype="float32", backend="torch",
                                        tokenizer_path=gpt2_files)
    assert FusedDecode.unsupported(model) is not None
    save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(NANO_ARGS), NANO_ARGS)
    write_meta(tmp_path / "meta.pkl")
    model, _, _ = checkpoint.load_model(tmp_path / "ckpt.pt", device="cpu", dtype="float32",
                                        backend="torch")
    assert FusedDecode.unsupported(model) is not None


# -----------------------------------------------------------------------------------------------
# Greedy text through the sampler: a char-level nanoGPT run


def greedy_reference(sd, a, ids, n):
    """The float64 reference's greedy continuation (the whole prefix recomputed each step) and
    its smallest top-1 / top-2 logit gap along the way."""
    ids, gap = list(ids), math.inf
    for _ in range(n):
        top = nanogpt_reference(sd, a, torch.tensor([ids]))[0, -1].topk(2)
        gap = min(gap, (top.values[0] - top.values[1]).item())
        ids.append(int(top.indices[0]))
    return ids, gap


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A nanoGPT repository's layout: out-shakespeare-char/ckpt.pt (compiled keys), its meta.pkl
    at data/shakespeare_char/meta.pkl as the checkpoint's config names it; and the reference's
    greedy text for a prompt. ln_f is scaled so that logits spread widely: the reference's
    argmax wins every step by a margin far above fp32 rounding (asserted)."""
    root = tmp_path_factory.mktemp("nanogpt")
    a = dict(NANO_ARGS, bias=False)
    sd = nanogpt_state(a, seed=11, lnf_scale=4.0)
    (root / "out-shakespeare-char").mkdir()
    save_nanogpt(root / "out-shakespeare-char" / "ckpt.pt", compiled_keys(sd), a)
    write_meta(root / "data" / "shakespeare_char" / "meta.pkl")
    prompt, n = "To be", 30
    stoi = {c: i for i, c in enumerate(CHARS)}
    ids, gap = greedy_reference(sd, a, [stoi[c] for c in prompt], n)
    assert gap > 0.05, f"near-tie in the reference's greedy path (gap {gap}): pick another seed"
    return dict(root=root, sd=sd, args=a, prompt=prompt, n=n,
                text="".join(CHARS[i] for i in ids[len(prompt):]))


def sample_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1")
    env.pop("GPTMOD_DEBUG", None)
    return subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-m",
                           "gptmod_ext.sample", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=cwd, timeout=180)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_text_through_sample_equals_the_reference(char_run, backend):
    r = sample_cli("--ckpt", "out-shakespeare-char/ckpt.pt", "--prompt", char_run["prompt"],
                   "--temperature", "0", "--max-new-tokens", str(char_run["n"]), "--device", "cpu",
                   "--backend", backend, cwd=char_run["root"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == char_run["prompt"] + char_run["text"] + "\n"
    assert "loaded nanoGPT checkpoint" in r.stderr


def test_a_run_directory_written_from_it_samples_the_same(char_run, tmp_path):
    # What train --init-from writes: an ordinary run directory (weights, config with the new
    # flags, the char tokenizer as tokenizer.json); it samples the same greedy text.
    root = char_run["root"]
    model, tok, _ = checkpoint.load_model(root / "out-shakespeare-char", device="cpu",
                                          dtype="float32", backend="torch",
                                          tokenizer_path=root / "data/shakespeare_char/meta.pkl")
    checkpoint.save_model(tmp_path / "run", model, tok)
    r = sample_cli("--ckpt", str(tmp_path / "run"), "--prompt", char_run["prompt"], "--no-echo",
                   "--temperature", "0", "--max-new-tokens", str(char_run["n"]), "--backend",
                   "torch", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == char_run["text"] + "\n"


def test_a_character_outside_the_vocabulary_is_one_line(char_run):
    r = sample_cli("--ckpt", "out-shakespeare-char", "--prompt", "x = 1", "--max-new-tokens", "3",
                   "-q", cwd=char_run["root"])
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"{PROG_ERROR}the character '=' is not in the {len(CHARS)}-character vocabulary of "
        f"tokenizer 'char{len(CHARS)}'"]


# -----------------------------------------------------------------------------------------------
# Serving and exporting


def test_serve_a_nanogpt_checkpoint_with_the_openai_client(char_run):
    openai = pytest.importorskip("openai")
    from serve_util import live_server

    root = char_run["root"]
    with live_server(root / "out-shakespeare-char" / "ckpt.pt", "--backend", "torch",
                     "--tokenizer-path", str(root / "data/shakespeare_char/meta.pkl")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        assert client.models.list().data[0].id == "out-shakespeare-char"
        r = client.completions.create(model="out-shakespeare-char", prompt=char_run["prompt"],
                                      max_tokens=char_run["n"], temperature=0)
        assert r.choices[0].text == char_run["text"]
        assert r.choices[0].finish_reason == "length"  # no end-of-text token in a char vocabulary
        with pytest.raises(openai.BadRequestError, match="not in the"):
            client.completions.create(model="out-shakespeare-char", prompt="1 + 1", max_tokens=2)


def run_export(capsys, *args):
    code = export.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_a_char_level_nanogpt_run_to_transformers(char_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root = char_run["root"]
    code, out, err = run_export(capsys, "--ckpt", str(root / "out-shakespeare-char"), "--out",
                                str(tmp_path / "hf"), "--tokenizer-path",
                                str(root / "data/shakespeare_char/meta.pkl"))
    assert code == 0, err
    assert "GPT2LMHeadModel" in out and "tokenizer char" in out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "O Romeo, Romeo! wherefore art thou Romeo?\ncafé"
    ids = hf_tok.encode(text)
    assert ids == [CHARS.index(c) for c in text] and hf_tok.decode(ids) == text
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits
    assert_logits_close(logits, nanogpt_reference(char_run["sd"], char_run["args"],
                                                  torch.tensor([ids])))


def test_export_refuses_a_moderno_model_with_the_reason(tmp_path, gpt2_files, capsys):
    args = MODERNO["rope_rms_swiglu_gqa"]
    save_moderno(tmp_path / "model_00001.pt", moderno_state(args), args)
    code, _, err = run_export(capsys, "--ckpt", str(tmp_path / "model_00001.pt"), "--out",
                              str(tmp_path / "hf"), "--tokenizer-path", str(gpt2_files))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "parallel blocks" in err and "soft-cap" in err
    assert not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------------------------
# Bad files: one line, exit 1 (through the sampler)


def run_sample(capsys, *args):
    code = sample.main(["--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, err


def bad_checkpoints(d):
    """(name, path, the words the one-line error must hold) of broken or foreign files."""
    a = dict(NANO_ARGS, bias=False)
    good = save_nanogpt(d / "good.pt", nanogpt_state(a), a)
    cases = []

    def case(name, words, obj=None, raw=None):
        p = d / name / "ckpt.pt"
        p.parent.mkdir()
        if raw is not None:
            p.write_bytes(raw)
        else:
            torch.save(obj, p)
        write_meta(p.parent / "meta.pkl")
        cases.append((name, p, words))

    case("random_bytes", "not a PyTorch checkpoint", raw=os.urandom(4096))
    case("truncated", "corrupt, truncated", raw=good.read_bytes()[:20000])
    case("a_plain_pickle", "not a torch.save file", raw=pickle.dumps({"model": {}}))
    case("no_model", "no 'model' state dict", obj={"state_dict": {"w": torch.zeros(2)}})
    case("foreign_keys", "neither attn.c_attn",
         obj={"model": {"encoder.layer.0.weight": torch.zeros(2)}})
    case("unsafe_object", "class pickle.PickleError, which a safe load",
         obj={"model": nanogpt_state(a), "model_args": a,
              "config": {"path": pickle.PickleError("x")}})
    case("unknown_model_args", "model_args has fields nanoGPT does not know (n_kv_head)",
         obj={"model": nanogpt_state(a), "model_args": dict(a, n_kv_head=2)})
    case("args_do_not_fit", "has shape", obj={"model": nanogpt_state(a),
                                              "model_args": dict(a, n_embd=64)})
    extra = dict(nanogpt_state(a), **{"transformer.h.0.attn.rotary.inv_freq": torch.zeros(4)})
    case("extra_tensors", "unexpected tensors transformer.h.0.attn.rotary.inv_freq",
         obj={"model": extra, "model_args": a})
    return cases


def test_corrupt_or_foreign_checkpoints_are_one_line(tmp_path, capsys):
    for name, path, words in bad_checkpoints(tmp_path):
        code, err = run_sample(capsys, "--ckpt", str(path))
        assert code == 1, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(PROG_ERROR), (name, err)
        assert words in lines[0], (name, lines[0])


def test_missing_or_unsafe_tokenizer_is_one_line(tmp_path, capsys, monkeypatch):
    a = dict(NANO_ARGS, bias=False)
    ckpt = save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(a), a, dataset="nowhere")
    code, err = run_sample(capsys, "--ckpt", str(ckpt))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"char-level run ({len(CHARS)} tokens) and its meta.pkl is missing" in err
    assert "--tokenizer-path" in err and "data/nowhere/meta.pkl" in err

    # A meta.pkl that would run code when unpickled is refused before anything runs.
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('x')",)

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 65, "itos": Exploit()}))
    code, err = run_sample(capsys, "--ckpt", str(ckpt))
    assert code == 1 and not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "builtins.exec" in err

    # A moderno model takes GPT-2's BPE: without its files (no network here) the line says how.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    args = MODERNO["defaults"]
    (tmp_path / "m").mkdir()
    save_moderno(tmp_path / "m" / "model_00010.pt", moderno_state(args), args)
    code, err = run_sample(capsys, "--ckpt", str(tmp_path / "m"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--tokenizer-path" in err
    # A tokenizer path given for a run directory (which has its own) is refused too.
    model, tok, _ = checkpoint.load_model(ckpt, device="cpu",
                                          tokenizer_path=write_meta(tmp_path / "m.pkl"))
    checkpoint.save_model(tmp_path / "run", model, tok)
    code, err = run_sample(capsys, "--ckpt", str(tmp_path / "run"), "--tokenizer-path",
                           str(tmp_path / "m.pkl"))
    assert code == 1 and "nanoGPT checkpoints" in err
