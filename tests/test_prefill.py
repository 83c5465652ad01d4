"""Cached prefill (issue 15): a prompt into empty cache rows is attended with SDPA(is_causal) on
the new tokens, not with decode_attention; a chunk appended to non-empty rows goes through the
cache. Both must give the logits of a plain float64 forward of the whole sequence, ragged rows
included, and leave a cache that later steps read correctly.

The reference is the uncached forward of a float64 copy of the model (torch backend): it shares
no code with the cached path but the layers' weights.
"""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptmod_ext.model import GPT, GPTConfig
from helpers import needs_ext

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", pytest.param("ext", marks=needs_ext)]
CONFIGS = {
    "gqa": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2),
    "mha_learned": dict(n_layer=2, n_embd=64, n_head=4, pos_emb="learned", norm="layernorm",
                        mlp="gelu", bias=True),
}
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2}


def make_model(arch, backend, device="cpu", dtype=torch.float32):
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=97, block_size=96, **CONFIGS[arch])).eval()
    ref = copy.deepcopy(m).double()
    ref.backend = "torch"
    m = m.to(device=device, dtype=dtype)
    m.backend = backend
    # The layers' own cached forward is what these tests look into (which kernels a prefill or
    # a chunk runs); the fused CPU decode step has tests of its own (test_decode_step.py).
    m.decoder.fused = False
    return m, ref


def ref_logits(ref, tokens):
    """float64 logits of a plain forward of one token list: [len, V]."""
    with torch.no_grad():
        return ref(torch.tensor([tokens]))[0][0]


def close(got, want, dtype):
    torch.testing.assert_close(got.double().cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])


