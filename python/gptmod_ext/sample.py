"""Sample text from a trained run directory (or a Hugging Face Llama / GPT-2 folder, or a
nanoGPT / nanoGPT-moderno checkpoint).

    python -m gptmod_ext.sample --ckpt out/ --prompt "Once upon a time" --max-new-tokens 200
    echo -n "def main(" | python -m gptmod_ext.sample --ckpt out/ --temperature 0
    python -m gptmod_ext.sample --ckpt out/ --num-samples 3 --seed 1 --stop $'\\n\\n'
    python -m gptmod_ext.sample --ckpt out/ --interactive

What it does, in the terms of the flags:
- The prompt comes from --prompt, --prompt-file, or stdin (when neither is given, or with
  --prompt -), used exactly as given (no newline is stripped). An empty prompt starts a new
  document (the tokenizer's <|endoftext|> / BOS token).
- stdout carries only text: the prompt (unless --no-echo), then the continuation as it is
  produced (flushed per token, UTF-8 safe across token boundaries), then one newline. With
  --num-samples N > 1 each sample is preceded by a line `---------- sample i/N ----------`;
  all N are generated as one batch, sample 1 streams live and the others are printed after it.
- Generation ends at <|endoftext|> (not printed), at a --stop string (not printed, nor what
  follows; only the generated text is searched, not the prompt) or after --max-new-tokens.
  Each sample stops on its own. Bytes that are not UTF-8 print as U+FFFD, except a character
  left incomplete by the token limit, which is dropped.
- Context: a prompt that does not leave room for one new token is refused (exit 1); an
  explicit --max-new-tokens that would pass the model's block_size is reduced to fit, with a
  warning. Without --max-new-tokens, up to 256 tokens are generated, as many as fit.
- stderr: what was loaded, then prompt tokens, new tokens (all samples, each <|endoftext|>
  included), time to first token (prefill + first sample), tokens/s (new tokens over the whole
  generation time) and the seed (silenced by -q; warnings and errors are always shown).
- --stop: backslash escapes are decoded ('\\n' is a newline); a string that starts with '-'
  needs the --stop=STR form (also --prompt=STR).
- Errors are one line on stderr, `python -m gptmod_ext.sample: error: ...`: exit 1 for a
  checkpoint, prompt or runtime problem, 2 for a usage error. GPTMOD_DEBUG=1 shows tracebacks.
- --interactive reads one prompt per line (the model keeps no chat state; the line is not
  echoed) until EOF (Ctrl-D) or Ctrl-C, and exits 0.
- --chat is a conversation: each line is a user message, the model answers it with the whole
  conversation so far (--system opens it) rendered by the run's chat template (chat.py; a
  Hugging Face folder's own), and the answer ends at the end-of-text token; a model without a
  template gets plain "role: content" lines and its answer ends at "\\nuser:", as the server
  does. Only the answers go to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import decode, sampling
from .common import Parser, UserError, first_line, run_cli
from .devices import DTYPE_CHOICES, dtype_name
from .tokenizer import document_start

PROG = "python -m gptmod_ext.sample"
DEFAULT_MAX_NEW_TOKENS = 256
EPILOG = """\
stdout carries only text: the prompt (unless --no-echo), the continuation as it is produced,
one newline. With --num-samples N > 1, each sample follows a line
"---------- sample i/N ----------". Statistics go to stderr (-q hides them).
Errors: one line on stderr, exit 1 (2 for usage errors); GPTMOD_DEBUG=1 shows tracebacks.

examples:
  python -m gptmod_ext.sample --ckpt out/ --prompt "def main(" --temperature 0
  echo -n "Once upon a time" | python -m gptmod_ext.sample --ckpt out/ --seed 1
  python -m gptmod_ext.sample --ckpt out/ --num-samples 3 --stop '\\n\\n' --top-p 0.9
  python -m gptmod_ext.sample --ckpt path/to/hf_llama --interactive
