"""Hugging Face interop on tiny random models built here (nothing is downloaded): logits and greedy
tokens against transformers' own implementation, from objects and from saved directories, and
the to_hf round trip."""
import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gptmod_ext import hf
from gptmod_ext.model import GPT, GPTConfig
from helpers import assert_greedy_agrees, float64_next_logits, needs_ext

BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]
NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tied=False, kv_heads=2, head_dim=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
                      tie_word_embeddings=tied, **NO_SPECIAL_IDS)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than HF's init: greedy decoding without near-ties
        m.lm_head.weight.normal_(0, 1.0)
    return m


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     layer_norm_epsilon=1e-5, **NO_SPECIAL_IDS)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        m.transformer.wte.weight.normal_(0, 0.5)
    return m


def hf_greedy(model, idx, n):
    with torch.no_grad():
        return model.generate(idx, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              attention_mask=torch.ones_like(idx))


def check_parity(ours, theirs, backend="torch"):
    ours.backend = backend
    idx = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        want = theirs(idx).logits
    torch.testing.assert_close(ours(idx)[0], want, rtol=1e-4, atol=1e-4)
    # Random weights: close logits, so greedy agrees up to a near tie (CPU-dependent rounding).
    got, expected = ours.generate(idx, 16, temperature=0), hf_greedy(theirs, idx, 16)
    for g, w, p in zip(got, expected, idx):
        assert_greedy_agrees(g[13:], w[13:], p.tolist(), float64_next_logits(ours))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama_gqa", "llama_mqa_tied", "gpt2"])
def test_from_hf_object(kind, backend):
    theirs = {"llama_gqa": lambda: tiny_llama(),
              "llama_mqa_tied": lambda: tiny_llama(tied=True, kv_heads=1, head_dim=24),
              "gpt2": tiny_gpt2}[kind]()
    ours = hf.from_hf(theirs)
    c = ours.config
    if kind == "gpt2":
        assert (c.pos_emb, c.norm, c.mlp, c.bias, c.tie_embeddings) == ("learned", "layernorm", "gelu", True, True)
    else:
        assert (c.pos_emb, c.norm, c.mlp, c.rope_base) == ("rope", "rmsnorm", "swiglu", 5000.0)
        assert c.n_kv_head == theirs.config.num_key_value_heads and c.head_dim == theirs.config.head_dim
    check_parity(ours, theirs, backend)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_local_directory(kind, tmp_path):
    theirs = tiny_llama() if kind == "llama" else tiny_gpt2()
    theirs.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    check_parity(hf.from_hf(tmp_path), theirs)
    check_parity(hf.from_hf(str(tmp_path)), theirs)


@pytest.mark.parametrize("preset", ["tiny", "gpt2"])
def test_to_hf_round_trip(preset, tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset(preset, vocab_size=101, n_layer=2, n_embd=64, n_head=4,
                                     block_size=64)).eval()
    with torch.no_grad():
        ours.lm_head.weight.mul_(30)
    theirs = hf.to_hf(ours)
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if preset == "gpt2" else "LlamaForCausalLM")
    check_parity(ours, theirs)
    back = hf.from_hf(theirs)
    assert back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    theirs.save_pretrained(tmp_path)  # and through a directory
    again = hf.from_hf(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_nanogpt_architecture_exports_to_gpt2_with_exact_gelu_and_zero_biases():
    # nanoGPT: GPT-2's layout with nn.GELU() (HF's activation "gelu") and, by default, no biases
    # (the same function as GPT-2 with zero biases).
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2", vocab_size=101, n_layer=2, n_embd=64, n_head=4,
                                block_size=64, gelu_approx="none", bias=False)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # O(1) activations and logits: tanh and erf GELU differ visibly
        for name, p in ours.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "wte" in name or "wpe" in name else 2 * p.size(1) ** -0.5)
    theirs = hf.to_hf(ours)
    assert theirs.config.activation_function == "gelu"
    assert theirs.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    idx = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        want = theirs(idx).logits
        torch.testing.assert_close(ours(idx)[0], want, rtol=1e-4, atol=1e-4)
        tanh = GPT(dataclasses.replace(cfg, gelu_approx="tanh")).eval()
        tanh.load_state_dict(ours.state_dict())
        # The tolerance tells the two GELUs apart: the exact form is what HF computes.
        assert not torch.allclose(tanh(idx)[0], want, rtol=1e-4, atol=1e-4)
        back = hf.from_hf(theirs)
        assert back.config.gelu_approx == "none" and back.config.bias
        torch.testing.assert_close(back(idx)[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,words", [
    (dict(logit_softcap=30.0), "soft-cap"), (dict(parallel_block=True), "parallel"),
    (dict(qk_norm=True), "QK-norm"), (dict(bias=True), "biases"),
    (dict(norm="layernorm"), "LayerNorm"), (dict(rope_interleaved=True), "interleaved"),
    (dict(mlp="gelu"), "GELU"), (dict(pos_emb="learned"), "learned"),
])
def test_to_hf_refuses_what_llama_cannot_express(change, words):
    cfg = dataclasses.replace(GPTConfig.from_preset("tiny", n_layer=1, n_embd=64, n_head=4,
                                                    vocab_size=64), **change)
    with pytest.raises(ValueError, match=words):
        hf.to_hf(GPT(cfg), arch="llama")
    with pytest.raises(ValueError, match="gpt2 cannot express"):
        hf.to_hf(GPT(GPTConfig.from_preset("tiny", n_layer=1, vocab_size=64)), arch="gpt2")


