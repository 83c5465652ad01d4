"""Generation: the KV cache against full recomputation, ragged batches, EOS, seeds, context rule,
the low-level forward_cached API, and the sampling filters."""
import dataclasses

import pytest
import torch

from gptmod_ext import ops, sampling
from gptmod_ext.model import GPT, GPTConfig
from helpers import assert_greedy_agrees, float64_next_logits, needs_ext

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]

ARCHS = {
    "modern": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2),
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, pos_emb="learned", norm="layernorm", mlp="gelu",
                 bias=True, tie_embeddings=True),
    "mqa_d96_softcap": dict(n_layer=2, n_embd=192, n_head=2, n_kv_head=1, logit_softcap=4.0,
                            qk_norm=True, parallel_block=True),
}


def make_model(arch="modern", backend="torch", vocab_size=97, block_size=64, **kw):
    torch.manual_seed(2)
    m = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **{**ARCHS[arch], **kw})).eval()
    # Sharper next-token distributions than the 0.02 init gives: greedy decoding then has clear
    # winners, so cached and recomputed runs cannot flip a near-tie by rounding.
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    m.backend = backend
    return m


def greedy_reference(model, prompt, n):
    """Greedy decoding of one prompt by full forward passes, written out independently."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq


# -----------------------------------------------------------------------------------------------
# Cache vs recompute


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cached_equals_uncached_batch(arch, backend):
    m = make_model(arch, backend)
    idx = torch.randint(0, 97, (3, 7))
    cached = m.generate(idx, 20, temperature=0)
    assert cached.shape == (3, 27) and torch.equal(cached[:, :7], idx)
    assert torch.equal(cached, m.generate(idx, 20, temperature=0, use_cache=False))
    assert cached[0].tolist() == greedy_reference(m, idx[0].tolist(), 20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["modern", "gpt2"])
def test_ragged_prompts(arch, backend):
    m = make_model(arch, backend)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    out = m.generate(prompts, 12, temperature=0)
    assert isinstance(out, list) and all(isinstance(t, int) for t in out[0])
    assert out == m.generate(prompts, 12, temperature=0, use_cache=False)
    for p, row in zip(prompts, out):
        assert row == greedy_reference(m, p, 12)  # padding is never attended


def test_ext_and_torch_generate_the_same_tokens():
    if not ops.AVAILABLE:
        pytest.skip("gptmod extension not built")
    m = make_model("modern")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    ref = m.generate(prompts, 15, temperature=0)
    m.backend = "ext"
    assert m.generate(prompts, 15, temperature=0) == ref


def test_softcap_applies_in_generation():
    m = make_model("mqa_d96_softcap")
    cache = m.new_kv_cache(1, 16)
    idx = torch.randint(0, 97, (1, 6))
    logits = m.forward_cached(idx, cache)
    full, _ = m(idx)
    torch.testing.assert_close(logits, full[:, -1], rtol=1e-5, atol=1e-5)
    cap = m.config.logit_softcap
    twin = GPT(dataclasses.replace(m.config, logit_softcap=0.0)).eval()
    twin.load_state_dict(m.state_dict())
    raw = twin.forward_cached(idx, twin.new_kv_cache(1, 16))
    assert raw.abs().max() > 1.5 * cap  # the cap is active
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap), rtol=1e-5, atol=1e-5)
    # Greedy generation picks the argmax of the capped logits (ties of saturated values included).
    out = m.generate(idx, 1, temperature=0)
    assert int(out[0, -1]) == int(logits.argmax())


# -----------------------------------------------------------------------------------------------
# EOS, streaming, seeds, context


def test_eos_stops_rows_independently():
    m = make_model()
    idx = torch.randint(0, 97, (3, 5))
    free = m.generate(idx, 15, temperature=0)
    eos = int(free[0, 5 + 3])  # row 0 produces it at step 3
    out = m.generate(idx, 15, temperature=0, eos_id=eos)
    for b in range(3):
        gen = free[b, 5:].tolist()
        if eos in gen:
            k = gen.index(eos)
            assert out[b, 5:5 + k + 1].tolist() == gen[:k + 1]
            assert (out[b, 5 + k + 1:] == eos).all()  # finished rows are filled with eos
        else:
            assert out[b, 5:].tolist() == gen[:out.size(1) - 5]
    # Stops early only once every row has finished.
    if all(eos in free[b, 5:].tolist() for b in range(3)):
        assert out.size(1) == 5 + 1 + max(free[b, 5:].tolist().index(eos) for b in range(3))
    one = m.generate(idx[:1], 15, temperature=0, eos_id=eos)
    assert one.shape == (1, 5 + 4) and int(one[0, -1]) == eos
    ragged = m.generate([idx[0].tolist(), idx[1, :2].tolist()], 15, temperature=0, eos_id=eos)
    assert ragged[0] == free[0, :9].tolist()  # a list result is cut after its first eos


def test_stream_yields_the_generated_columns():
    m = make_model()
    idx = torch.randint(0, 97, (2, 4))
    full = m.generate(idx, 10, temperature=0.8, top_k=20, seed=7)
    steps = list(m.generate_stream(idx, 10, temperature=0.8, top_k=20, seed=7))
    assert len(steps) == 10
    for i, (tok, finished) in enumerate(steps):
        assert tok.dtype == torch.long and tok.shape == (2,)
        assert torch.equal(tok, full[:, 4 + i]) and not finished.any()
    eos = int(full[1, 4 + 2])
    flags = [f.tolist() for _, f in m.generate_stream(idx, 10, temperature=0.8, top_k=20, seed=7,
                                                      eos_id=eos)]
    assert flags[2][1] and not flags[1][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_is_reproducible(backend):
    m = make_model(backend=backend)
    idx = torch.randint(0, 97, (2, 4))
    kw = dict(temperature=1.3, top_p=0.95, min_p=0.01, seed=123)
    state = torch.get_rng_state()
    a = m.generate(idx, 16, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert torch.equal(a, m.generate(idx, 16, **kw))
    assert not torch.equal(a, m.generate(idx, 16, **{**kw, "seed": 124}))


def test_context_rule():
    m = make_model(block_size=32)
    idx = torch.randint(0, 97, (1, 20))
    assert m.generate(idx, 12, temperature=0).shape == (1, 32)  # exactly block_size is fine
    with pytest.raises(ValueError, match=r"20 \+ max_new_tokens 13 = 33 exceeds block_size 32"):
        m.generate(idx, 13, temperature=0)
    with pytest.raises(ValueError, match="block_size 32"):
        m.generate([[1] * 40], 1)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate([[1, 2], []], 3)
    assert torch.equal(m.generate(idx, 0), idx)


# -----------------------------------------------------------------------------------------------
# The low-level cache API (what the server drives)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_cached_rows_chunks_and_reset(backend):
    m = make_model(backend=backend)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    full_a, full_b = m(a)[0][:, -1], m(b)[0][:, -1]
    cache = m.new_kv_cache(3, 16)
    # Row 0: prefill in two chunks; row 2: one shot; row 1 untouched.
    m.forward_cached(a[:, :4], cache, rows=0)
    la = m.forward_cached(a[:, 4:], cache, rows=slice(0, 1))
    lb = m.forward_cached(b, cache, rows=2)
    assert cache.seqlens.tolist() == [9, 0, 5]
    torch.testing.assert_close(la, full_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lb, full_b, rtol=1e-4, atol=1e-4)
    # One decode step for rows 0..2 at their own lengths, padding row 1 with a 1-token prompt.
    step = torch.tensor([[3], [4], [5]])
    m.forward_cached(step[1:2], cache, rows=1)
    logits = m.forward_cached(step, cache)
    assert cache.seqlens.tolist() == [10, 2, 6]
    torch.testing.assert_close(logits[0], m(torch.cat([a, step[:1]], 1))[0][0, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[2], m(torch.cat([b, step[2:]], 1))[0][0, -1], rtol=1e-4, atol=1e-4)
    # Reuse a slot: reset it and prefill another request with right padding and lengths.
    cache.reset(0)
    padded = torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)
    l0 = m.forward_cached(padded, cache, rows=0, lengths=torch.tensor([5]))
    assert cache.seqlens.tolist() == [5, 2, 6]
    torch.testing.assert_close(l0, full_b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        m.forward_cached(torch.zeros(1, 12, dtype=torch.long), cache, rows=2)


def test_cache_is_preallocated_once(monkeypatch):
    m = make_model()
    made = []
    real = m.new_kv_cache
    monkeypatch.setattr(m, "new_kv_cache", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    m.generate(torch.randint(0, 97, (2, 3)), 10, temperature=0)
    assert len(made) == 1 and made[0].max_seq_len == 13
    ptr = made[0].buffer.data_ptr()
    assert made[0].buffer.shape == (2, 2, 2, 13, 2, 16) and made[0].buffer.data_ptr() == ptr
    assert made[0].seqlens.tolist() == [12, 12]  # the last token is returned, not cached


# -----------------------------------------------------------------------------------------------
# Sampling filters


def _probs(logits):
    return logits.double().softmax(-1)


def test_greedy_and_temperature():
    logits = torch.randn(4, 50)
    assert torch.equal(sampling.sample(logits, temperature=0), logits.argmax(-1))
    torch.testing.assert_close(sampling.apply_temperature(logits, 0.5), logits * 2)
    per_row = torch.tensor([0.0, 1.0, 0.0, 2.0])
    g = sampling.make_generator(0)
    out = sampling.sample(logits, temperature=per_row, generator=g)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(3, 40)
    kept = torch.isfinite(sampling.top_k_filter(logits, 5))
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, logits >= logits.topk(5, -1).values[:, -1:])
    per_row = torch.isfinite(sampling.top_k_filter(logits, torch.tensor([1, 5, 0])))
    assert per_row.sum(-1).tolist() == [1, 5, 40]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_prefix_with_mass_p(p):
    logits = torch.randn(5, 60) * 2
    kept = torch.isfinite(sampling.top_p_filter(logits, p))
    probs = _probs(logits)
    for row in range(5):
        order = probs[row].argsort(descending=True).tolist()
        n = kept[row].sum().item()
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == set(order[:n])
        mass = probs[row, order[:n]].sum().item()
        assert mass >= p - 1e-6  # reaches p ...
        assert probs[row, order[:n - 1]].sum().item() < p + 1e-6  # ... and one fewer would not


def test_min_p_keeps_tokens_above_fraction_of_max():
    logits = torch.randn(4, 80) * 3
    for mp in (0.05, 0.3):
        kept = torch.isfinite(sampling.min_p_filter(logits, mp))
        probs = _probs(logits)
        want = probs >= mp * probs.max(-1, keepdim=True).values
        assert torch.equal(kept, want)
    rows = torch.isfinite(sampling.min_p_filter(logits, torch.tensor([0.0, 0.3, 0.3, 1.0])))
    assert rows[0].all() and rows[3].sum() == 1


def test_filters_off_and_order():
    logits = torch.randn(2, 30)
    assert torch.equal(sampling.process_logits(logits, 1.0, None, None, None), logits)
    assert torch.equal(sampling.process_logits(logits, 1.0, 0, 1.0, 0.0), logits)
    both = sampling.process_logits(logits, 0.7, top_k=10, top_p=0.5)
    want = sampling.top_p_filter(sampling.top_k_filter(logits / 0.7, 10), 0.5)
    torch.testing.assert_close(both, want)


def test_sample_follows_the_distribution_and_per_row_generators():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    g = sampling.make_generator(0)
    draws = torch.stack([sampling.sample(logits, generator=g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert (freq - _probs(logits)[0]).abs().max() < 0.03
    gens = [sampling.make_generator(1), sampling.make_generator(2)]
    two = sampling.sample(logits.repeat(2, 1), generator=gens)
    again = [sampling.sample(logits, generator=sampling.make_generator(s)) for s in (1, 2)]
    assert two.tolist() == [int(a) for a in again]


def test_padded_vocab_is_never_sampled():
    m = make_model(vocab_size=70)  # 128 rows internally
    assert m.config.padded_vocab_size == 128
    with torch.no_grad():
        m.lm_head.weight[70:].fill_(5.0)  # padded rows would win if they were ever sampled
        m.wte.weight[70:].fill_(5.0)
    out = m.generate(torch.randint(0, 70, (4, 2)), 40, temperature=2.0, seed=0)
    assert out.max() < 70
    logits, _ = m(out)
    assert logits.size(-1) == 70


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_follows_weight_changes(backend):
    # The fused step (ext on a CPU) decodes from packed copies of the weights: they must never
    # go stale (in-place updates, a loaded state dict, a cast).
    m = make_model(backend=backend)
    idx = torch.randint(0, 97, (2, 5))
    m.generate(idx, 4, temperature=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    _, loss = m(idx, idx)
    loss.backward()
    opt.step()  # in-place updates
    assert torch.equal(m.generate(idx, 10, temperature=0), m.generate(idx, 10, temperature=0, use_cache=False))
    other = make_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m.generate(idx, 10, temperature=0), other.generate(idx, 10, temperature=0, use_cache=False))
    m.to(torch.float64)
    assert torch.equal(m.generate(idx, 10, temperature=0), m.generate(idx, 10, temperature=0, use_cache=False))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_generation(backend):
    m = make_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    ref = m.generate(prompts, 12, temperature=0)
    g = make_model(backend=backend).cuda()
    assert g.generate(prompts, 12, temperature=0) == ref
    idx = torch.tensor(prompts[1], device="cuda")[None]
    assert torch.equal(g.generate(idx, 12, temperature=0), g.generate(idx, 12, temperature=0, use_cache=False))
    g = g.to(torch.bfloat16)  # bf16: cached logits agree with the full forward's within bf16 tolerance
    cached = g.forward_cached(idx, g.new_kv_cache(1, 16)).float()
    torch.testing.assert_close(cached, g(idx)[0][:, -1].float(), rtol=5e-2, atol=5e-2)


# -----------------------------------------------------------------------------------------------
# compile_decode: the fast cached step


@pytest.mark.parametrize("arch,backend", [("modern", "torch"), pytest.param("modern", "ext", marks=needs_ext),
                                          pytest.param("gpt2", "ext", marks=needs_ext)])
def test_compile_decode_keeps_greedy_tokens(arch, backend):
    # modern + ext: the fused CPU step; gpt2 (LayerNorm, GELU, biases) and torch: torch.compile.
    m = make_model(arch, backend)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    plain = m.generate(prompts, 12, temperature=0)
    assert m.compile_decode() is m
    # (A library built before decode_step gets torch.compile for every model.)
    has_fused = ops.AVAILABLE and hasattr(torch.ops.gptmod, "decode_step")
    fused = arch == "modern" and backend == "ext" and has_fused
    assert m.decoder.choose_step(m, (2, 1)) == ("fused" if fused else "compiled")
    assert m.decoder.choose_step(m, (2, 7)) == ("plain" if fused else "compiled")
    m.compile_decode()  # a second call is harmless: the same step, no recompilation
    assert m.generate(prompts, 12, temperature=0) == plain
    assert plain[1] == greedy_reference(m, prompts[1], 12)
    # The low-level API goes through the same step: a prefill then single tokens, row by row.
    cache = m.new_kv_cache(2, 32)
    logits = m.forward_cached(torch.tensor([prompts[1]]), cache, rows=1)
    ref, _ = m(torch.tensor([prompts[1]]))
    torch.testing.assert_close(logits, ref[:, -1], rtol=1e-4, atol=1e-4)


@needs_ext
def test_fused_decode_tokens_equal_torch_backend():
    # The fused step against the plain reference backend, a batch of ragged prompts (bf16 rounds
    # differently from eager bf16, so its logits are compared in test_decode_step.py instead).
    m = make_model("modern", "torch", n_layer=3)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [3]]

    def agrees(got, ref):  # equal up to a float64 near tie (CPU-dependent rounding)
        for p, g, r in zip(prompts, got, ref):
            assert_greedy_agrees(g[len(p):], r[len(p):], p, float64_next_logits(m))
    ref = m.generate(prompts, 16, temperature=0)
    m.backend = "ext"
    assert m.decoder.choose_step(m, (3, 1)) == "fused"  # the default on CPUs
    agrees(m.generate(prompts, 16, temperature=0), ref)
    # Weights changed in place: the packed copies follow.
    with torch.no_grad():
        m.lm_head.weight.mul_(-1)
    m.backend = "torch"
    ref = m.generate(prompts, 16, temperature=0)
    m.backend = "ext"
    agrees(m.generate(prompts, 16, temperature=0), ref)
