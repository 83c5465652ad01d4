"""Shared helpers for the server tests: a tiny checkpoint and a live server in a subprocess."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import gptmod_ext
from gptmod_ext import GPT, GPTConfig, checkpoint
from gptmod_ext import tokenizer as tokenizer_mod

API_KEY = "test-key"


def make_tiny_run(run_dir: Path, block_size: int = 256, seed: int = 1234, n_layer: int = 2,
                  n_embd: int = 64) -> Path:
    """A random-init model (2 x 64 by default) with the byte tokenizer, saved as a run
    directory: fast to load and to run, and its greedy outputs are arbitrary but deterministic."""
    torch.manual_seed(seed)
    tok = tokenizer_mod.byte_tokenizer()
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                       n_head=4, n_kv_head=2, n_embd=n_embd)
    checkpoint.save_model(run_dir, GPT(config), tok)
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerUrl(str):
    """The base URL of a live server; .proc is its subprocess.Popen."""
    proc: subprocess.Popen


@contextlib.contextmanager
def live_server(run_dir: Path, *args: str, timeout: float = 90.0):
    """Runs `python -m gptmod_ext.serve` on a free localhost port; yields its base URL (a
    ServerUrl, with the process as .proc) and always shuts it down."""
    import httpx

    port = free_port()
    env = dict(os.environ)
    # The subprocess imports the same gptmod_ext as this test (a source checkout or a wheel).
    pkg_parent = str(Path(gptmod_ext.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    # One torch thread: on a shared, busy CI machine OpenMP threads that spin-wait for each
    # other make every step many times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptmod_ext.serve", "--ckpt", str(run_dir), "--host", "127.0.0.1",
         "--port", str(port), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = ServerUrl(f"http://127.0.0.1:{port}")
    url.proc = proc
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not come up in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _strip_incomplete_char(data: bytes) -> bytes:
    """data without a trailing incomplete (but so far valid) UTF-8 sequence."""
    for k in (1, 2, 3):
        if len(data) >= k:
            try:
                data[-k:].decode("utf-8")
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and e.start == 0:
                    return data[:-k]
    return data


def expected_text(tok, ids, truncated: bool) -> str:
    """The text the server should send for generated ids: special tokens have no text, invalid
    bytes become U+FFFD, and when max_tokens cut the text (truncated) a half character at the
    end is dropped."""
    data = tok.decode_bytes([t for t in ids if not tok.is_special(t)])
    if truncated:
        data = _strip_incomplete_char(data)
    return data.decode("utf-8", errors="replace")


def greedy(ref, prompt_ids, max_tokens, stop=()):
    """(text, completion token count, finish_reason) of the prompt run alone through
    model.generate, greedy: what the server must answer. ref is (model, tokenizer)."""
    model, tok = ref
    ids = model.generate([prompt_ids], max_tokens, temperature=0, eos_id=tok.eot_id)[0][len(prompt_ids):]
    for k in range(1, len(ids) + 1 if stop else 0):
        text = tok.decode([t for t in ids[:k] if t != tok.eot_id])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)], k, "stop"
    reason = "stop" if ids[-1] == tok.eot_id else "length"
    return expected_text(tok, ids, truncated=reason == "length"), len(ids), reason


def openai_client(url: str, api_key: str = "none", **kwargs):
    """The official openai client for a live server, failing at once (no retries)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, **kwargs)


def served_model(run_dir: Path, url: str):
    """(model, tokenizer): the served weights loaded here, on the backend the server uses."""
    import httpx

    backend = httpx.get(url + "/health").json()["backend"]
    model, tok, _ = checkpoint.load_model(run_dir, "cpu", "float32", backend)
    return model, tok
