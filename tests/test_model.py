"""The model: configs and presets, the torch backend against an independent float64 reference,
ext against torch (logits and gradients) for every architecture, soft-cap, dtypes, compile."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gptmod_ext import _ext
from gptmod_ext.model import GPT, GPTConfig, PRESETS
from helpers import needs_ext

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny variants of every architecture the flags can express.
ARCHS = {
    "modern": dict(GPTConfig.from_preset("tiny").to_dict(), n_layer=2, n_embd=64, n_head=4,
                   n_kv_head=2, head_dim=None, ffn_hidden=None, vocab_size=100, block_size=64),
    "gpt2": GPTConfig.from_preset("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                  block_size=64).to_dict(),
    # Everything unusual at once: parallel block, soft-cap, QK-norm, tied, LayerNorm with
    # biases, interleaved RoPE.
    "exotic": dict(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                   parallel_block=True, logit_softcap=0.2, qk_norm=True, tie_embeddings=True,
                   norm="layernorm", bias=True, rope_interleaved=True, rope_base=500.0),
    # MQA with an odd head size.
    "mqa_d96": dict(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=192),
    "learned_rms_gelu_parallel": dict(vocab_size=100, block_size=64, n_layer=2, n_head=4,
                                      n_embd=64, pos_emb="learned", mlp="gelu",
                                      parallel_block=True),
    # GPT-NeoX / nanoGPT-moderno's parallel block with two norms, exact GELU, an odd FFN width,
    # Linear biases but LayerNorms without, a soft-cap left out of the loss.
    "neox_two_norms": dict(vocab_size=100, block_size=64, n_layer=2, n_head=4, n_embd=64,
                           norm="layernorm", norm_bias=False, bias=True, mlp="gelu",
                           gelu_approx="none", ffn_hidden=170, parallel_block=True,
                           parallel_norms=2, logit_softcap=0.3, softcap_in_loss=False,
                           rope_interleaved=True),
}


def make_config(arch, **kw):
    d = dict(ARCHS[arch])
    for k in ("head_dim", "ffn_hidden", "n_kv_head"):
        if d.get(k) is not None and arch in ("modern", "gpt2"):
            d.pop(k)  # recomputed from the overridden sizes
    d.update(kw)
    return GPTConfig(**d)


def make_model(arch, dtype=torch.float32, **kw):
    torch.manual_seed(1)
    return GPT(make_config(arch, **kw)).to(dtype)


# -----------------------------------------------------------------------------------------------
# An independent reference: the architecture written out naively in float64 from the config and
# the weights (explicit attention loop, RoPE from the formula, GELU from its tanh formula).


def naive_logits(model, idx):
    c = model.config
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    D, Hq, Hkv = c.head_dim, c.n_head, c.n_kv_head

    def norm(x, name):
        w = W[name + ".weight"]
        if c.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + c.norm_eps) * w
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def linear(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def rotate(x):  # x [B, T, H, D]
        out = x.clone()
        for i in range(D // 2):
            a, b = (2 * i, 2 * i + 1) if c.rope_interleaved else (i, i + D // 2)
            theta = torch.arange(T, dtype=torch.float64) * c.rope_base ** (-2 * i / D)
            cs, sn = theta.cos()[None, :, None], theta.sin()[None, :, None]
            out[..., a] = x[..., a] * cs - x[..., b] * sn
            out[..., b] = x[..., b] * cs + x[..., a] * sn
        return out

    def head_rms(x, name):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * W[name + ".weight"]

    def mlp(h, p):
        u = linear(h, p + "mlp.c_fc")
        if c.mlp == "gelu" and c.gelu_approx == "none":
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        elif c.mlp == "gelu":
            u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        else:
            g, v = u[..., :c.ffn_hidden], u[..., c.ffn_hidden:]
            u = g * torch.sigmoid(g) * v
        return linear(u, p + "mlp.c_proj")

    x = W["wte.weight"][idx]
    if c.pos_emb == "learned":
        x = x + W["wpe.weight"][:T]
    mask = torch.ones(T, T).tril().bool()
    for layer in range(c.n_layer):
        p = f"h.{layer}."
        h = norm(x, p + "ln_1")
        qkv = linear(h, p + "attn.c_attn")
        q = qkv[..., :Hq * D].reshape(B, T, Hq, D)
        k = qkv[..., Hq * D:(Hq + Hkv) * D].reshape(B, T, Hkv, D)
        v = qkv[..., (Hq + Hkv) * D:].reshape(B, T, Hkv, D)
        if c.qk_norm:
            q, k = head_rms(q, p + "attn.q_norm"), head_rms(k, p + "attn.k_norm")
        if c.pos_emb == "rope":
            q, k = rotate(q), rotate(k)
        heads = []
        for hh in range(Hq):
            kv = hh // (Hq // Hkv)
            s = q[:, :, hh] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)
            s = s.masked_fill(~mask, -math.inf)
            heads.append(s.softmax(-1) @ v[:, :, kv])
        a = linear(torch.cat(heads, dim=-1), p + "attn.c_proj")
        if c.parallel_block:
            x = x + a + mlp(h if c.parallel_norms == 1 else norm(x, p + "ln_2"), p)
        else:
            x = x + a
            x = x + mlp(norm(x, p + "ln_2"), p)
    logits = (norm(x, "ln_f") @ W["lm_head.weight"].T)[..., :c.vocab_size]
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits


# -----------------------------------------------------------------------------------------------
# Config and presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = GPTConfig.from_preset(name)
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() > model.num_params(exclude_embeddings=True) > 0


def test_gpt2_preset_is_gpt2_124m():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        ours, theirs = GPT(cfg), GPT2LMHeadModel(GPT2Config())
    hf_params = sum(p.numel() for p in theirs.parameters())
    # The only difference: our token table is padded from 50257 to 50304 rows.
    assert ours.num_params() == hf_params + (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings, cfg.parallel_block) == \
        ("learned", "layernorm", "gelu", True, True, False)
    assert cfg.block_size == 1024 and cfg.vocab_size == 50257


def test_modern_preset_is_the_default_architecture():
    cfg, default = GPTConfig.from_preset("modern"), GPTConfig()
    for f in ("pos_emb", "norm", "mlp", "bias", "tie_embeddings", "parallel_block"):
        assert getattr(cfg, f) == getattr(default, f)
    assert cfg.n_kv_head < cfg.n_head and cfg.pos_emb == "rope" and cfg.mlp == "swiglu"


@pytest.mark.parametrize("bad", [dict(n_head=4, n_kv_head=3), dict(pos_emb="alibi"),
                                 dict(norm="batchnorm"), dict(mlp="relu"), dict(n_embd=65, n_head=4),
                                 dict(logit_softcap=-1.0), dict(gelu_approx="erf"),
                                 dict(parallel_norms=3)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**dict(n_embd=64, n_head=4), **bad})
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("nope")


def test_init_scheme_and_padded_vocab():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, n_layer=8, n_embd=256, n_head=4, block_size=32)
    m = GPT(cfg)
    assert m.wte.weight.shape[0] == 1024
    assert abs(m.h[0].attn.c_attn.weight.std().item() - 0.02) < 2e-3
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in m.h:
        assert abs(block.attn.c_proj.weight.std().item() - want) / want < 0.1
        assert abs(block.mlp.c_proj.weight.std().item() - want) / want < 0.1
    logits, loss = m(torch.randint(0, 1000, (2, 5)))
    assert logits.shape == (2, 5, 1000) and loss is None


def test_flops_per_token_palm_formula():
    m = make_model("modern")
    c = m.config
    slope = m.flops_per_token(seq_len=20) - m.flops_per_token(seq_len=10)
    assert slope == pytest.approx(12 * c.n_layer * c.n_head * c.head_dim * 10)
    matmul_params = sum(p.numel() for n, p in m.named_parameters() if n != "wte.weight") \
        + m.lm_head.weight.numel() * c.tie_embeddings
    assert m.flops_per_token(seq_len=0) == pytest.approx(6 * matmul_params)


# -----------------------------------------------------------------------------------------------
# Forward correctness


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_torch_backend_matches_naive_float64(arch):
    m = make_model(arch, torch.float64)
    idx = torch.randint(0, 100, (2, 11))
    logits, _ = m(idx)
    # Only the fp32 RoPE tables (docs/design.md) keep this from matching to 1e-15.
    torch.testing.assert_close(logits, naive_logits(m, idx), rtol=1e-6, atol=1e-7)
    m32 = make_model(arch)
    torch.testing.assert_close(m32(idx)[0].double(), naive_logits(m32, idx), rtol=1e-4, atol=1e-5)


def test_loss_is_cross_entropy_and_ignores_minus_one():
    m = make_model("modern")
    idx = torch.randint(0, 100, (2, 9))
    targets = torch.randint(0, 100, (2, 9))
    targets[0, :3] = -1
    logits, loss = m(idx, targets)
    keep = targets >= 0
    want = -logits.double().log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_softcap_bounds_logits_in_forward():
    m = make_model("exotic")
    idx = torch.randint(0, 100, (2, 9))
    capped, _ = m(idx)
    assert capped.abs().max() < m.config.logit_softcap
    uncapped = GPT(dataclasses.replace(m.config, logit_softcap=0.0))
    uncapped.load_state_dict(m.state_dict())
    raw, _ = uncapped(idx)
    assert raw.abs().max() > 1.5 * m.config.logit_softcap  # the cap really is active here
    cap = m.config.logit_softcap
    torch.testing.assert_close(capped, cap * torch.tanh(raw / cap))


def test_softcap_in_loss_false_caps_only_logits_returned_without_targets():
    m = make_model("neox_two_norms")
    idx = torch.randint(0, 100, (2, 9))
    targets = torch.randint(0, 100, (2, 9))
    capped, _ = m(idx)
    raw, loss = m(idx, targets)
    cap = m.config.logit_softcap
    assert raw.abs().max() > 1.5 * cap  # the cap is active here
    torch.testing.assert_close(capped, cap * torch.tanh(raw / cap))
    want = F.cross_entropy(raw.double().reshape(-1, 100), targets.reshape(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    cache = m.new_kv_cache(2, 9)  # generation sees the capped logits
    torch.testing.assert_close(m.forward_cached(idx, cache), capped[:, -1])


def test_old_configs_keep_their_meaning():
    # config.json of runs saved before gelu_approx / parallel_norms / norm_bias /
    # softcap_in_loss: tanh GELU, one shared norm, LayerNorm biases as `bias`, cap in the loss.
    old = {k: v for k, v in ARCHS["exotic"].items()}
    cfg = GPTConfig.from_dict(old)
    assert (cfg.gelu_approx, cfg.parallel_norms, cfg.layernorm_bias, cfg.softcap_in_loss) == \
        ("tanh", 1, True, True)
    assert GPT(cfg).h[0].ln_2 is None


def test_sequence_longer_than_block_size_is_refused():
    m = make_model("modern", block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_backend_switch_and_missing_extension(monkeypatch):
    m = make_model("modern")
    with pytest.raises(ValueError, match="'ext' or 'torch'"):
        m.backend = "cuda"
    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ops missing: build them")
    with pytest.raises(_ext.ExtensionNotAvailable, match="ops missing"):
        m.backend = "ext"
    assert m.backend == "torch"
    m(torch.zeros(1, 3, dtype=torch.long))  # torch still works


def test_low_precision_keeps_fp32_rope_tables():
    m = make_model("modern")
    idx = torch.randint(0, 100, (2, 16))
    ref = m(idx)[0]
    for dt in (torch.bfloat16, torch.float16):
        low = make_model("modern").to(dt)
        assert low.rope_cos.dtype == torch.float32 and low.wte.weight.dtype == dt
        torch.testing.assert_close(low(idx)[0].float(), ref, atol=3e-2, rtol=3e-2)
    back = make_model("modern").to(torch.bfloat16).float()
    torch.testing.assert_close(back.rope_cos, m.rope_cos)


def test_dropout_only_in_training():
    m = make_model("modern", dropout=0.5)
    idx = torch.randint(0, 100, (2, 8))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
def test_training_reduces_loss(backend):
    m = make_model("modern")
    m.backend = backend
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    idx = torch.randint(0, 100, (4, 17))
    first = None
    for _ in range(15):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


# -----------------------------------------------------------------------------------------------
# ext against torch


def _logits_and_grads(m, idx, targets):
    m.zero_grad()
    logits, loss = m(idx, targets)
    loss.backward()
    return logits.detach(), {n.replace("_orig_mod.", ""): p.grad.clone()
                             for n, p in m.named_parameters()}


@needs_ext
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ext_matches_torch_logits_and_grads(arch):
    m = make_model(arch)
    idx = torch.randint(0, 100, (2, 13))
    targets = torch.randint(0, 100, (2, 13))
    m.backend = "torch"
    ref_logits, ref_grads = _logits_and_grads(m, idx, targets)
    m.backend = "ext"
    logits, grads = _logits_and_grads(m, idx, targets)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
@pytest.mark.parametrize("arch", ["exotic", "neox_two_norms", "modern"])
def test_loss_without_logits_is_the_same_loss(arch, backend):
    # The trainer's call (return_logits=False): no logits, and the loss and gradients of the
    # torch backend's full forward (capped in the loss or not, per softcap_in_loss).
    m = make_model(arch)
    idx = torch.randint(0, 100, (2, 13))
    targets = torch.randint(0, 100, (2, 13))
    m.backend = "torch"
    _, ref_grads = _logits_and_grads(m, idx, targets)
    ref_loss = m(idx, targets)[1]
    m.backend = backend
    m.zero_grad()
    logits, loss = m(idx, targets, return_logits=False)
    assert logits is None
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert m(idx, return_logits=False)[0].shape == (2, 13, 100)  # no targets: logits as ever


@needs_ext
def test_ext_matches_torch_in_bfloat16():
    m = make_model("modern", torch.bfloat16)
    idx = torch.randint(0, 100, (2, 13))
    m.backend = "torch"
    ref = m(idx)[0].float()
    m.backend = "ext"
    torch.testing.assert_close(m(idx)[0].float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("ext", marks=needs_ext)])
def test_torch_compile_forward_and_backward(backend):
    torch._dynamo.reset()
    m = make_model("modern")
    m.backend = backend
    idx = torch.randint(0, 100, (2, 12))
    targets = torch.randint(0, 100, (2, 12))
    ref_logits, ref_grads = _logits_and_grads(m, idx, targets)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    logits, grads = _logits_and_grads(compiled, idx, targets)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_device_and_dtype_helpers():
    from gptmod_ext.devices import pick_device, pick_dtype
    auto = pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert auto.type in ("mps", "cpu")
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bf16") == torch.bfloat16 and pick_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int8")