"""


# What load_model read (ModelInfo.kind), as the load line names it.
KIND_NAMES = {"run": "run", "hf": "Hugging Face model", "nanogpt": "nanoGPT checkpoint",
              "moderno": "nanoGPT-moderno checkpoint"}


class SampleError(UserError):
    """A problem the user can fix (checkpoint, prompt, device); reported as one line, exit 1."""


# -----------------------------------------------------------------------------------------------
# Command line


def _unescape(s: str) -> str:
    # Lets `--stop '\n\n'` mean two newlines. latin-1 + backslashreplace keeps non-ASCII text
    # intact through unicode_escape (which would otherwise read it as latin-1 bytes).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown escape such as \q is kept as it is
        return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Generate text from a gptmod_ext run directory or a Hugging Face "
                "Llama/GPT-2 folder, streaming it to stdout.", epilog=EPILOG)
    a = p.add_argument
    a("--ckpt", default="out", help="run directory, HF model folder, or nanoGPT ckpt.pt / "
      "nanoGPT-moderno model_XXXXX.pt (or its directory) (default: out)")
    a("--tokenizer-path", default=None, metavar="PATH",
      help="for a nanoGPT/moderno checkpoint: its meta.pkl, or GPT-2's tokenizer files "
           "(r50k_base.tiktoken, or a directory with vocab.bpe + encoder.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text; '-' reads stdin (default: stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    a("--max-new-tokens", type=int, default=None,
      help=f"tokens to generate per sample (default: {DEFAULT_MAX_NEW_TOKENS}, or as many as "
           "fit the context)")
    a("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    a("--top-k", type=int, default=None, help="keep the k most likely tokens (>= 1)")
    a("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    a("--min-p", type=float, default=None, help="keep tokens with p >= min_p * p_max, in [0, 1]")
    a("--seed", type=int, default=None, help="random seed (same seed, same text); "
      "default: a random one, reported on stderr")
    a("--presence-penalty", type=float, default=0.0,
      help="subtract this from the logit of every token already generated, in [-2, 2]")
    a("--frequency-penalty", type=float, default=0.0,
      help="subtract this times a token's count among the generated tokens, in [-2, 2]")
    a("--repetition-penalty", type=float, default=1.0,
      help="divide positive (multiply negative) logits of tokens in the prompt or the output "
           "by this, > 0 (vLLM's; 1 = off)")
    a("--logit-bias", action="append", default=[], metavar="ID=BIAS",
      help="add BIAS in [-100, 100] to token ID's logit (-100 bans it); repeatable")
    a("--num-samples", type=int, default=1, help="samples generated as one batch (default: 1)")
    a("--stop", nargs="+", action="extend", default=[], metavar="STR",
      help="stop once a sample produces one of these strings (not printed); backslash escapes "
           "such as \\n are understood; use --stop=STR for strings starting with '-'")
    a("--no-echo", dest="echo", action="store_false", help="do not print the prompt")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    a("--dtype", default="auto", choices=DTYPE_CHOICES,
      help="auto: bfloat16 on GPUs that support it, else float32")
    a("--backend", default="auto", choices=["auto", "ext", "torch"],
      help="ext: our compiled ops; torch: pure PyTorch; auto: ext when built (default)")
    decode.add_arguments(p)
    a("-q", "--quiet", action="store_true", help="no load/speed report on stderr")
    a("--interactive", action="store_true",
      help="read prompts line by line until EOF (Ctrl-D) or Ctrl-C")
    a("--chat", action="store_true",
      help="a conversation: one user message per line, answered with the history through the "
           "model's chat template, until EOF (Ctrl-D) or Ctrl-C")
    a("--system", default=None, metavar="TEXT", help="with --chat: the system message")
    return p


# The flag that sets each SamplingParams field, to word its range errors as the CLI's own.
FLAGS = {"max_tokens": "--max-new-tokens", "n": "--num-samples", "top_k": "--top-k",
         "top_p": "--top-p", "min_p": "--min-p", "presence_penalty": "--presence-penalty",
         "frequency_penalty": "--frequency-penalty", "repetition_penalty": "--repetition-penalty",
         "logit_bias": "--logit-bias", "temperature": "--temperature", "seed": "--seed",
         "stop": "--stop"}


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with args.params: the sampling.SamplingParams they make (its max_tokens is
    decided per prompt, from the room the context leaves)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interactive and (args.prompt is not None or args.prompt_file):
        parser.error("--interactive reads its prompts from stdin; drop --prompt/--prompt-file")
    if args.chat and (args.prompt is not None or args.prompt_file or args.interactive
                      or args.num_samples != 1):
        parser.error("--chat reads its messages from stdin and answers each once; drop "
                     "--prompt/--prompt-file/--interactive/--num-samples")
    if args.system is not None and not args.chat:
        parser.error("--system is for --chat")
    try:
        stop = [_unescape(s) for s in args.stop]
    except UnicodeDecodeError as e:
        parser.error(f"--stop: bad backslash escape ({e.reason})")
    try:
        args.params = sampling.SamplingParams(
            max_tokens=(DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None
                        else args.max_new_tokens), n=args.num_samples,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            seed=args.seed, stop=stop, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
            logit_bias=_logit_bias(parser, args.logit_bias))
    except sampling.SamplingError as e:
        parser.error(f"{FLAGS[e.field]} {e.problem}")
    args.stop = list(args.params.stop)
    return args


def _logit_bias(parser, items: list) -> dict:
    bias = {}
    for item in items:
        tok, sep, value = item.partition("=")
        try:
            bias[int(tok)] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            parser.error(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}")
    return bias


# -----------------------------------------------------------------------------------------------
# Loading


@dataclass
class Loaded:
    model: object
    tok: object
    description: str


def load(args) -> Loaded:
    """The model (eval mode, on --device/--dtype, --backend resolved) and its tokenizer, through
    checkpoint.load_model (run directories and Hugging Face folders alike)."""
    from . import checkpoint

    model, tok, info = checkpoint.load_model(args.ckpt, device=args.device, dtype=args.dtype,
                                             backend=args.backend,
                                             tokenizer_path=args.tokenizer_path)
    decode.configure(model, args)
    kind = KIND_NAMES[info.kind]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    note = f" (ext unavailable: {info.backend_note})" if info.backend_note else ""
    desc = (f"{kind} {info.path}: {params:.2f}M parameters, block_size "
            f"{model.config.block_size}, {dtype_name(model.dtype)} on {model.device}, backend "
            f"{model.backend}{note}, decode: {model.decoder.describe(model)}")
    return Loaded(model, tok, desc)


# -----------------------------------------------------------------------------------------------
# Prompts


def read_prompt(args) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SampleError(f"prompt file {args.prompt_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read prompt file {args.prompt_file}: "
                              f"{first_line(e)}") from None
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if sys.stdin.isatty():
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read()


def encode_prompt(tok, text: str) -> list[int]:
    # An empty prompt starts a new document: BOS where the tokenizer has one, else <|endoftext|>
    # (our tokenizers put it between documents).
    ids = tok.encode(text)
    if not ids:
        start = document_start(tok)
        if start is None:
            raise SampleError("the prompt is empty and the tokenizer has no BOS or end-of-text "
                              "token to start from; give a prompt")
        ids = [start]
    return ids


# -----------------------------------------------------------------------------------------------
# Generation


def separator(i: int, n: int) -> str:
    return f"---------- sample {i}/{n} ----------\n"


def prompt_separator(i: int, prompt: str) -> str:
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"---------- prompt {i}: {shown} ----------\n"


@dataclass
class Stats:
    prompt_tokens: int
    new_tokens: list
    ttft: float   # seconds from the start of the prefill to the first sampled token
    seconds: float
    text: str = ""  # sample 1's text

    def line(self, seed) -> str:
        total = sum(self.new_tokens)
        per = "" if len(self.new_tokens) == 1 else f" ({', '.join(map(str, self.new_tokens))})"
        rate = total / self.seconds if self.seconds > 0 else float("inf")
        seed_part = "" if seed is None else f", seed {seed}"
        return (f"prompt {self.prompt_tokens} tokens, new {total} tokens{per}, time to first "
                f"token {self.ttft * 1000:.1f} ms, {rate:.1f} tokens/s{seed_part}")


def generate(model, tok, prompt: str, args, seed, echo: bool, out, err, ids=None,
             stop=()) -> Stats:
    """Generates args.params.n continuations of prompt as one batch and writes them to out
    (sample 1 live, token by token; the others after it). ids: the prompt's ids when the
    caller made them (a chat); stop: stop strings besides --stop."""
    import torch

    from .streaming import SequenceOutput

    ids = encode_prompt(tok, prompt) if ids is None else ids
    params = dataclasses.replace(args.params, max_tokens=_room(ids, model, args, err), seed=seed,
                                 stop=args.params.stop + tuple(stop))
    B = params.n
    bad = [t for t in params.logit_bias if t >= model.config.vocab_size]
    if bad:
        raise SampleError(f"--logit-bias: token id {bad[0]} is not in the vocabulary "
                          f"(0..{model.config.vocab_size - 1})")
    outs = [SequenceOutput(tok, params, tok.eot_id, context=ids[-1:]) for _ in range(B)]
    out.write((separator(1, B) if B > 1 else "") + (prompt if echo else ""))
    out.flush()
    idx = torch.tensor([ids] * B, dtype=torch.long, device=model.device)
    t0 = time.perf_counter()
    ttft = None
    steps = model.generate_stream(idx, params.max_tokens, params, eos_id=tok.eot_id)
    try:
        for tokens, _ in steps:
            tokens = tokens.tolist()  # one host sync per step
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            for o, t in zip(outs, tokens):
                text = "" if o.finished else o.add(t)
                if o is outs[0] and text:
                    out.write(text)
                    out.flush()
            if all(o.finished for o in outs):  # each hit a stop, <|endoftext|> or the limit
                break
    finally:
        steps.close()
    seconds = time.perf_counter() - t0
    out.write("\n")
    for i in range(1, B):
        out.write(separator(i + 1, B) + (prompt if echo else "") + outs[i].text + "\n")
    out.flush()
    return Stats(len(ids), [o.num_tokens for o in outs], ttft or 0.0, seconds, outs[0].text)


def _room(ids: list, model, args, err) -> int:
    """The tokens each sample may generate: --max-new-tokens (reduced, with a warning, to what
    the context leaves), or up to DEFAULT_MAX_NEW_TOKENS as fit."""
    T, block = len(ids), model.config.block_size
    if T >= block:
        raise SampleError(f"the prompt is {T} tokens long but the model's context (block_size) "
                          f"is {block} tokens: no room to generate; shorten the prompt")
    if args.max_new_tokens is None:
        return min(DEFAULT_MAX_NEW_TOKENS, block - T)
    if T + args.max_new_tokens > block:
        print(f"warning: prompt {T} + --max-new-tokens {args.max_new_tokens} tokens exceed the "
              f"context ({block}); generating at most {block - T} tokens", file=err, flush=True)
        return block - T
    return args.max_new_tokens


def _pick_seed(args):
    if args.seed is not None:
        return args.seed
    if args.temperature == 0:
        return None  # greedy: no randomness to reproduce
    return random.SystemRandom().randrange(2**31)


def interactive(loaded: Loaded, args, out, err) -> None:
    tty = sys.stdin.isatty()
    if tty and not args.quiet:
        print("one prompt per line; Ctrl-D or Ctrl-C to quit", file=err)
    for answered, prompt in enumerate(_lines(err, tty), 1):
        if not tty:  # a log of piped prompts: each answer under a line naming its prompt
            out.write(prompt_separator(answered, prompt))
        seed = _pick_seed(args)
        stats = generate(loaded.model, loaded.tok, prompt, args, seed, False, out, err)
        if not args.quiet:
            print(stats.line(seed), file=err, flush=True)


def _lines(err, tty: bool):
    """stdin's non-empty lines (without their line ends) until EOF; at a terminal with a "> "
    prompt on stderr (stdout keeps only generated text) and input()'s line editing."""
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        if tty:
            err.write("> ")
            err.flush()
            try:
                line = input() + "\n"
            except EOFError:
                line = ""
        else:
            line = sys.stdin.readline()
        if not line:  # EOF (Ctrl-D)
            if tty:
                err.write("\n")
            return
        if line.rstrip("\r\n"):
            yield line.rstrip("\r\n")


