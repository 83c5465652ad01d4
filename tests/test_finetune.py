"""Fine-tuning: `train --init-from SRC` from a run directory, a Hugging Face Llama folder, a
Hugging Face GPT-2 folder and a nanoGPT char-level ckpt.pt (all tiny, built here); chat SFT with
its masked loss; LoRA; and the one-line errors.

Independent references: transformers' own models (float64) for the run directory and the two
Hugging Face folders, and test_nanogpt's float64 nanoGPT for the checkpoint; transformers'
tokenizers for the folders' ids; the chat layout (ChatML turns ended by <|endoftext|>, see
chat.py) spelled out byte by byte here, with the loss over the answers computed by hand in
float64; LoRA's rank and merge checked with float64 linear algebra on the saved files.
"""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import metrics, one_error_line

from gptmod_ext import GPT, GPTConfig, checkpoint, hf, sample
from gptmod_ext import tokenizer as tokenizer_mod
from gptmod_ext import train as TR

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("apple banana cherry dog fish house kite lemon night ocean river stone tree wind "
         "bread cloud moon sun").split()
COMMON = ["--batch-size", "4", "--eval-iters", "2", "--backend", "torch", "--no-progress",
          "--threads", "1", "--log-interval", "1"]
PHRASE = "I am a teapot."


def run_train(capsys, *args):
    """python -m gptmod_ext.train in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = TR.main([*COMMON, *[str(a) for a in args]])
    return rc, capsys.readouterr().err


# -----------------------------------------------------------------------------------------------
# Sources, built here


def gpt2_bytes() -> dict[int, str]:
    """GPT-2's byte -> printable character table (its byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def gpt2_folder(path):
    """A downloaded GPT-2's layout, tiny: GPT2LMHeadModel + a byte-level BPE (the 256 bytes, a
    few merges, <|endoftext|> last) through GPT2TokenizerFast."""
    table = gpt2_bytes()
    vocab = {table[b]: b for b in range(256)}
    merges = [("Ġ", "b"), ("a", "n"), ("e", "r"), ("Ġ", "s"), ("an", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = eot = len(vocab)
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eot, eos_token_id=eot))
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_folder(path):
    """What `python -m gptmod_ext.export` writes, tiny: LlamaForCausalLM with our bytes
    tokenizer converted."""
    torch.manual_seed(4)
    tok = tokenizer_mod.byte_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=32))
    return hf.save_hf(model, tok, path)


def run_dir(path, text):
    """A run directory of ours: a BPE trained on the text, a random modern model."""
    torch.manual_seed(5)
    tok = tokenizer_mod.train_bpe([text], 300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2,
                          n_kv_head=1, n_embd=32))
    checkpoint.save_model(path, model, tok)
    return path


NANO = None  # test_nanogpt's builders, imported lazily (a test module of its own)


def nanogpt_dir(path):
    """nanoGPT's out_dir/ckpt.pt of a char-level run, with its meta.pkl."""
    import test_nanogpt as N

    a = dict(N.NANO_ARGS, block_size=128, bias=True)
    N.save_nanogpt(path / "ckpt.pt", N.compiled_keys(N.nanogpt_state(a, seed=7)), a)
    N.write_meta(path / "meta.pkl")
    return path / "ckpt.pt"


def words_text(seed, lines, per_line=5):
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(per_line)) + "\n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    text = words_text(0, 40)
    (root / "text.txt").write_text(text)
    for name in ("run", "llama", "gpt2", "nano"):
        (root / name).mkdir()
    return {"root": root, "text": text,
            "run": run_dir(root / "run", text), "llama": llama_folder(root / "llama"),
            "gpt2": gpt2_folder(root / "gpt2"), "nano": nanogpt_dir(root / "nano")}


# -----------------------------------------------------------------------------------------------
# --init-from: SRC's loss, SRC's ids, foreign data refused


