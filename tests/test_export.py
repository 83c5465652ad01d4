"""`python -m gptmod_ext.export`: small runs trained here become Hugging Face folders, and
transformers alone must reproduce our tokens, greedy text and logits from them.

The loading side is a subprocess in which `import gptmod_ext` fails (sys.modules blocks it), so
nothing of ours helps transformers read the folder. Our side is the run directory's own model
and tiktoken tokenizer. Runs: a byte-level BPE with the modern architecture (-> Llama; exported
fp32 through the command line and bf16) and the bytes tokenizer with the GPT-2 architecture
(-> GPT-2). Then the folders go back through our sampler (`sample --ckpt hf_dir`), and bad input
gets one line on stderr, exit 1 and nothing written.
"""
import codecs
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import (CORPUS, PKG_PARENT, PROMPTS, TEXTS, assert_export_error,
                     assert_greedy_agrees, float64_next_logits)

from gptmod_ext import checkpoint, export, hf, sample

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 24

@pytest.fixture(scope="module")
def runs(export_runs):
    return export_runs


def env():
    import os
    return dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {"bpe": root / "bpe", "bytes": root / "bytes", "bpe_bf16": root / "bpe_bf16"}
    r = subprocess.run([sys.executable, "-m", "gptmod_ext.export", "--ckpt", str(runs["bpe"]),
                        "--out", str(out["bpe"])], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out['bpe']}: LlamaForCausalLM")
    assert export.main(["--ckpt", str(runs["bytes"]), "--out", str(out["bytes"])]) == 0
    assert export.main(["--ckpt", str(runs["bpe"]), "--out", str(out["bpe_bf16"]),
                        "--dtype", "bf16"]) == 0
    return out


