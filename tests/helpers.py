"""Helpers shared by several test modules (imported as a plain module: tests/ is on sys.path)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gptmod_ext
from gptmod_ext import ops

needs_ext = pytest.mark.skipif(not ops.AVAILABLE, reason="gptmod extension not built")


# Where the gptmod_ext under test lives (site-packages in CI, python/ in a checkout): subprocesses
# get it on PYTHONPATH so they import the same package as the test process.
PKG_PARENT = str(Path(gptmod_ext.__file__).resolve().parent.parent)

def prepare_test_corpus(path):
    """The trainer tests' corpus at `path`: 150 kB of the stdlib's source, a 512-token BPE."""
    from gptmod_ext import prepare

    files = [str(f) for f in prepare.stdlib_files(max_bytes=150_000)]
    prepare.prepare(files, path, tokenizer="bpe", vocab_size=512, progress=False)
    return path


def run_capability_sweep(module, cap):
    """Runs `module.capability_sweep(cap)` in a subprocess capped by GPTMOD_CPU_CAPABILITY=cap, so
    a narrower CPU build of the kernels (DEFAULT = no SIMD extensions, AVX2) is the one tested."""
    if cap == "AVX2" and ops.cpu_capability() == "DEFAULT":
        pytest.fail("this CPU has no AVX2: the AVX2 build cannot be checked here")
    env = dict(os.environ, GPTMOD_CPU_CAPABILITY=cap)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([PKG_PARENT, here, env.get("PYTHONPATH", "")])
    code = f"import {module}; {module}.capability_sweep({cap!r}); print('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def train_steps(model, data, steps, batch=8, seq_len=48, lr=1e-2):
    """AdamW on random windows of the 1-D token tensor `data` (the global RNG picks them), so
    that a tiny model's greedy continuations become real text."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(0, len(data) - seq_len - 1, (batch,))
        x = torch.stack([data[j:j + seq_len] for j in i])
        y = torch.stack([data[j + 1:j + seq_len + 1] for j in i])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# A small corpus for runs trained in the tests (test_export, test_gguf), and held-out texts that
# are hard for a tokenizer port: none of these lines is in the corpus.
CORPUS = ("def add(a, b):\n    return a + b  # the sum\n\nclass Point:\n\tx: int = 0\n"
          "\ty: int = 0\n"
          "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see.\r\n"
          "naïve café, Größe, 你好世界 🙂 and the dog's bone.\n\n")
TEXTS = [
    "for i in range(10):\n\tif i % 2:\n\t\tprint(f'{i:>4}')  # odd\n    return None\n",
    "a    b\t\t\tc \t \t d      \n\n\n   \t", "line one\r\nline two\r\n\r\n\rx",
    "Ελληνικά, русский, 日本語のテキスト, עברית", "emoji 🙂👍🏽👨‍👩‍👧 🇫🇷 ok🙃",
    "\u00a0nbsp\u3000wide\u2028sep\u200bzw\x0bvt", "I'll've DON'T 1234567 3.14159",
    "end<|endoftext|>start", " ",
    "it'S THEY'RE we'Ve I'D you'LL he'M x's 'tis '",
    "0 00 000 0000 12345678901 1,000,000.50 x2y3 ٣٤ ¹²",
    "  \n\t \r\n  \r  \n\n\n \t\t\n  leading\n", "tabs\tand  two  spaces\t \ttrail \t",
]
PROMPTS = ["def add(", "The quick", "naïve"]


def train_runs(tmp_path_factory, steps=150):
    """The two runs the export tests start from: a byte-level BPE with the modern architecture
    (GQA with one KV head, untied, rope_base 5000) and the bytes tokenizer with the GPT-2 one."""
    from gptmod_ext import GPTConfig, tokenizer

    bpe = tokenizer.train_bpe([CORPUS * 4], 320)
    small = dict(block_size=96, n_layer=2, n_head=4, n_embd=32)
    modern = GPTConfig(vocab_size=bpe.vocab_size, n_kv_head=1, rope_base=5000.0, **small)
    gpt2 = GPTConfig.from_preset("gpt2", vocab_size=257, **small)
    return {"bpe": train_run(tmp_path_factory.mktemp("run_bpe"), bpe, modern, steps),
            "bytes": train_run(tmp_path_factory.mktemp("run_bytes"), tokenizer.byte_tokenizer(),
                               gpt2, steps)}


def train_run(directory, tok, cfg, steps=150):
    """A model trained on CORPUS until its greedy continuations are confident, saved as a run."""
    import torch

    from gptmod_ext import GPT, checkpoint

    torch.manual_seed(0)
    model = train_steps(GPT(cfg), torch.tensor(tok.encode(CORPUS * 3)), steps)
    checkpoint.save_model(directory, model, tok)
    return directory


# llama.cpp, for the GGUF tests: the tools benchmarks/build_llama_cpp.sh builds. Not a dependency:
# a machine without the build skips those tests with this reason; CI builds it first and sets
# GPTMOD_REQUIRE_LLAMA_CPP=1, so there a missing build fails instead of skipping.
LLAMA_CPP_BIN = Path(os.environ.get("GPTMOD_LLAMA_CPP")
                     or Path.home() / ".cache" / "gptmod_ext" / "llama.cpp" / "bin")


def llama_cpp_tool(name):
    """The path of llama.cpp's `name` (llama-tokenize, llama-simple, llama-bench), or a skip
    that says how to build it."""
    path = LLAMA_CPP_BIN / name
    if os.access(path, os.X_OK):
        return str(path)
    msg = (f"llama.cpp's {name} is not in {LLAMA_CPP_BIN}: build it with "
           f"`benchmarks/build_llama_cpp.sh` (about 10 minutes on 2 cores; cached in "
           f"~/.cache/gptmod_ext/llama.cpp) or point GPTMOD_LLAMA_CPP at a directory holding it")
    if os.environ.get("GPTMOD_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def assert_export_error(err, words):
    """`python -m gptmod_ext.export` failed with one line on stderr that contains `words`."""
    from gptmod_ext.export import PROG

    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG}: error: ") and words in lines[0], err


def assert_greedy_agrees(got, want, prompt, next_logits, tie=1e-4):
    """got == want, two greedy continuations of the token list `prompt` by different
    implementations of one model, up to the first step where the reference is undecided: where
    `next_logits(ids)` (the model's float64 next-token logits [V]) has its two best logits
    within `tie`, either token is right (another CPU's rounding may break the tie the other
    way) and the continuations may part from there. Returns the number of steps compared."""
    got, want = [int(t) for t in got], [int(t) for t in want]
    for i, (a, b) in enumerate(zip(got, want)):
        if a == b:
            continue
        logits = next_logits(list(prompt) + want[:i]).double()
        best = logits.max()
        assert best - logits[a] < tie and best - logits[b] < tie, (
            f"greedy step {i} chose {a} and {b}: logits {logits[a]:.6f} vs {logits[b]:.6f} "
            f"(best {best:.6f}), not a near tie")
        return i
    assert len(got) == len(want), (got, want)
    return len(got)


def float64_next_logits(model):
    """next_logits for assert_greedy_agrees: a float64 copy of a GPT (torch backend)."""
    import copy

    import torch

    ref = copy.deepcopy(model).to(torch.float64)
    ref.backend = "torch"

    def next_logits(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids]))[0][0, -1]
    return next_logits
