"""The sampler CLI, mostly through subprocesses (`python -m gptmod_ext.sample`).

One tiny run directory is made per module: a 2-layer model with the byte tokenizer, trained
for a few hundred steps on a short multilingual text, so greedy output is real text with
multi-byte characters. Expected outputs come from model.generate on the same weights, decoded
here with the tokenizer and Python's own UTF-8 decoder (not through the CLI's streamer).
"""
import io
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import PKG_PARENT
import torch

from gptmod_ext import GPT, GPTConfig, _ext, checkpoint, sample, tokenizer

PYTHON_DIR = PKG_PARENT  # the gptmod_ext under test (installed in CI)
TEXT = "the cat sat on the mat. 你好世界! café 🙂 the dog ran far. "
PROG_ERROR = f"{sample.PROG}: error: "

# One torch thread in-process (conftest.py); subprocesses get OMP_NUM_THREADS=1 (see env()).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tok = tokenizer.byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2,
                          n_kv_head=1, n_embd=32))
    data = torch.tensor(tok.encode(TEXT * 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        i = torch.randint(0, len(data) - 65, (4,))
        x = torch.stack([data[j:j + 64] for j in i])
        y = torch.stack([data[j + 1:j + 65] for j in i])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint.save_model(d, model, tok)
    return d


@pytest.fixture(scope="module")
def loaded(run_dir):
    model, tok, _ = checkpoint.load_model(run_dir, device="cpu", backend="torch")
    return model, tok


def drop_incomplete_char(data: bytes) -> bytes:
    """data without a trailing UTF-8 lead byte whose continuation bytes never came."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if 0x80 <= b < 0xC0:  # a continuation byte: the lead is further back
            continue
        need = 2 if 0xC2 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF5 else 1
        return data[:-k] if need > k else data
    return data


def reference(loaded, prompt, max_new, num_samples=1, stop=(), **kw):
    """The texts model.generate gives for prompt (num_samples rows), each cut at <|endoftext|>
    and at its first stop string; a row cut by max_new loses a half-finished last character."""
    model, tok = loaded
    ids = tok.encode(prompt) or [tok.eot_id]
    out = model.generate(torch.tensor([ids] * num_samples), max_new, eos_id=tok.eot_id, **kw)
    texts = []
    for row in out[:, len(ids):].tolist():
        data = bytes(tok.decode_bytes(row[:row.index(tok.eot_id)] if tok.eot_id in row else row))
        if tok.eot_id not in row:
            data = drop_incomplete_char(data)
        text = data.decode("utf-8", errors="replace")
        cuts = [text.find(s) for s in stop if s in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = PYTHON_DIR + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("GPTMOD_DEBUG", None)
    return e


def cmd(*args):
    # -W: the package warns at import when the compiled ops are not built; that line is not
    # the sampler's output.
    return [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "gptmod_ext.sample", *args]


def cli(*args, input=None, timeout=120):
    return subprocess.run(cmd(*args), input=input, capture_output=True, text=True,
                          encoding="utf-8", env=env(), timeout=timeout)


def assert_one_line_error(stderr, code_hint=""):
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(PROG_ERROR), stderr
    assert code_hint in lines[0]


# -- output against model.generate -----------------------------------------------------------

def test_stdin_prompt_greedy_matches_generate(run_dir, loaded):
    # Same prompt and length as test_greedy_streamed_to_stdout: greedy text twice, equal.
    expected = reference(loaded, "the", 250, temperature=0)[0]
    r = cli("--ckpt", str(run_dir), "--prompt", "-", "--temperature", "0", "--no-echo",
            "--max-new-tokens", "250", "--backend", "torch", "-q", input="the")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert r.stderr == ""  # -q


def test_prompt_from_stdin_when_none_given(run_dir, loaded, capsys, monkeypatch):
    for extra in ([], ["--prompt", "-"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the d"))
        code, out, _ = run_main(capsys, "--ckpt", str(run_dir), "--temperature", "0",
                                "--max-new-tokens", "30", "-q", "--backend", "torch", *extra)
        assert code == 0
        assert out == "the d" + reference(loaded, "the d", 30, temperature=0)[0] + "\n"


def test_prompt_file_and_empty_prompt(run_dir, loaded, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("the m", encoding="utf-8")
    assert sample.main(["--ckpt", str(run_dir), "--prompt-file", str(f), "--temperature", "0",
                        "--max-new-tokens", "20", "--backend", "torch", "-q"]) == 0
    expected = reference(loaded, "the m", 20, temperature=0)[0]
    assert capsys.readouterr().out == "the m" + expected + "\n"
    # An empty prompt starts from <|endoftext|>.
    assert sample.main(["--ckpt", str(run_dir), "--prompt", "", "--temperature", "0",
                        "--max-new-tokens", "20", "--backend", "torch", "-q"]) == 0
    assert capsys.readouterr().out == reference(loaded, "", 20, temperature=0)[0] + "\n"


def run_main(capsys, *args):
    code = sample.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_seeded_sampling(run_dir, loaded, capsys):
    base = ["--ckpt", str(run_dir), "--prompt", "the", "--max-new-tokens", "60",
            "--temperature", "2.5", "--top-k", "200", "--top-p", "0.99", "--min-p", "0.001",
            "--backend", "torch", "-q"]
    _, a, _ = run_main(capsys, *base, "--seed", "1")
    _, b, _ = run_main(capsys, *base, "--seed", "1")
    _, c, _ = run_main(capsys, *base, "--seed", "2")
    assert a == b
    assert a != c
    assert torch.is_grad_enabled()  # main() leaves the caller's global state alone
    expected = reference(loaded, "the", 60, temperature=2.5, top_k=200, top_p=0.99,
                         min_p=0.001, seed=1)[0]
    assert a == "the" + expected + "\n"


def test_unseeded_sampling_reports_its_seed(run_dir, loaded, capsys):
    code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the",
                              "--max-new-tokens", "30", "--temperature", "2", "--backend", "torch")
    assert code == 0
    seed = int(err.split("seed ")[-1].strip())
    assert out == "the" + reference(loaded, "the", 30, temperature=2.0, seed=seed)[0] + "\n"


def test_stop_string_from_greedy_output(run_dir, loaded, capsys):
    full = reference(loaded, "the c", 60, temperature=0)[0]
    stop = full[12:15]  # three characters from the middle: spans several byte tokens
    assert "\\" not in stop and stop.strip()
    expected = full[:full.find(stop)]
    assert len(expected) < len(full)
    code, out, _ = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the c",
                            "--temperature", "0", "--max-new-tokens", "60",
                            f"--stop={stop}", "--stop", "never-produced", "--backend", "torch",
                            "-q")
    assert code == 0
    assert out == "the c" + expected + "\n"


def test_num_samples_one_batch_each_row_stops_on_its_own(run_dir, loaded):
    stop = ". "
    expected = reference(loaded, "the", 80, num_samples=3, stop=[stop], temperature=2.0, seed=5)
    full = reference(loaded, "the", 80, num_samples=3, temperature=2.0, seed=5)
    assert any(stop in t for t in full)  # some rows really stop early
    assert len({len(t) for t in expected}) > 1  # ... at different places
    r = cli("--ckpt", str(run_dir), "--prompt", "the", "--max-new-tokens", "80",
            "--temperature", "2", "--seed", "5", "--num-samples", "3", "--stop", stop,
            "--backend", "torch")
    assert r.returncode == 0, r.stderr
    want = "".join(f"---------- sample {i + 1}/3 ----------\nthe{t}\n"
                   for i, t in enumerate(expected))
    assert r.stdout == want
    assert re.search(r"new \d+ tokens \(\d+, \d+, \d+\)", r.stderr)  # per-sample counts


def test_ext_backend_same_greedy_text(run_dir, loaded, capsys):
    if _ext.ext_unavailable_reason("cpu"):
        pytest.skip("the compiled ops are not built for the CPU")
    code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the c",
                              "--temperature", "0", "--max-new-tokens", "60", "--backend", "ext")
    assert code == 0, err
    assert "backend ext" in err
    assert out == "the c" + reference(loaded, "the c", 60, temperature=0)[0] + "\n"


def test_compile_uses_the_models_fast_decode_path(run_dir, loaded, capsys, monkeypatch):
    # --compile is GPT.compile_decode (docs/design.md §6), nothing private; compiling for real
    # takes minutes on a small CPU, so the call is recorded and the plain path generates.
    calls = []
    monkeypatch.setattr(GPT, "compile_decode",
                        lambda self, quantize=None: calls.append(self) or self)
    code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the", "--compile",
                              "--temperature", "0", "--max-new-tokens", "20", "--backend", "torch")
    assert code == 0, err
    assert len(calls) == 1 and "decode: plain" in err
    assert out == "the" + reference(loaded, "the", 20, temperature=0)[0] + "\n"


def test_fused_decode_is_the_default_and_no_fused_turns_it_off(run_dir, loaded, capsys):
    # No speed flag: the fused CPU step decodes; --no-fused: the layers' own step. The same
    # greedy text either way, the torch backend's (a trained model: no near ties to break).
    if _ext.ext_unavailable_reason("cpu"):
        pytest.skip("the compiled ops are not built for the CPU")
    want = "the c" + reference(loaded, "the c", 40, temperature=0)[0] + "\n"
    for flags, words in (((), "decode: fused CPU decode step"),
                         (("--no-fused",), "decode: plain (the fused decode step is turned off")):
        code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the c",
                                  "--temperature", "0", "--max-new-tokens", "40", "--backend",
                                  "ext", *flags)
        assert code == 0 and words in err, err
        assert out == want


def test_max_new_tokens_reduced_to_the_context(run_dir, loaded, capsys):
    prompt = "the cat sat on the mat. " * 10  # 240 of 256 tokens
    code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", prompt,
                              "--temperature", "0", "--max-new-tokens", "100", "--backend",
                              "torch", "-q", "--no-echo")
    assert code == 0
    assert "warning:" in err and "at most 16 tokens" in err
    assert out == reference(loaded, prompt, 16, temperature=0)[0] + "\n"


# -- streaming and interactive ----------------------------------------------------------------

def test_greedy_streamed_to_stdout(run_dir, loaded):
    expected = reference(loaded, "the", 250, temperature=0)[0]
    assert any(c in expected for c in "你é🙂")  # multi-byte characters come through whole
    p = subprocess.Popen(cmd("--ckpt", str(run_dir), "--prompt", "the", "--temperature", "0",
                             "--max-new-tokens", "250", "--backend", "torch"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    chunks = []
    first_while_running = None
    fd = p.stdout.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data:
            break
        if first_while_running is None:
            first_while_running = p.poll() is None
        chunks.append(data)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode == 0, err
    # stdout: the prompt, the continuation model.generate gives, one newline.
    assert b"".join(chunks).decode() == "the" + expected + "\n"
    assert first_while_running  # text came out before the process ended ...
    assert len(chunks) > 2      # ... in pieces as it was produced, not all at exit
    # The report is on stderr only.
    assert "prompt 3 tokens, new 250 tokens" in err and "tokens/s" in err
    assert "time to first token" in err


def _read_until(stream, expected: bytes, timeout: float) -> bytes:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(expected) and time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            data = os.read(stream.fileno(), 65536)
            if not data:
                break
            got += data
    return got


def test_interactive_until_eof(run_dir, loaded):
    a = reference(loaded, "the c", 20, temperature=0)[0]
    b = reference(loaded, "the m", 20, temperature=0)[0]
    r = cli("--ckpt", str(run_dir), "--interactive", "--temperature", "0",
            "--max-new-tokens", "20", "--backend", "torch", input="the c\n\nthe m\n")
    assert r.returncode == 0, r.stderr
    # From a pipe, each answer comes under a line naming its prompt (not echoed otherwise),
    # so the answers do not run together; the blank line is skipped.
    assert r.stdout == ("---------- prompt 1: the c ----------\n" + a + "\n"
                        "---------- prompt 2: the m ----------\n" + b + "\n")
    assert "Traceback" not in r.stderr


def test_interactive_flushes_each_answer_and_ctrl_c_exits_cleanly(run_dir, loaded):
    expected = ("---------- prompt 1: the c ----------\n"
                + reference(loaded, "the c", 30, temperature=0)[0] + "\n").encode()
    p = subprocess.Popen(cmd("--ckpt", str(run_dir), "--interactive", "--temperature", "0",
                             "--max-new-tokens", "30", "--backend", "torch"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env())
    try:
        p.stdin.write(b"the c\n")
        p.stdin.flush()
        # The answer arrives while the process waits for the next line (stdin still open).
        assert _read_until(p.stdout, expected, 60) == expected
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert b"Traceback" not in err


# -- errors -----------------------------------------------------------------------------------

def test_truncated_weights_subprocess(run_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    r = cli("--ckpt", str(bad), "--prompt", "x")
    assert r.returncode == 1
    assert_one_line_error(r.stderr, "model.safetensors")


def _broken_dirs(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    shutil.copytree(run_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(run_dir, mismatch)
    cfg = (mismatch / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')
    assert '"n_embd": 64' in cfg
    (mismatch / "config.json").write_text(cfg)
    notok = tmp_path / "notok"
    shutil.copytree(run_dir, notok)
    (notok / "tokenizer.json").unlink()
    return {"missing": (tmp_path / "nope", "does not exist"),
            "empty": (empty, "model.safetensors"), "garbage": (garbage, "corrupt"),
            "mismatch": (mismatch, "does not match"), "no tokenizer": (notok, "tokenizer")}


def test_checkpoint_errors(run_dir, tmp_path, capsys):
    for name, (d, hint) in _broken_dirs(run_dir, tmp_path).items():
        code, out, err = run_main(capsys, "--ckpt", str(d), "--prompt", "x", "--backend", "torch")
        assert code == 1, name
        assert_one_line_error(err, hint)
        assert out == ""


def test_prompt_longer_than_context(run_dir, capsys):
    code, out, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "x" * 300, "-q",
                              "--backend", "torch")
    assert code == 1
    assert_one_line_error(err, "block_size")
    assert out == ""


def test_missing_prompt_file(run_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt-file",
                            str(tmp_path / "none.txt"), "-q", "--backend", "torch")
    assert code == 1
    assert_one_line_error(err, "none.txt")


def test_unexpected_exception_is_one_line(run_dir, capsys, monkeypatch):
    def boom(*a, **k):
        raise KeyError("surprise")
    monkeypatch.setattr(sample, "generate", boom)
    code, _, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "x", "-q",
                            "--backend", "torch")
    assert code == 1
    assert_one_line_error(err, "unexpected KeyError")
    monkeypatch.setenv("GPTMOD_DEBUG", "1")
    with pytest.raises(KeyError):
        sample.main(["--ckpt", str(run_dir), "--prompt", "x", "-q", "--backend", "torch"])


def test_ctrl_c_outside_interactive(run_dir, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "generate", interrupted)
    code, _, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "x", "-q",
                            "--backend", "torch")
    assert code == 130
    assert_one_line_error(err, "interrupted")


USAGE_ERRORS = [
    ["--temperature", "-0.5"], ["--top-p", "0"], ["--top-p", "1.5"], ["--min-p", "-0.1"],
    ["--min-p", "1.01"], ["--top-k", "-3"], ["--max-new-tokens", "0"], ["--num-samples", "0"],
    ["--bogus"], ["--dtype", "float8"], ["--backend", "cuda"], ["--temperature", "hot"],
    ["--stop", ""], ["--prompt", "a", "--prompt-file", "f"], ["--interactive", "--prompt", "a"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a))
def test_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", "does-not-matter", *args])
    assert e.value.code == 2
    assert_one_line_error(capsys.readouterr().err)


def test_stop_escapes_and_non_ascii():
    args = sample.parse_args(["--stop", "\\n\\n", "a\\tb", "--stop=世界🙂é", "--stop=-x"])
    assert args.stop == ["\n\n", "a\tb", "世界🙂é", "-x"]


def test_usage_error_subprocess():
    r = cli("--top-k", "-2")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "--top-k")


# -- Hugging Face folders -----------------------------------------------------------------------

def _hf_folder(transformers, d, tok, model_config):
    """Saves a random model and tok to d; returns (d, prompt, HF's own greedy continuation)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    prompt = "the cat"
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return d, prompt, tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    # A byte-level BPE trained here (no network), wrapped as a transformers tokenizer.
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator([TEXT.encode("ascii", "ignore").decode()] * 20, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    llama = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    gpt2 = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return {"llama": _hf_folder(transformers, tmp_path_factory.mktemp("hf_llama"), tok, llama),
            "gpt2": _hf_folder(transformers, tmp_path_factory.mktemp("hf_gpt2"), tok, gpt2)}


def test_hf_llama_folder(hf_dirs):
    d, prompt, expected = hf_dirs["llama"]
    r = cli("--ckpt", str(d), "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "20", "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + expected + "\n"  # HF's own greedy generate is the reference
    assert "Hugging Face model" in r.stderr


def test_hf_gpt2_folder(hf_dirs, capsys):
    d, prompt, expected = hf_dirs["gpt2"]
    code, out, err = run_main(capsys, "--ckpt", str(d), "--prompt", prompt, "--temperature",
                              "0", "--max-new-tokens", "20", "--backend", "torch")
    assert code == 0, err
    assert out == prompt + expected + "\n"


def test_hf_folder_without_tokenizer(hf_dirs, tmp_path, capsys):
    d = tmp_path / "no_tok"
    d.mkdir()
    for f in hf_dirs["llama"][0].iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, d / f.name)
    code, _, err = run_main(capsys, "--ckpt", str(d), "--prompt", "x", "-q", "--backend", "torch")
    assert code == 1
    assert_one_line_error(err, "no tokenizer files")


def test_penalty_options_match_generate(run_dir, loaded, capsys):
    # The CLI's --frequency-penalty / --logit-bias give model.generate's text with the same
    # settings (whose rule test_penalties.py checks against float64).
    _, tok = loaded
    plain = reference(loaded, "the c", 60, temperature=0)[0]
    banned = tok.encode("a")[0]
    assert "a" in plain
    expected = reference(loaded, "the c", 60, temperature=0, frequency_penalty=1.0,
                         logit_bias={banned: -100.0})[0]
    assert "a" not in expected and expected != plain
    code, out, _ = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "the c",
                            "--temperature", "0", "--max-new-tokens", "60",
                            "--frequency-penalty", "1", "--logit-bias", f"{banned}=-100",
                            "--backend", "torch", "-q")
    assert code == 0
    assert out == "the c" + expected + "\n"
    code, _, err = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "x", "-q",
                            "--backend", "torch", "--logit-bias", f"{tok.vocab_size}=1")
    assert code == 1
    assert_one_line_error(err, "not in the vocabulary")
