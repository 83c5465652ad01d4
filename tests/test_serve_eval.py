"""lm-evaluation-harness as a client of the live server (`local-completions`, the tokenizer found
through the server's /tokenizer_info and /tokenize): a multiple_choice task (loglikelihood
requests: echo + logprobs, prompts as token ids) and a generate_until task (batched prompts,
a long stop list) on small local JSONL files. Logliks must equal the model's own float64
log-softmax (torch backend); generations must equal greedy model.generate."""
import json
import os

import pytest

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from gptmod_ext import checkpoint  # noqa: E402
from serve_util import greedy, live_server, make_tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [("The sky is", [" blue", " green", " loud"], 0),
             ("Two plus two is", [" four", " five"], 0),
             ("Fish live in", [" water", " trees", " cars", " é✓"], 0)]
PROMPTS = ["Once upon a time", "def main():", "x = 1\ny =", "Hello"]
# More stop strings than OpenAI's cap of 4: the server takes a task's whole `until` list.
STOPS = ["\n\n", "zz"] + [f"<stop{i}>" for i in range(70)]
MAX_GEN = 12


def _write_tasks(root):
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"q": q, "choices": c, "label": y}) + "\n"
                          for q, c, y in QUESTIONS))
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"text": p, "target": ""}) + "\n" for p in PROMPTS))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: target
target_delimiter: ""
generation_kwargs:
  until: {json.dumps(STOPS)}
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    run_dir = make_tiny_run(root / "tiny", block_size=128)
    _write_tasks(root)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    with live_server(run_dir, "--max-batch", "8") as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,"
                       f"max_retries=1,max_length=128,batch_size=4,tokenized_requests=True",
            tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(root)),
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    model, tok, _ = checkpoint.load_model(run_dir, "cpu", "float32", "torch")
    return out, model, tok


def _own_loglik(model, tok, context, continuation):
    # lm-eval's split: the continuation is what encoding the whole adds after the context.
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole]))
    lp = logits[0].double().log_softmax(-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_loglikelihoods_equal_the_models_own(evaluated):
    out, model, tok = evaluated
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            loglik = resp[0][0]
            assert abs(loglik - _own_loglik(model, tok, context, continuation)) < 1e-3
            checked += 1
    assert checked == sum(len(c) for _, c, _ in QUESTIONS)
    assert "acc,none" in out["results"]["tiny_mc"]


def test_generations_equal_greedy_generate(evaluated):
    out, model, tok = evaluated
    samples = out["samples"]["tiny_gen"]
    assert len(samples) == len(PROMPTS)
    texts = []
    for s in samples:
        context = s["arguments"][0][0]
        text, _, _ = greedy((model, tok), tok.encode(context), MAX_GEN, stop=STOPS)
        assert s["resps"][0][0] == text
        texts.append(text)
    assert any(texts)  # not trivially empty