def reference_loss(kind, sources, ids):
    """The source's mean next-token loss on ids, float64, from an implementation of its own."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if kind == "nano":
            import test_nanogpt as N

            ck = torch.load(sources["nano"], weights_only=True)
            sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
            logits = N.nanogpt_reference(sd, ck["model_args"], x)[0]
        else:
            if kind == "run":
                model, _, _ = checkpoint.load_model(sources["run"], device="cpu", backend="torch")
                theirs = hf.to_hf(model)
            else:
                theirs = transformers.AutoModelForCausalLM.from_pretrained(sources[kind])
            logits = theirs.double()(x).logits[0]
    return F.cross_entropy(logits[:-1].double(), x[0, 1:]).item()


def source_ids(kind, sources, text):
    """The source's own tokenizer's ids of a document (as prepare writes it: then its end)."""
    if kind in ("llama", "gpt2"):
        t = transformers.AutoTokenizer.from_pretrained(sources[kind])
        return t(text).input_ids + [t.eos_token_id]
    if kind == "nano":
        import test_nanogpt as N
        return [N.CHARS.index(c) for c in text]
    tok = tokenizer_mod.load(sources["run"])
    return tok.encode_ordinary(text) + [tok.eot_id]


@pytest.mark.parametrize("kind", ["run", "llama", "gpt2", "nano"])
def test_init_from_starts_at_the_sources_loss(sources, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # raw text is prepared under ./data
    src = sources[kind]
    extra = ["--tokenizer-path", sources["root"] / "nano" / "meta.pkl"] if kind == "nano" else []
    # 1. Raw text, prepared with the source's tokenizer.
    rc, err = run_train(capsys, "--init-from", src, *extra, "--data", sources["root"] / "text.txt",
                        "--out-dir", "first", "--max-iters", 1, "--block-size", 16,
                        "--sample-tokens", 4)
    assert rc == 0, err
    data_dir = next((tmp_path / "data").iterdir())
    meta = json.loads((data_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    val = np.fromfile(data_dir / "val.bin", dtype=dtype).astype(np.int64).tolist()
    cfg = json.loads((tmp_path / "first" / "config.json").read_text())
    assert cfg["init_from"]["path"] == str(src.resolve()) and cfg["train"]["init_from"] == str(src)
    tok = tokenizer_mod.load(tmp_path / "first")
    text = tok.decode(val if kind == "nano" else val[:-1])  # then the end-of-text token
    assert len(text) > 10 and sources["text"].endswith(text)   # the val split: the text's end
    assert val == source_ids(kind, sources, text)
    # 2. The prepared directory again, one window covering the whole val split: the step-0 val
    # loss is the source's own loss on those tokens.
    rc, err = run_train(capsys, "--init-from", src, *extra, "--data", data_dir, "--out-dir",
                        "second", "--max-iters", 1, "--block-size", len(val) - 1,
                        "--sample-tokens", 0)
    assert rc == 0, err
    (step0,) = [r for r in metrics(tmp_path / "second") if r.get("step") == 0 and "val_loss" in r]
    assert step0["val_loss"] == pytest.approx(reference_loss(kind, sources, val), rel=2e-5)
    # 3. Data prepared with another tokenizer is refused, naming both.
    other = tmp_path / "other"
    from gptmod_ext import prepare
    prepare.prepare([str(sources["root"] / "text.txt")], other, tokenizer="bytes",
                    progress=False)
    rc, err = run_train(capsys, "--init-from", src, *extra, "--data", other, "--out-dir", "third",
                        "--max-iters", 1)
    assert rc == 1
    one_error_line(err, f"--data {other} was prepared with the tokenizer 'bytes'")
    assert not (tmp_path / "third").exists()
    if kind == "nano":  # the new run directory samples (a char vocabulary: no end-of-text)
        code = sample.main(["--ckpt", str(tmp_path / "second"), "--prompt", "the ",
                            "--max-new-tokens", "8", "--backend", "torch", "-q"])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("the ") and len(out) == len("the ") + 8 + 1


def test_full_finetune_resume_is_exact(sources, tmp_path, capsys, monkeypatch):
    # A fine-tune resumes like any run (dropout, an override that keeps every shape, makes the
    # RNG matter); the run records where it started.
    monkeypatch.chdir(tmp_path)
    args = ["--init-from", sources["run"], "--data", sources["root"] / "text.txt",
            "--max-iters", 8, "--eval-interval", 4, "--block-size", 16, "--sample-tokens", 0,
            "--model-args", "dropout=0.1"]
    assert run_train(capsys, *args, "--out-dir", "straight")[0] == 0
    assert run_train(capsys, *args, "--out-dir", "split", "--stop-at", 4)[0] == 0
    rc, err = run_train(capsys, *args, "--out-dir", "split", "--resume")
    assert rc == 0, err
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "split" / "config.json").read_text())
    assert cfg["init_from"]["kind"] == "run" and cfg["model"]["dropout"] == 0.1
    assert cfg["train"]["lr"] == TR.FINETUNE_LR and cfg["train"]["weight_decay"] == 0.0


# -----------------------------------------------------------------------------------------------
# Chat SFT


EOT, IM_START = 256, 257  # the bytes tokenizer's <|endoftext|>, and the chat token it gets


def by_hand(messages):
    """The bytes tokenizer's ids of a conversation in our chat layout, and which are trained:
    <|im_start|>role\\n content <|endoftext|> per turn, the answers' content and end trained;
    turns after the last answer left out."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, trained = [], []
    for m in messages[:last + 1]:
        head = [IM_START, *f"{m['role']}\n".encode()]
        body = [*m["content"].encode(), EOT]
        ids += head + body
        trained += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    return ids, trained


