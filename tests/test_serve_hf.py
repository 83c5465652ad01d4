"""A Hugging Face folder served: a tiny random Llama saved with save_pretrained (through
hf.save_hf) with a chat template. Chat requests use the folder's template; outputs must equal
transformers' own greedy generate on the same folder."""
import json

import pytest

pytest.importorskip("fastapi")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from gptmod_ext import GPT, GPTConfig, hf  # noqa: E402
from gptmod_ext import tokenizer as tokenizer_mod  # noqa: E402
from serve_util import live_server, openai_client  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(11)
    tok = tokenizer_mod.byte_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=64))
    d = hf.save_hf(model, tok, tmp_path_factory.mktemp("hf") / "tiny-llama")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def served(hf_dir):
    with live_server(hf_dir, "--max-batch", "4") as url:
        yield url


@pytest.fixture(scope="module")
def reference(hf_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    return tok, model


def hf_greedy(reference, ids, n):
    """transformers' greedy text; cut by the length limit, a half character at its end (which
    transformers shows as U+FFFD) is dropped, as the server does."""
    tok, model = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    return text if new[-1] == tok.eos_token_id else text.rstrip("\ufffd")


def test_chat_uses_the_folders_template(served, reference):
    tok, _ = reference
    client = openai_client(served)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == hf_greedy(reference, ids, 10)
    info = httpx.get(served + "/tokenizer_info").json()
    assert info["chat_template"] == TEMPLATE
    t = httpx.post(served + "/tokenize", json={"messages": messages}).json()
    assert t["tokens"] == ids


def test_completions_match_transformers(served, reference):
    tok, _ = reference
    client = openai_client(served)
    prompt = "Once upon a time"
    r = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == hf_greedy(reference, tok.encode(prompt), 12)


def test_special_tokens_have_no_text(hf_dir, served, reference):
    # The folder's special ids (transformers' own list) are the ones the engine sends no text
    # for; end to end, a completion forced to repeat its end-of-sequence token past the end is
    # empty (decode skips special tokens as well, so that half holds either way).
    tok, _ = reference
    ours = hf.HFTokenizer(hf_dir)
    assert [t for t in range(ours.vocab_size) if ours.is_special(t)] == sorted(tok.all_special_ids)
    body = {"prompt": "x", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(tok.eos_token_id): 100}}
    r = httpx.post(served + "/v1/completions", json=body, timeout=60).json()
    assert (r["choices"][0]["text"], r["usage"]["completion_tokens"]) == ("", 5)
