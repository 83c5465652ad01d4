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


def assert_greedy_agrees(got, want, prompt, next_logits, tie=1e-4):
    """got == want, two greedy continuations of the token list `prompt` by different
    implementations of one model, up to the first step where the reference is undecided: where
    `next_logits(ids)` (the model's float64 next-token logits [V]) has its two best logits
    within `tie`, either token is right (another CPU's rounding may break the tie the other
    way) and the continuations may part from there. Returns the number of steps compared."""
    import torch

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
