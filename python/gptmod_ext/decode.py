"""How cached decoding runs: the step behind GPT.forward_cached and generate.

The model (model.py) is the layers and their readable cached forward, `GPT.cached_step`. This
module decides how a cached forward call runs, as gpt-fast's generate.py decides how its model
runs, and owns what that needs (packed weights, a compiled function). `Decoder.choose_step`
names the step for a call, from what the call is and what the model and device allow:

  'fused'     one torch.ops.gptmod.decode_step over every layer, weights packed once
              (FusedDecode): a step of one token per row, at most FusedDecode.MAX_ROWS rows,
              on a CPU with the ext backend, for the models it covers (RMSNorm / RoPE / SwiGLU
              sequential blocks without biases or QK-norm), fp32 or bf16. The default wherever
              it can run: it costs nothing to set up and decodes several times faster than the
              plain step on a small model (eager PyTorch spends ~570 dispatches on a token).
  'compiled'  GPT.cached_step through torch.compile: what compile_decode() adds where 'fused'
              cannot run (GPUs, other architectures); the first call of a shape compiles.
  'plain'     GPT.cached_step as it is: prefill, wide steps, the torch backend, training mode
              with dropout, or everything when the fused step is turned off.

Every model carries a Decoder (`model.decoder`); `model.decoder.fused = False` turns the fused
step off (the sampler's and the server's --no-fused), `model.compile_decode()` turns the
compiled step on. Greedy tokens are those of the plain step either way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _ext, ops


def weights_key(params) -> tuple:
    """Changes whenever a tensor is replaced, updated in place or cast: packed copies are stale.
    (A model built under torch.inference_mode has inference tensors, which keep no version
    counter: for those only replacement and casts count.)"""
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype) for p in params)


class FusedDecode:
    """The CPU decode step as one op (torch.ops.gptmod.decode_step), every layer in one call,
    with the weights packed once into the blocked layout of its matrix-vector kernel.

    The op does the norms, RoPE, the KV write, attention, SwiGLU and the residual adds between
    its matrix-vector products itself; the layers' own forward stays the readable reference it
    is tested against. Packed weights are remade when a weight changes (weights_key)."""

    QUANTIZE = (None, "int8")  # the weight formats it reads besides the model's own dtype

    # Its blocked matrix-vector kernel beats the GEMMs of the plain step up to about 16 rows
    # (small preset, 2-core Xeon: 2.0 vs 3.7 ms at 1 row, 6.0 vs 6.9 at 16, 13.2 vs 9.5 at 32).
    MAX_ROWS = 16

    def __init__(self, model, quantize: Optional[str] = None, group_size: int = ops.INT8_GROUP):
        params = self.params(model)
        n_norms = 2 * len(model.h) + 1
        self.group_size = group_size
        self.key = (weights_key(params), quantize, group_size)
        with torch.no_grad():
            self.norms = [p.detach().contiguous() for p in params[:n_norms]]
            # int8: one fp32 scale per output and group of 64 inputs (llama.cpp's Q8_0 takes one
            # per 32: 32, 64 and 128 measured the same in speed and quality on the benchmark
            # model, and 64 divides every preset's widths).
            self.linears, self.scales = ops.pack_decode_linears(
                [w.detach() for w in params[n_norms:]], quantize, group_size)

    @staticmethod
    def params(model) -> list:
        """The weights the op reads: every norm (ln_1, ln_2 per layer, ln_f), then every linear
        (qkv, out, gate|up, down per layer, lm_head), in the op's order."""
        h = model.h
        norms = [n.weight for b in h for n in (b.ln_1, b.ln_2)] + [model.ln_f.weight]
        linears = [lin.weight for b in h for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc,
                                                    b.mlp.c_proj)] + [model.lm_head.weight]
        return norms + linears

    @staticmethod
    def unsupported(model, quantize: Optional[str] = None) -> Optional[str]:
        """Why the fused step cannot run this model here (with its weights as they are, or in
        int8: quantize='int8'), or None when it can."""
        c = model.config
        if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
            return (f"the fused decode step is for float32/bfloat16 on CPUs, not {model.dtype} "
                    f"on {model.device}")
        if not (c.norm == "rmsnorm" and c.pos_emb == "rope" and c.mlp == "swiglu" and not c.bias
                and not c.parallel_block and not c.qk_norm):
            return ("the fused decode step covers RMSNorm/RoPE/SwiGLU sequential blocks without "
                    "biases or QK-norm")
        if not (_ext.AVAILABLE and hasattr(torch.ops.gptmod, "decode_step")):
            return "the compiled library has no decode_step op (rebuild it)"
        if quantize is not None and not hasattr(torch.ops.gptmod, "pack_linear_int8"):
            return "the compiled library has no int8 decode ops (rebuild it)"
        return None

    def current(self, model, quantize: Optional[str]) -> bool:
        return self.key == (weights_key(self.params(model)), quantize, self.group_size)

    def step(self, model, idx, cache, rows: slice, lengths=None):
        """A cached forward of one token per row (idx [b, 1]) -> logits [b, vocab_size].
        lengths: None, or int [b] of 1s and 0s: rows of 0 ride along (the server's free and
        prefilling slots): their K/V write is a throw-away row and their length stays."""
        c = model.config
        whole = rows == slice(None)
        lens = cache.seqlens if whole else cache.seqlens[rows]
        kv = cache.buffer if whole else cache.buffer[:, :, rows]
        logits = torch.ops.gptmod.decode_step(
            model.wte(idx.view(-1)), self.norms, self.linears, kv, lens, model.rope_cos,
            model.rope_sin, c.n_head, c.n_kv_head, c.ffn_hidden, c.padded_vocab_size, c.norm_eps,
            c.logit_softcap, c.rope_interleaved, self.scales)
        lens.add_(1 if lengths is None else lengths.to(lens))
        return logits[:, :c.vocab_size]