class OpLog(TorchDispatchMode):
    """Records the names of the ops a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _prefill_then_chunk(backend, arch, device, dtype):
    m, ref = make_model(arch, backend, device, dtype)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (40, 23, 31)]
    first = [13, 5, 20]  # ragged first chunks, right-padded to 20
    cache = m.new_kv_cache(3, 96)
    idx = torch.zeros(3, max(first), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, first)):
        idx[i, :n] = torch.tensor(s[:n])
    lengths = torch.tensor(first)
    logits = m.forward_cached(idx.to(device), cache, lengths=lengths.to(device), all_logits=True)
    for i, (s, n) in enumerate(zip(seqs, first)):
        close(logits[i, :n], ref_logits(ref, s[:n]), dtype)
    assert cache.seqlens.tolist() == first
    # Chunked prefill: the rest of each sequence appended to the now non-empty rows, ragged again.
    rest = [len(s) - n for s, n in zip(seqs, first)]
    idx2 = torch.zeros(3, max(rest), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, first)):
        idx2[i, :len(s) - n] = torch.tensor(s[n:])
    logits2 = m.forward_cached(idx2.to(device), cache, lengths=torch.tensor(rest).to(device),
                               all_logits=True)
    for i, (s, n) in enumerate(zip(seqs, first)):
        close(logits2[i, :len(s) - n], ref_logits(ref, s)[n:], dtype)
    # One decode step reads everything both prefills wrote.
    nxt = torch.tensor([[7], [8], [9]])
    step = m.forward_cached(nxt.to(device), cache)
    for i, s in enumerate(seqs):
        close(step[i], ref_logits(ref, s + [7 + i])[-1], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_prefill_and_chunked_prefill_match_float64(backend, arch):
    _prefill_then_chunk(backend, arch, "cpu", torch.float32)


class MatmulRows(TorchDispatchMode):
    """Records how many rows each matrix product's input has."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Under inference mode a Linear reaches the dispatcher as aten.linear, not mm.
        if func in (torch.ops.aten.mm.default, torch.ops.aten.linear.default):
            self.rows.append(args[0].size(0))
        elif func is torch.ops.aten.addmm.default:
            self.rows.append(args[1].size(0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("history", [False, True])
def test_ragged_prefill_runs_the_real_tokens_alone(backend, arch, history):
    # The linear layers of a ragged prefill see the real tokens only (the server's batched
    # prefill pads prompts of 8..96 tokens to nearly twice their count), and each row's
    # next-token logits are right, a row of length 0 riding along (as a decoding sequence
    # does between two prefilling ones) included. history: that row holds a sequence, so the
    # chunk goes through the cache (decode_attention) instead of fresh causal attention.
    m, ref = make_model(arch, backend)
    g = torch.Generator().manual_seed(1)
    cache = m.new_kv_cache(4, 96)
    past = torch.randint(0, 97, (9,), generator=g).tolist()
    if history:
        m.forward_cached(torch.tensor([past]), cache, rows=1)
    lens = [12, 0, 3, 7]
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lens]
    idx = torch.zeros(4, max(lens), dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    with MatmulRows() as mm:
        logits = m.forward_cached(idx, cache, lengths=torch.tensor(lens))
    assert set(mm.rows) == {sum(lens), 4}  # every block on 22 tokens, the head on 4 rows
    for i in (0, 2, 3):
        close(logits[i], ref_logits(ref, seqs[i])[-1], torch.float32)
    assert cache.seqlens.tolist() == [12, 9 if history else 0, 3, 7]
    # The next step reads what the packed prefill wrote, and the riding row's own history.
    step = m.forward_cached(torch.tensor([[5], [6], [7], [8]]), cache)
    for i in (0, 2, 3):
        close(step[i], ref_logits(ref, seqs[i] + [5 + i])[-1], torch.float32)
    if history:
        close(step[1], ref_logits(ref, past + [6])[-1], torch.float32)


def test_ragged_call_with_no_real_token_changes_nothing():
    # Every row riding along (lengths all 0): nothing to pack, no row advances.
    m, _ = make_model("gqa", "torch")
    cache = m.new_kv_cache(2, 32)
    m.forward_cached(torch.randint(0, 97, (2, 4)), cache)
    m.forward_cached(torch.zeros(2, 3, dtype=torch.long), cache, lengths=torch.zeros(2, dtype=torch.long))
    assert cache.seqlens.tolist() == [4, 4]


@needs_ext
def test_prefill_into_empty_rows_skips_decode_attention():
    m, _ = make_model("gqa", "ext")
    cache = m.new_kv_cache(2, 64)
    idx = torch.randint(0, 97, (2, 16))
    with OpLog() as log:
        m.forward_cached(idx, cache)
    assert not any("decode_attention" in n for n in log.names)
    assert sum("kv_cache_write" in n for n in log.names) == m.config.n_layer
    # Non-empty rows (the next chunk, a decode step) read the cache through decode_attention.
    for more in (torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 1))):
        with OpLog() as log:
            m.forward_cached(more, cache)
        assert sum("decode_attention" in n for n in log.names) == m.config.n_layer


@needs_ext
def test_one_empty_row_among_full_ones_reads_the_cache():
    # The fast path needs every selected row empty: one row with history must attend to it.
    m, ref = make_model("gqa", "ext")
    cache = m.new_kv_cache(2, 64)
    a = torch.randint(0, 97, (1, 10))
    m.forward_cached(a, cache, rows=0)
    b = torch.randint(0, 97, (2, 6))
    with OpLog() as log:
        logits = m.forward_cached(b, cache, all_logits=True)  # row 0 has 10 rows, row 1 none
    assert any("decode_attention" in n for n in log.names)
    close(logits[0], ref_logits(ref, a[0].tolist() + b[0].tolist())[10:], torch.float32)
    close(logits[1], ref_logits(ref, b[1].tolist()), torch.float32)
    # A slice of only empty rows is fresh even when other rows of the cache are not.
    cache.reset(1)
    with OpLog() as log:
        logits = m.forward_cached(b[:1], cache, rows=slice(1, 2))
    assert not any("decode_attention" in n for n in log.names)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_and_chunked_prefill_cuda(backend, dtype):
    _prefill_then_chunk(backend, "gqa", "cuda", dtype)
