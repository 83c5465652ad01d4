"""int8 decoding through the model and the command lines: GPT.compile_decode(quantize='int8'),
checkpoint.load_model(quantize=...), `sample --quantize int8` and `serve --quantize int8`, against
a float64 model of the dequantized weights (the ops themselves: test_decode_step.py)."""
import copy

import pytest
import torch
from helpers import assert_greedy_agrees, needs_ext, train_steps

from gptmod_ext import GPT, GPTConfig, checkpoint, ops, reference, sample
from gptmod_ext import tokenizer as tokenizer_mod
from gptmod_ext.decode import FusedDecode

pytestmark = [needs_ext, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(ops.AVAILABLE and not hasattr(torch.ops.gptmod, "pack_linear_int8"),
                                 reason="the library was built before the int8 ops: rebuild it")]

TEXT = "the cat sat on the mat. the dog ran far away. a bird sang in the tree. " * 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small modern model trained on TEXT (clear greedy choices), saved as a run."""
    tok = tokenizer_mod.byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=64))
    train_steps(model, torch.tensor(tok.encode(TEXT)), 150)
    run = tmp_path_factory.mktemp("run")
    checkpoint.save_model(run, model, tok)
    return model.eval(), tok, run


def dequantized(model, G=ops.INT8_GROUP):
    """A float64 copy whose decode Linear weights are the int8-rounded ones (torch backend)."""
    ref = copy.deepcopy(model).double()
    ref.backend = "torch"
    with torch.no_grad():
        for w in FusedDecode.params(ref)[2 * len(ref.h) + 1:]:
            q, s = reference.quantize_int8(w.float(), G)
            w.copy_(reference.dequantize_int8(q, s, G))
    return ref


def test_compile_decode_int8_matches_the_dequantized_model(trained):
    model, tok, _ = trained
    m = copy.deepcopy(model)
    m.backend = "ext"
    assert m.compile_decode(quantize="int8") is m
    assert m.decoder.choose_step(m, (3, 1)) == "fused"
    assert m.decoder.describe(m) == "fused CPU decode step, int8 weights"
    ref = dequantized(model)
    # Logits of a decode step: within the activations' int8 rounding of the dequantized model.
    prompt = tok.encode("the cat sat on")
    cache = m.new_kv_cache(1, 64)
    m.forward_cached(torch.tensor([prompt]), cache)
    got = m.forward_cached(torch.tensor([[tok.encode(" ")[0]]]), cache)[0].double()
    with torch.no_grad():
        want = ref(torch.tensor([prompt + tok.encode(" ")]))[0][0, -1]
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 0.01 * scale
    assert (got - want).abs().max().item() > 0  # the int8 path really ran
    # Greedy tokens: the dequantized model's, up to a step where it is undecided within that
    # rounding (a trained model: such steps are rare, and most of each row must agree).

    def next_logits(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids]))[0][0, -1]
    for p in ("the cat", "a bird", "the dog ran"):
        ids = tok.encode(p)
        fast = m.generate([ids], 40, temperature=0)[0][len(ids):]
        with torch.no_grad():
            slow = ref.generate([ids], 40, temperature=0)[0][len(ids):]
        assert assert_greedy_agrees(fast, slow, ids, next_logits, tie=0.02 * scale) >= 20


def test_int8_bad_input_is_one_clear_error(trained):
    model, _, _ = trained
    m = copy.deepcopy(model)
    m.backend = "ext"
    with pytest.raises(ValueError, match="quantize must be one of"):
        m.compile_decode(quantize="int4")
    m.backend = "torch"
    with pytest.raises(ValueError, match="int8 decoding runs in the fused CPU decode step.*ext"):
        m.compile_decode(quantize="int8")
    gpt2 = GPT(GPTConfig.from_preset("gpt2", vocab_size=64, block_size=32, n_layer=1, n_head=2,
                                     n_embd=32), backend="ext")
    with pytest.raises(ValueError, match="covers RMSNorm/RoPE/SwiGLU"):
        gpt2.compile_decode(quantize="int8")
    m.backend = "ext"
    m.decoder.fused = False
    with pytest.raises(ValueError, match="turned off"):
        m.compile_decode(quantize="int8")
    with pytest.raises(checkpoint.CheckpointError, match="--quantize int8: .*ext backend"):
        checkpoint.load_model(trained[2], device="cpu", backend="torch", quantize="int8")


def test_sample_and_load_model_quantize(trained, capsys):
    model, tok, run = trained
    loaded, _, _ = checkpoint.load_model(run, device="cpu", backend="ext", quantize="int8")
    assert loaded.decoder.quantize == "int8"
    ids = tok.encode("the dog")
    want = loaded.generate([ids], 30, temperature=0)[0][len(ids):]
    code = sample.main(["--ckpt", str(run), "--prompt", "the dog", "--temperature", "0",
                        "--max-new-tokens", "30", "--backend", "ext", "--quantize", "int8",
                        "--no-echo"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "decode: fused CPU decode step, int8 weights" in err
    assert out == tok.decode(want) + "\n"
    code = sample.main(["--ckpt", str(run), "--prompt", "x", "--quantize", "int8", "--no-fused"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "drop --no-fused" in err


def test_serve_quantize(trained):
    from serve_util import live_server, openai_client

    model, tok, run = trained
    loaded, _, _ = checkpoint.load_model(run, device="cpu", backend="ext", quantize="int8")
    ids = tok.encode("a bird")
    want = tok.decode(loaded.generate([ids], 20, temperature=0)[0][len(ids):])
    with live_server(run, "--quantize", "int8", "--backend", "ext") as url:
        assert "int8 weights" in url.proc.stdout.readline()
        r = openai_client(url).completions.create(model=run.name, prompt="a bird", max_tokens=20,
                                                  temperature=0)
    assert r.choices[0].text == want