# A step: (idx [b, T], cache, rows: slice, lengths or None, all_logits, fresh) -> logits,
# the arguments of GPT.cached_step.
Step = Callable[..., torch.Tensor]


def pick_step(fused_ok: bool, compiled: bool, b: int, T: int, all_logits: bool) -> str:
    """The one rule that names the step of a cached forward of b rows of T tokens."""
    if fused_ok:
        # Prefill and wide steps stay plain: the plain step's GEMMs win there.
        return "fused" if T == 1 and b <= FusedDecode.MAX_ROWS and not all_logits else "plain"
    return "compiled" if compiled else "plain"


class Decoder:
    """Which step runs a model's cached forward calls, and the state the steps need."""

    def __init__(self):
        self.fused = True        # the fused CPU step wherever it can run
        self.compiled = False    # compile_decode(): torch.compile where the fused step cannot run
        self.quantize: Optional[str] = None  # 'int8': the fused step reads int8 weights
        self._fused: Optional[FusedDecode] = None
        self._compiled_step: Optional[Step] = None

    def fused_reason(self, model) -> Optional[str]:
        """Why the fused step will not run for this model now, or None when it will."""
        if not self.fused:
            return "the fused decode step is turned off (model.decoder.fused = False)"
        if model.backend != "ext":
            return "the fused decode step is part of the ext backend"
        if model.training and model.config.dropout > 0:
            return "the model is in training mode with dropout"
        return FusedDecode.unsupported(model, self.quantize)

    def choose_step(self, model, idx_shape, all_logits: bool = False) -> str:
        """'fused', 'compiled' or 'plain': the step that runs a cached forward of idx_shape
        [b, T] now (see the module docstring)."""
        b, T = idx_shape
        return pick_step(self.fused_reason(model) is None, self.compiled, b, T, all_logits)

    def compile(self, model, quantize: Optional[str] = None) -> None:
        """torch.compile of the plain step where the fused step does not run (the fused step,
        where it runs, is on by default). quantize='int8': the fused step reads weights
        quantized to int8 (once, here), or, where it cannot run, a ValueError says why. A second
        call with the same arguments changes nothing."""
        if quantize not in FusedDecode.QUANTIZE:
            raise ValueError(f"quantize must be one of {FusedDecode.QUANTIZE}, got {quantize!r}")
        if quantize is not None:
            why = FusedDecode.unsupported(model, quantize) or (
                None if model.backend == "ext" else "it is part of the ext backend")
            if why is not None or not self.fused:
                raise ValueError(f"int8 decoding runs in the fused CPU decode step, which cannot "
                                 f"run here: {why or 'it is turned off (--no-fused)'}")
        self.compiled, self.quantize = True, quantize
        if quantize is not None:
            self._packed(model)  # quantized once, at load, not at the first token

    def describe(self, model) -> str:
        """How a decode step (one token per row) runs, for load reports: 'fused CPU decode
        step', 'torch.compile', or 'plain (why not fused)'."""
        name = self.choose_step(model, (1, 1))
        if name == "fused":
            return "fused CPU decode step" + (f", {self.quantize} weights" if self.quantize else "")
        if name == "compiled":
            return "torch.compile"
        return f"plain ({self.fused_reason(model)})"

    def bind(self, model) -> Step:
        """The step function for model's current weights and settings, resolved once (generate
        binds once per call, forward_cached once per step)."""
        fused_ok = self.fused_reason(model) is None
        fused = self._packed(model) if fused_ok else None
        compiled = self._compiled(model) if self.compiled and not fused_ok else None

        def step(idx, cache, rows, lengths, all_logits=False, fresh=False):
            name = pick_step(fused_ok, compiled is not None, idx.size(0), idx.size(1), all_logits)
            if name == "fused":
                return fused.step(model, idx, cache, rows, lengths)
            if name == "compiled":
                return compiled(idx, cache, rows, lengths, all_logits, fresh, False)
            return model.cached_step(idx, cache, rows, lengths, all_logits, fresh)
        return step

    def _packed(self, model) -> FusedDecode:
        if self._fused is None or not self._fused.current(model, self.quantize):
            self._fused = FusedDecode(model, self.quantize)
        return self._fused

    def _compiled(self, model) -> Step:
        if self._compiled_step is None:
            self._compiled_step = torch.compile(model.cached_step, dynamic=False)
        return self._compiled_step


# -- the decode options of the sampler and the server ---------------------------------------------
def add_arguments(parser) -> None:
    """--no-fused, --compile and --quantize, as `sample` and `serve` take them."""
    a = parser.add_argument
    a("--no-fused", action="store_true",
      help="decode with the layers' own step instead of the fused CPU decode step (the "
           "default where it runs: CPU, ext backend, the modern architecture)")
    a("--compile", action="store_true",
      help="torch.compile the decode step where the fused one does not run (GPUs, other "
           "architectures; GPT.compile_decode(); each new shape pays the compile time)")
    a("--quantize", choices=["int8"], default=None,
      help="int8: the fused CPU decode step reads weights quantized to int8 (groups of 64 "
           "inputs, fp32 scales), prefill stays in the weights' dtype")


def configure(model, args) -> None:
    """Applies those options to a loaded model; ValueError where they cannot apply."""
    if args.no_fused and args.quantize:
        raise ValueError(f"--quantize {args.quantize} runs in the fused decode step; drop "
                         f"--no-fused")
    model.decoder.fused = not args.no_fused
    if args.compile or args.quantize:
        model.compile_decode(quantize=args.quantize)