# The loading side: transformers only. Prints one JSON object per folder.
HF_SIDE = r"""
import json, sys
sys.modules["gptmod_ext"] = None  # any import of ours now fails
import torch, transformers
torch.set_num_threads(1)
job = json.loads(sys.stdin.read())
result = {}
for name, folder in job["folders"].items():
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    r = {"class": type(model).__name__, "dtype": str(model.dtype), "vocab": len(tok),
         "eos": tok.eos_token_id, "gen_eos": model.generation_config.eos_token_id,
         "ids": [tok.encode(s) for s in job["texts"]]}
    r["decoded"] = [tok.decode(ids) for ids in r["ids"]]
    r["greedy"] = []
    for p in job["prompts"]:
        idx = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                 max_new_tokens=job["n_new"])
        r["greedy"].append(out[0, idx.shape[1]:].tolist())
    with torch.no_grad():
        r["logits"] = model(torch.tensor([job["logit_ids"][name]])).logits[0].float().tolist()
    pipe = transformers.pipeline("text-generation", model=folder)
    r["pipeline"] = pipe(job["prompts"][0], max_new_tokens=job["n_new"],
                         do_sample=False)[0]["generated_text"]
    result[name] = r
result["imported_ours"] = any(k.startswith("gptmod_ext.") for k in sys.modules)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def ours(runs):
    loaded = {k: checkpoint.load_model(d, device="cpu", backend="torch") for k, d in runs.items()}
    res = {}
    for name, (model, tok, _) in loaded.items():
        model.backend = "torch"
        greedy = [model.generate([tok.encode(p)], N_NEW, temperature=0, eos_id=tok.eot_id)[0]
                  [len(tok.encode(p)):] for p in PROMPTS]
        res[name] = dict(model=model, tok=tok, greedy=greedy,
                         logit_ids=tok.encode(CORPUS[:40] + TEXTS[0])[:64])
    res["bpe_bf16"] = res["bpe"]
    return res


@pytest.fixture(scope="module")
def theirs(exported, ours):
    job = {"folders": {k: str(v) for k, v in exported.items()}, "texts": TEXTS,
           "prompts": PROMPTS, "n_new": N_NEW,
           "logit_ids": {k: ours[k]["logit_ids"] for k in exported}}
    r = subprocess.run([sys.executable, "-c", HF_SIDE], input=json.dumps(job), env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result.pop("imported_ours") is False
    return result


@pytest.mark.parametrize("name,cls", [("bpe", "LlamaForCausalLM"), ("bytes", "GPT2LMHeadModel"),
                                      ("bpe_bf16", "LlamaForCausalLM")])
def test_transformers_tokenizer_same_ids(theirs, ours, name, cls):
    t, tok = theirs[name], ours[name]["tok"]
    assert t["class"] == cls
    assert t["vocab"] == tok.vocab_size
    assert t["eos"] == t["gen_eos"] == tok.eot_id
    for s, ids, text in zip(TEXTS, t["ids"], t["decoded"]):
        assert ids == tok.encode(s), repr(s)
        assert text == s, repr(s)


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_transformers_fp32_logits_and_greedy(theirs, ours, name):
    t, o = theirs[name], ours[name]
    assert t["dtype"] == "torch.float32"
    with torch.no_grad():
        want = o["model"](torch.tensor([o["logit_ids"]]))[0][0, :, :o["tok"].vocab_size]
    torch.testing.assert_close(torch.tensor(t["logits"]), want, rtol=1e-4, atol=1e-4)
    for p, g, w in zip(PROMPTS, t["greedy"], o["greedy"]):
        assert_greedy_agrees(g, w, o["tok"].encode(p), float64_next_logits(o["model"]))
    # The runs learned real continuations, which generation stops at or runs through.
    assert any(len(g) == N_NEW for g in o["greedy"])
    tok = o["tok"]
    new = [i for i in o["greedy"][0] if i != tok.eot_id]
    assert t["pipeline"] == PROMPTS[0] + tok.decode(new)


def test_transformers_bf16_export(theirs, ours):
    t, o = theirs["bpe_bf16"], ours["bpe"]
    assert t["dtype"] == "torch.bfloat16"
    model, V = o["model"], o["tok"].vocab_size
    with torch.no_grad():
        want = model(torch.tensor([o["logit_ids"]]))[0][0, :, :V]
    got = torch.tensor(t["logits"])
    scale = want.abs().max().item()
    # bf16 keeps 8 bits of mantissa (2^-8 relative per rounding); through two layers the logits
    # drift by about 1% of their largest value here, ours in bf16 as much as transformers.
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * scale)
    assert (got - want).abs().max() > 0  # the weights really are bf16
    # Greedy in bf16 may pick a different token only where ours sees a near tie.
    for p, g in zip(PROMPTS, t["greedy"]):
        seq = o["tok"].encode(p) + g
        with torch.no_grad():
            logits = model(torch.tensor([seq[:-1]]))[0][0, :, :V]
        steps = logits[len(seq) - len(g) - 1:]
        chosen = steps.gather(1, torch.tensor(g)[:, None])[:, 0]
        assert (steps.max(1).values - chosen).max() < 0.03 * scale, p


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_load_model_reads_the_exported_folder(exported, ours, name):
    # The loader behind sample and serve: a Hugging Face folder, transformers' tokenizer.
    model, tok, info = checkpoint.load_model(exported[name], device="cpu", backend="torch")
    assert info.kind == "hf" and tok.eot_id == ours[name]["tok"].eot_id
    assert [tok.encode(s) for s in TEXTS] == [ours[name]["tok"].encode(s) for s in TEXTS]
    greedy = [model.generate([tok.encode(p)], N_NEW, temperature=0, eos_id=tok.eot_id)[0]
              [len(tok.encode(p)):] for p in PROMPTS]
    assert greedy == ours[name]["greedy"]


@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_exported_tokenizer_streams_like_ours(exported, ours, name, truncated):
    # The sampler and the server stream an exported folder's tokenizer byte by byte, as the run
    # directory's: invalid bytes print as U+FFFD, and only a character cut by the token limit
    # is dropped (a re-decoding streamer dropped every trailing U+FFFD at a length cut).
    from gptmod_ext.streaming import TextStreamer

    theirs, tok = hf.HFTokenizer(exported[name]), ours[name]["tok"]
    assert theirs.byte_level
    head, tail = "naïve ad", b"\xe2\x82\xff\xfe\xc3\xa9\xff\xf0\x9f\x99"
    raw = head.encode() + tail
    # The text's own tokens, then one byte token per byte of the invalid tail.
    ids = tok.encode(head) + [tok.enc.encode_single_token(bytes([b])) for b in tail]
    assert tok.decode_bytes(ids) == raw and theirs.decode_bytes(ids) == raw
    texts = []
    for t in (tok, theirs):
        s = TextStreamer(t)
        texts.append("".join(s.put(i) for i in ids) + s.finish(truncated=truncated))
    assert texts[0] == texts[1]
    want = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=not truncated)
    assert texts[0] == want and want.endswith("\ufffd" if truncated else "\ufffd\ufffd")


def sample_text(capsys, ckpt, prompt):
    code = sample.main(["--ckpt", str(ckpt), "--prompt", prompt, "--temperature", "0",
                        "--max-new-tokens", str(N_NEW), "--backend", "torch", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_sample_reads_the_exported_folder(runs, exported, ours, capsys, name):
    tok = ours[name]["tok"]
    for prompt, greedy in zip(PROMPTS, ours[name]["greedy"]):
        text = sample_text(capsys, exported[name], prompt)
        # Cut by the token limit (no end-of-text), a last incomplete character is dropped.
        raw = tok.decode_bytes([i for i in greedy if i != tok.eot_id])
        new = codecs.getincrementaldecoder("utf-8")("replace").decode(
            raw, final=tok.eot_id in greedy)
        assert text == prompt + new + "\n"
        assert text == sample_text(capsys, runs[name], prompt)


def test_save_hf_python_api(runs, tmp_path):
    model, tok, _ = checkpoint.load_model(runs["bytes"], device="cpu")
    path = hf.save_hf(model, tok, tmp_path / "a" / "b")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    back = hf.from_hf(path)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save_hf(model, tok, path)
    hf.save_hf(model, tok, path, dtype="fp16", overwrite=True)
    assert hf.from_hf(path).dtype == torch.float16


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_save_hf_of_a_model_loaded_from_a_folder(exported, ours, tmp_path, name):
    # What was loaded from a Hugging Face folder (its tokenizer an HFTokenizer) saves again,
    # and transformers reads the copy with the same ids, eos and logits as the original.
    import transformers

    model, tok, _ = checkpoint.load_model(exported[name], device="cpu", backend="torch")
    path = hf.save_hf(model, tok, tmp_path / "again")
    want_tok = transformers.AutoTokenizer.from_pretrained(exported[name])
    got_tok = transformers.AutoTokenizer.from_pretrained(path)
    assert [got_tok.encode(t) for t in TEXTS] == [want_tok.encode(t) for t in TEXTS]
    assert got_tok.eos_token_id == tok.eot_id and got_tok.model_max_length == 96
    want = transformers.AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    got = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([ours[name]["logit_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=0, atol=0)
    assert got.generation_config.eos_token_id == tok.eot_id


# -- bad input --------------------------------------------------------------------------------

def run_export(capsys, *args):
    code = export.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_missing_and_corrupt_run(runs, tmp_path, capsys):
    code, _, err = run_export(capsys, "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 1
    assert_export_error(err, "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in runs["bpe"].iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" else data)
    code, _, err = run_export(capsys, "--ckpt", str(broken), "--out", str(tmp_path / "o"))
    assert code == 1
    assert_export_error(err, "corrupt or truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_existing_out_needs_force(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(out))
    assert code == 1
    assert_export_error(err, "--force")
    assert listing(tmp_path) == ["out", "out/keep.txt"]
    code, stdout, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(out),
                                   "--force")
    assert code == 0, err
    assert "GPT2LMHeadModel" in stdout and "bytes" in stdout
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    empty = tmp_path / "empty"  # an empty folder is not in the way
    empty.mkdir()
    assert run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(empty))[0] == 0


def test_unwritable_out(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(blocker / "hf"))
    assert code == 1
    assert_export_error(err, "file is not a directory")
    code, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(blocker))
    assert code == 1
    assert_export_error(err, "not a directory")
    assert listing(tmp_path) == ["file"]


@pytest.mark.parametrize("error,words,code", [
    (OSError(28, "No space left on device", "x"), "No space left", 1),
    (KeyboardInterrupt(), "interrupted", 130)])
def test_failure_while_writing_leaves_nothing(runs, tmp_path, capsys, monkeypatch, error, words,
                                              code):
    def fail(*a, **k):
        raise error
    monkeypatch.setattr(hf, "_for_older_readers", fail)  # after every file has been written
    for target in (tmp_path / "new" / "deeper" / "hf", tmp_path / "old"):
        if target.name == "old":
            target.mkdir()
            (target / "keep.txt").write_text("mine")
        got, _, err = run_export(capsys, "--ckpt", str(runs["bytes"]), "--out", str(target),
                                 "--force")
        assert got == code
        assert_export_error(err, words)
    assert listing(tmp_path) == ["old", "old/keep.txt"]  # made parents and temporaries removed


def test_model_transformers_cannot_express(runs, tmp_path, capsys):
    run = tmp_path / "run"
    model, tok, _ = checkpoint.load_model(runs["bpe"], device="cpu")
    model.config = dataclasses.replace(model.config, logit_softcap=30.0)
    checkpoint.save_model(run, model, tok)
    r = subprocess.run([sys.executable, "-m", "gptmod_ext.export", "--ckpt", str(run), "--out",
                        str(tmp_path / "hf")], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert_export_error(r.stderr, "soft-cap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_out_must_not_replace_the_run(runs, tmp_path, capsys):
    run = tmp_path / "parent" / "run"
    run.mkdir(parents=True)
    for f in runs["bytes"].iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    before = listing(tmp_path)
    for out in (run, run.parent):
        code, _, err = run_export(capsys, "--ckpt", str(run), "--out", str(out), "--force")
        assert code == 1
        assert_export_error(err, "would replace the run directory")
    assert listing(tmp_path) == before
    code, _, err = run_export(capsys, "--ckpt", str(run), "--out", str(run / "hf"))
    assert code == 0, err  # a folder inside the run is fine


def test_hf_folder_is_not_exported_again(exported, tmp_path, capsys):
    code, _, err = run_export(capsys, "--ckpt", str(exported["bytes"]), "--out", str(tmp_path / "o"))
    assert code == 1
    assert_export_error(err, "already a Hugging Face folder")
    assert not (tmp_path / "o").exists()


def test_server_serves_the_exported_folder(exported, ours):
    pytest.importorskip("openai")
    from serve_util import API_KEY, live_server, openai_client

    tok = ours["bpe"]["tok"]
    with live_server(exported["bpe"], "--api-key", API_KEY, "--backend", "torch",
                     "--device", "cpu") as url:
        client = openai_client(url, API_KEY)
        for prompt, greedy in zip(PROMPTS, ours["bpe"]["greedy"]):
            r = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                          max_tokens=N_NEW, temperature=0)
            raw = tok.decode_bytes([i for i in greedy if i != tok.eot_id])
            assert r.choices[0].text == codecs.getincrementaldecoder("utf-8")("replace").decode(
                raw, final=tok.eot_id in greedy)
            assert r.usage.completion_tokens == len(greedy)