def phrase_chats(n, seed):
    rng = random.Random(seed)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS)
                                                  for _ in range(rng.randint(1, 4)))},
             {"role": "assistant", "content": PHRASE}] for _ in range(n)]


def write_chats(path, chats):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return path


@pytest.fixture(scope="module")
def chat_src(tmp_path_factory):
    """A run directory with the bytes tokenizer (no chat template yet) and sharp random
    weights (an output layer that can make confident predictions, frozen under LoRA), and the
    chat data: every question answered with PHRASE."""
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(6)
    tok = tokenizer_mod.byte_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2,
                          n_kv_head=1, n_embd=32))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        model.wte.weight.normal_(0, 0.5)
    checkpoint.save_model(root / "base", model, tok)
    return {"root": root, "base": root / "base",
            "data": write_chats(root / "chat.jsonl", phrase_chats(40, 1))}


LORA = ["--lora-rank", 4, "--lr", 3e-2, "--max-iters", 120, "--eval-interval", 60,
        "--batch-size", 8, "--sample-tokens", 0]


@pytest.fixture(scope="module")
def lora_run(chat_src):
    """Chat SFT with LoRA (rank 4, alpha 8) from chat_src's base run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(chat_src["root"])
        rc = TR.main([*COMMON, "--init-from", "base", "--data", "chat.jsonl", "--out-dir", "lora",
                      *map(str, LORA)])
    assert rc == 0
    return chat_src["root"] / "lora"


def test_chat_loss_is_the_answers_loss(chat_src, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(2)
    chats = []
    for i in range(20):  # one goes to val (5%)
        turns = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for _ in range(1 + i % 2):
            turns += [{"role": "user", "content": rng.choice(WORDS) + "?"},
                      {"role": "assistant", "content": " ".join(rng.sample(WORDS, 2))}]
        chats.append(turns + ([{"role": "user", "content": "bye"}] if i % 3 == 0 else []))
    data = write_chats(tmp_path / "mask.jsonl", chats)
    rc, err = run_train(capsys, "--init-from", chat_src["base"], "--data", data, "--out-dir",
                        "sft", "--max-iters", 1, "--lr", 0, "--sample-tokens", 0)
    assert rc == 0, err
    # Every conversation in the data directory is the one spelled out by hand, mask included.
    data_dir = next((tmp_path / "data").iterdir())
    want = {json.dumps(by_hand(c)) for c in chats}
    val = None
    for split in ("train", "val"):
        ids = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16).tolist()
        mask = np.fromfile(data_dir / f"{split}.mask.bin", dtype=np.uint8).tolist()
        starts = np.fromfile(data_dir / f"{split}.idx.bin", dtype=np.int64).tolist()
        for a, b in zip(starts[:-1], starts[1:]):
            assert json.dumps((ids[a:b], mask[a:b])) in want
            val = (ids[a:b], mask[a:b]) if split == "val" else val
    assert len(starts) == 2  # the one val conversation
    # The reference: the base model with the new token's rows at the mean of the others,
    # in float64 through transformers; the loss averaged by hand over the trained targets.
    base = load_file(chat_src["base"] / "model.safetensors")
    ref = GPT(GPTConfig(vocab_size=258, block_size=128, n_layer=2, n_head=2, n_kv_head=1,
                        n_embd=32))
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            v.copy_(base[k])
        for w in (ref.wte.weight, ref.lm_head.weight):
            w[IM_START] = w[:IM_START].double().mean(0).float()
    ids, mask = val
    with torch.no_grad():
        logits = hf.to_hf(ref).double()(torch.tensor([ids])).logits[0]
    targets = [t for t in range(1, len(ids)) if mask[t]]
    logp = logits.log_softmax(-1)
    want_loss = -sum(logp[t - 1, ids[t]].item() for t in targets) / len(targets)
    rows = metrics(tmp_path / "sft")
    (step0,) = [r for r in rows if r.get("step") == 0 and "val_loss" in r]
    (final,) = [r for r in rows if "final_val_loss" in r]
    assert step0["val_loss"] == pytest.approx(want_loss, rel=2e-5)
    assert final["final_val_loss"] == pytest.approx(want_loss, rel=2e-5)
    assert final["final_val_tokens"] == len(targets)
    # The saved run: the base's rows untouched (lr 0), the new rows at their mean.
    got = load_file(tmp_path / "sft" / "model.safetensors")
    for k in ("wte.weight", "lm_head.weight"):
        assert torch.equal(got[k][:IM_START], base[k][:IM_START])
        torch.testing.assert_close(got[k][IM_START].double(),
                                   base[k][:IM_START].double().mean(0), rtol=0, atol=1e-6)
    assert tokenizer_mod.load(tmp_path / "sft").chat_template


def test_sft_answers_through_sampler_server_and_transformers(lora_run, tmp_path, capsys,
                                                             monkeypatch):
    import io

    from serve_util import live_server, openai_client

    from gptmod_ext import chat, export

    question = "sun moon kite"  # in no training conversation
    assert question not in (lora_run.parent / "chat.jsonl").read_text()
    # The sampler's --chat: each line a message, the history kept.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question}\ntree\n"))
    assert sample.main(["--ckpt", str(lora_run), "--chat", "--temperature", "0", "-q"]) == 0
    assert capsys.readouterr().out == (f"---------- prompt 1: {question} ----------\n{PHRASE}\n"
                                       f"---------- prompt 2: tree ----------\n{PHRASE}\n")
    # transformers on the exported folder renders the same ids, and answers the same.
    assert export.main(["--ckpt", str(lora_run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    _, tok, _ = checkpoint.load_model(lora_run, device="cpu")
    assert ids == chat.prompt_ids(tok, messages)
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    assert out[0, -1] == tok.eot_id  # the answer ended at the end of its turn
    assert hf_tok.decode(out[0, len(ids):], skip_special_tokens=True) == PHRASE
    # The server, through the openai client.
    with live_server(lora_run) as url:
        import httpx

        assert httpx.post(url + "/tokenize", json={"messages": messages}).json()["tokens"] == ids
        r = openai_client(url).chat.completions.create(model="lora", messages=messages,
                                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content == PHRASE and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(ids)


# -----------------------------------------------------------------------------------------------
# LoRA


def test_lora_changes_only_low_rank_and_merges(chat_src, lora_run):
    base = load_file(chat_src["base"] / "model.safetensors")
    merged = load_file(lora_run / "model.safetensors")
    adapters = load_file(lora_run / "lora.safetensors")
    scale = 8 / 4  # alpha (2 x rank by default) / rank
    assert merged.keys() == base.keys()
    for k in base:
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                       "mlp.c_proj.weight")):
            layer = k.removesuffix(".weight")
            A, B = adapters[layer + ".lora_A"].double(), adapters[layer + ".lora_B"].double()
            assert A.shape[0] == B.shape[1] == 4
            delta = merged[k].double() - base[k].double()
            torch.testing.assert_close(delta, scale * B @ A, rtol=0, atol=1e-6)
            s = torch.linalg.svdvals(delta)
            assert s[3] > 1e-3 and s[4] < 1e-6 * s[0], (k, s[:6])  # rank 4: changed, low rank
        elif k in ("wte.weight", "lm_head.weight"):  # grown by the chat token's row
            assert torch.equal(merged[k][:IM_START], base[k][:IM_START]), k
        else:  # norms
            assert torch.equal(merged[k], base[k]), k
    # Only the adapters are in the optimizer.
    state = torch.load(lora_run / "train_state.pt", weights_only=True)["optimizer"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted([tuple(t.shape) for t in adapters.values()])


def test_lora_resume_is_exact(chat_src, lora_run, capsys, monkeypatch):
    monkeypatch.chdir(chat_src["root"])  # the same prepared data as lora_run
    args = ["--init-from", "base", "--data", "chat.jsonl", "--out-dir", "lora_split", *LORA]
    rc, err = run_train(capsys, *args, "--stop-at", 60)
    assert rc == 0, err
    rc, err = run_train(capsys, *args, "--resume")
    assert rc == 0, err
    for f in ("model.safetensors", "lora.safetensors"):
        a, b = load_file(lora_run / f), load_file(chat_src["root"] / "lora_split" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    rc, err = run_train(capsys, *args, "--max-iters", 130, "--resume", "--lora-rank", 8)
    assert rc == 1
    one_error_line(err, "--resume: the run in lora_split was trained with --lora-rank 4, not 8")


# -----------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


BAD_CHATS = [
    ({"text": "hi"}, "no 'messages' list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "messages[1] has role 'bot'; the roles are system, user and assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
]


@pytest.mark.parametrize("row,words", BAD_CHATS)
def test_bad_chat_rows_name_file_and_line(chat_src, tmp_path, capsys, monkeypatch, row, words):
    monkeypatch.chdir(tmp_path)
    good = {"messages": phrase_chats(1, 0)[0]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    rc, err = run_train(capsys, "--init-from", chat_src["base"], "--data", path, "--out-dir",
                        "out")
    assert rc == 1
    one_error_line(err, f"{path}:3: {words}")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("data/*/meta.json"))


@pytest.mark.parametrize("args,words", [
    (["--init-from", "missing"], "--init-from: checkpoint directory missing does not exist"),
    (["--init-from", "empty"], "--init-from: empty holds no model.safetensors"),
    (["--init-from", "SRC", "--lora-rank", 4, "--lora-targets", "attn.c_attn,q_proj"],
     "--lora-targets: unknown target 'q_proj'; the targets are attn.c_attn, attn.c_proj, "
     "mlp.c_fc, mlp.c_proj, lm_head"),
    (["--init-from", "SRC", "--lora-rank", 40],
     "--lora-rank 40 is larger than h.0.attn.c_attn allows: its weight is 64 x 32"),
    (["--init-from", "SRC", "--lora-rank", 4, "--lora-targets", "lm_head"], None),
    (["--init-from", "SRC", "--model-args", "n_layer=3"],
     "--model-args n_layer=3 would change the shape of the source's weights"),
    (["--init-from", "SRC", "--preset", "small"], "--preset: --init-from takes the architecture"),
    (["--lora-rank", 4], "--lora-rank needs --init-from"),
])
def test_bad_init_from_options(chat_src, tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [str(chat_src["base"]) if a == "SRC" else a for a in args]
    rc, err = run_train(capsys, *args, "--data", chat_src["data"], "--out-dir", "out",
                        "--max-iters", 1, "--sample-tokens", 0)
    if words is None:  # lm_head is a target when it is not tied: allowed
        assert rc == 0, err
        return
    assert rc == 1
    one_error_line(err, words)
    assert not (tmp_path / "out").exists()


HF_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("template", [HF_TEMPLATE, HF_TEMPLATE.replace("{{ eos_token }}", "\n")])
def test_a_folders_own_template_is_used(sources, tmp_path, capsys, monkeypatch, template):
    # A Hugging Face folder with a chat template keeps it (nothing added to its vocabulary);
    # the answers and their eos are trained, the ids are transformers' own. A template whose
    # answers do not end with the eos (where everything stops) is refused, naming the row.
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "llama"
    for f in sources["llama"].iterdir():
        (folder / f.name).parent.mkdir(exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    chats = phrase_chats(20, 3)
    data = write_chats(tmp_path / "c.jsonl", [c + [{"role": "user", "content": "ok"},
                                                   {"role": "assistant", "content": "yes"}]
                                              for c in chats])
    rc, err = run_train(capsys, "--init-from", folder, "--data", data, "--out-dir", "out",
                        "--max-iters", 1, "--sample-tokens", 0)
    if "eos_token" not in template:  # no eos after an answer
        assert rc == 1
        one_error_line(err, f"{data}:1: the chat template does not end an assistant turn")
        return
    assert rc == 0, err
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    data_dir = next((tmp_path / "data").iterdir())
    ids = np.fromfile(data_dir / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(data_dir / "train.mask.bin", dtype=np.uint8).tolist()
    starts = np.fromfile(data_dir / "train.idx.bin", dtype=np.int64).tolist()
    conv, trained = ids[:starts[1]], mask[:starts[1]]
    full = [hf_tok.apply_chat_template(json.loads(row)["messages"], return_dict=False)
            for row in data.read_text().splitlines()]
    assert conv in [[int(t) for t in f] for f in full]
    eos = hf_tok.eos_token_id
    answers = [hf_tok.encode(t, add_special_tokens=False) + [eos] for t in (PHRASE, "yes")]
    assert [t for t, m in zip(conv, trained) if m] == answers[0] + answers[1]
    assert tokenizer_mod.load(tmp_path / "out").chat_template == template
    assert tokenizer_mod.load(tmp_path / "out").vocab_size == len(hf_tok)  # nothing added