def chat_session(loaded: Loaded, args, out, err) -> None:
    """--chat: each line a user message, answered from the whole conversation (chat.prompt:
    the model's template, or plain lines without one); the answers join the history."""
    from . import chat

    tty = sys.stdin.isatty()
    if tty and not args.quiet:
        kind = "its chat template" if chat.template_of(loaded.tok) else "plain 'role: ' lines"
        print(f"chat ({kind}): one message per line; Ctrl-D or Ctrl-C to quit", file=err)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    for i, line in enumerate(_lines(err, tty), 1):
        if not tty:  # a log of piped messages: each answer under a line naming its message
            out.write(prompt_separator(i, line))
        messages.append({"role": "user", "content": line})
        ids, stop = _fit_history(loaded, messages, err)
        seed = _pick_seed(args)
        stats = generate(loaded.model, loaded.tok, line, args, seed, False, out, err, ids, stop)
        messages.append({"role": "assistant", "content": stats.text})
        if not args.quiet:
            print(stats.line(seed), file=err, flush=True)


def _fit_history(loaded: Loaded, messages: list, err) -> tuple[list, tuple]:
    """chat.prompt of the conversation, its oldest exchanges dropped (with a warning; the
    system message stays) while it leaves no room for an answer in the model's context."""
    from . import chat

    first = 1 if messages[0]["role"] == "system" else 0
    ids, stop = chat.prompt(loaded.tok, messages)
    dropped = 0
    while len(ids) >= loaded.model.config.block_size and len(messages) > first + 2:
        del messages[first:first + 2]  # the oldest question and its answer
        dropped += 1
        ids, stop = chat.prompt(loaded.tok, messages)
    if dropped:
        print(f"warning: the conversation outgrew the context ({loaded.model.config.block_size} "
              f"tokens); its {dropped} oldest exchange(s) are forgotten", file=err, flush=True)
    return ids, stop


def run(args) -> int:
    out, err = sys.stdout, sys.stderr
    if (out.encoding or "").lower().replace("-", "") != "utf8" and hasattr(out, "reconfigure"):
        # A terminal that cannot show a character gets "?" rather than an encoding error.
        out.reconfigure(errors="replace")
    t = time.perf_counter()
    loaded = load(args)
    if not args.quiet:
        print(f"loaded {loaded.description} in {time.perf_counter() - t:.2f} s", file=err,
              flush=True)
    if args.interactive or args.chat:
        try:
            (chat_session if args.chat else interactive)(loaded, args, out, err)
        except KeyboardInterrupt:  # Ctrl-C ends the session cleanly, like Ctrl-D
            out.flush()
            err.write("\n")
        return 0
    prompt = read_prompt(args)
    seed = _pick_seed(args)
    stats = generate(loaded.model, loaded.tok, prompt, args, seed, args.echo, out, err)
    if not args.quiet:
        print(stats.line(seed), file=err, flush=True)
    return 0


# -----------------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> int:
    args = parse_args(argv)  # usage errors exit 2 from here
    return run_cli(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