def test_from_hf_refuses_unsupported_checkpoints():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        hf.from_hf(LlamaForCausalLM(cfg))
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                     activation_function="relu")
    with pytest.raises(ValueError, match="activation_function"):
        hf.from_hf(GPT2LMHeadModel(cfg))


# -- our tokenizers as transformers tokenizers ---------------------------------------------------

CORPUS = ("def add(a, b):\n    return a + b  # sum\n\nclass Point:\n\tx: int = 0\n"
          "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? "
          "naïve café Größe 你好世界 🙂 1234567 12 4096, we'll see: the dog's bone...\n\n") * 20
HELD_OUT = [
    "for i in range(10):\n\tif i % 2:\n\t\tprint(f'{i:>4}')  # odd\n",
    "a    b\t\t\tc \t \t d      \n\n\n   \t", "line one\r\nline two\r\n\r\n\rx",
    "Ελληνικά, русский, 日本語のテキスト, עברית, ﷽", "🙂👍🏽👨‍👩‍👧 🇫🇷 ok",
    "\u00a0nbsp\u3000wide\u2028sep\u200bzw\x0bvt\x0cff\x00nul", "I'll've DON'T 1234567 3.14159",
    "end<|endoftext|>start", "", " ", "\n",
]


def random_texts(n, seed=0):
    """Strings drawn from a pool that mixes ASCII, whitespace kinds, letters of several
    scripts, digits and emoji, to hit the split pattern's corners."""
    import random
    pool = list("ab Z9_'.,;:(){}\t\n\r  \u00a0\u3000é中🙂ß\u0301\u05d0-+*/\\\"") + ["'s", "'LL", "<|endoftext|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def our_tokenizer(kind):
    from gptmod_ext import tokenizer
    if kind == "bytes":
        return tokenizer.byte_tokenizer()
    bpe = tokenizer.train_bpe([CORPUS], 400)
    if kind == "bpe":
        return bpe
    # GPT-2's files need the network: its split pattern over our ranks stands in for them.
    from tiktoken_ext.openai_public import r50k_pat_str
    return tokenizer.Tokenizer("gpt2", "gpt2", r50k_pat_str, bpe.mergeable_ranks,
                               bpe.special_tokens)


@pytest.mark.parametrize("kind", ["bpe", "bytes", "gpt2"])
def test_to_hf_tokenizer_same_ids_as_tiktoken(kind):
    ours = our_tokenizer(kind)
    theirs = hf.to_hf_tokenizer(ours, model_max_length=64)
    assert len(theirs) == ours.vocab_size and theirs.model_max_length == 64
    assert theirs.eos_token_id == ours.eot_id == theirs.bos_token_id
    if kind != "bytes":
        assert len(ours.encode(CORPUS)) < len(CORPUS.encode()) / 2  # real merges are exercised
    for s in HELD_OUT + random_texts(300):
        ids = theirs.encode(s)
        assert ids == ours.encode(s), repr(s)  # tiktoken's encoding is the reference
        assert theirs.decode(ids) == s, repr(s)
    ids = theirs.encode("x<|endoftext|>")
    assert ids[-1] == ours.eot_id and theirs.decode(ids, skip_special_tokens=True) == "x"


def test_to_hf_tokenizer_refuses_ids_it_cannot_keep():
    from gptmod_ext import tokenizer
    byte = tokenizer.byte_tokenizer()
    gap = tokenizer.Tokenizer("bytes", "gap", byte.pattern, byte.mergeable_ranks,
                              {tokenizer.EOT: 300})  # the converter would number it 256
    with pytest.raises(ValueError, match="differ"):
        hf.to_hf_tokenizer(gap)
