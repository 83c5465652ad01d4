"""The continuous-batching engine, without HTTP: results must not depend on batch company."""
import copy
import random
import threading
import time

import pytest
import torch

from gptmod_ext import GPT, GPTConfig
from gptmod_ext import tokenizer as tokenizer_mod
from gptmod_ext.engine import Engine, QueueFull, SamplingParams
from helpers import assert_greedy_agrees, float64_next_logits, needs_ext
from serve_util import expected_text


@pytest.fixture(scope="module")
def tok():
    return tokenizer_mod.byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(7)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64)
    return GPT(cfg).eval()


def reference(model, tok, prompt, max_tokens, **kw):
    """The same prompt run alone through model.generate (the independent reference)."""
    out = model.generate([prompt], max_tokens, eos_id=tok.eot_id, **kw)[0]
    return out[len(prompt):]


def run_concurrently(engine, jobs):
    """Submits every (prompt, params) at once from threads; returns engine.generate results."""
    results = [None] * len(jobs)

    def run(i):
        results[i] = engine.generate(*jobs[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def run_until_finished(engine, n, timeout=60):
    """Starts the engine (requests submitted before are admitted together, in its first step),
    waits until n requests have finished, and stops it."""
    with engine:
        deadline = time.time() + timeout
        while engine.stats()["requests_finished"] < n:
            assert time.time() < deadline
            time.sleep(0.01)


# -- batching does not change results ---------------------------------------------------------
def _backends():
    from gptmod_ext import _ext
    return ["torch"] + (["ext"] if _ext.AVAILABLE else [])


@pytest.mark.parametrize("backend", _backends())
def test_greedy_equals_generate_alone_under_ragged_batching(model, tok, backend):
    saved, model.backend = model.backend, backend
    try:
        _check_greedy_under_batching(model, tok)
    finally:
        model.backend = saved


def _check_greedy_under_batching(model, tok):
    rnd = random.Random(0)
    jobs, refs = [], []
    for i in range(12):
        prompt = tok.encode("x" * rnd.randint(1, 30) + str(i))
        n = rnd.randint(1, 40)
        jobs.append((prompt, SamplingParams(max_tokens=n, temperature=0)))
        refs.append(reference(model, tok, prompt, n, temperature=0))
    # A small prefill budget: newcomers join over several steps while others decode.
    with Engine(model, tok, max_batch=4, max_queue=16, prefill_budget=8) as engine:
        results = run_concurrently(engine, jobs)
        stats = engine.stats()
    for (texts, ids, reasons, done), ref, (prompt, p) in zip(results, refs, jobs):
        assert ids[0] == ref
        reason = "stop" if ref[-1] == tok.eot_id else "length"
        assert reasons[0] == reason
        assert texts[0] == expected_text(tok, ref, truncated=reason == "length")
        assert done.prompt_tokens == len(prompt) and done.completion_tokens == len(ref)
    assert stats["max_active_seen"] > 1  # sequences really shared decode steps
    assert stats["active_slots"] == 0


def test_seeded_sampling_is_independent_of_batch_company(model, tok):
    prompt = tok.encode("seeded prompt")
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01)
    params = SamplingParams(max_tokens=30, seed=1234, **kw)
    ref = reference(model, tok, prompt, 30, seed=1234, **kw)
    others = [(tok.encode(f"noise {i}"), SamplingParams(max_tokens=25 + i, temperature=1.0))
              for i in range(5)]
    with Engine(model, tok, max_batch=6) as engine:
        alone = engine.generate(prompt, params)[1][0]
        crowded = run_concurrently(engine, [(prompt, params)] + others)[0][1][0]
    assert alone == ref
    assert crowded == ref


def test_n_choices_use_seed_plus_index(model, tok):
    prompt = tok.encode("choices")
    with Engine(model, tok, max_batch=4) as engine:
        _, ids, reasons, done = engine.generate(
            prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=10, n=3))
    for i in range(3):
        assert ids[i] == reference(model, tok, prompt, 12, temperature=1.0, seed=10 + i)
    assert done.completion_tokens == sum(len(x) for x in ids)
    assert len({tuple(x) for x in ids}) > 1


def test_stop_string_ends_the_sequence(model, tok):
    prompt = tok.encode("stop me")
    full = reference(model, tok, prompt, 60, temperature=0)
    text = tok.decode(full)
    # A 2-character stop string taken from the middle of the greedy text.
    start = next(i for i in range(5, len(text) - 2)
                 if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    with Engine(model, tok, max_batch=2) as engine:
        texts, ids, reasons, done = engine.generate(
            prompt, SamplingParams(max_tokens=60, temperature=0, stop=[stop]))
    assert texts[0] == text[:start]
    assert reasons[0] == "stop"
    # It stopped at the first token whose text completes the stop string.
    k = next(k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k]))
    assert ids[0] == full[:k]


def test_text_is_utf8_safe_and_specials_have_no_text(model, tok):
    # ignore_eos: <|endoftext|> is a token like any other but never shows up as text.
    prompt = tok.encode("é✓")
    with Engine(model, tok, max_batch=2) as engine:
        texts, ids, reasons, _ = engine.generate(
            prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=3, stop_at_eos=False))
    assert len(ids[0]) == 80 and reasons[0] == "length"
    assert texts[0] == expected_text(tok, ids[0], truncated=True)
    assert "<|endoftext|>" not in texts[0]


def test_queue_full_and_cancel_frees_the_slot(model, tok):
    long = SamplingParams(max_tokens=90, temperature=0)
    prompt = tok.encode("a")
    engine = Engine(model, tok, max_batch=1, max_queue=1)
    # Not started yet: the first request takes the free slot, the second waits, the third
    # has no room.
    first = engine.submit(prompt, long, lambda ev: None)
    second = engine.submit(prompt, long, lambda ev: None)
    with pytest.raises(QueueFull):
        engine.submit(prompt, long, lambda ev: None)
    first.cancel()
    second.cancel()
    with engine:
        deadline = time.time() + 10
        while engine.stats()["waiting_requests"] or engine.stats()["active_slots"]:
            assert time.time() < deadline
            time.sleep(0.01)
        assert engine.stats()["requests_cancelled"] == 2
        # The slot is usable again.
        texts, ids, reasons, _ = engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0))
        assert ids[0] == reference(model, tok, prompt, 3, temperature=0)


def test_cancel_mid_generation(model, tok):
    events = []
    with Engine(model, tok, max_batch=2) as engine:
        req = engine.submit(tok.encode("b"), SamplingParams(max_tokens=90, temperature=0),
                            events.append)
        deadline = time.time() + 10
        while not events:
            assert time.time() < deadline
            time.sleep(0.001)
        req.cancel()
        while engine.stats()["active_slots"]:
            assert time.time() < deadline
            time.sleep(0.001)
        assert engine.stats()["requests_cancelled"] == 1
    assert not any(ev.kind == "done" for ev in events)


@pytest.mark.parametrize("prompt,settings,match", [
    ([], {}, "empty"),
    ([1] * 90, dict(max_tokens=7), "context"),
    ([1], dict(max_tokens=0), "max_tokens"),
    ([1], dict(n=5), "n must be"),
    ([999], {}, "token ids"),
    ([1], dict(logit_bias={10**6: 1.0}), "logit_bias"),
])
def test_invalid_requests_are_refused(model, tok, prompt, settings, match):
    # A setting out of its range never gets this far (SamplingParams refuses it, below); the
    # engine refuses what does not fit this model: the context, max_batch, the vocabulary.
    engine = Engine(model, tok, max_batch=4)
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, SamplingParams(**settings), lambda ev: None)


@pytest.mark.parametrize("settings", [dict(max_tokens=0), dict(temperature=-0.1),
                                      dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5),
                                      dict(n=0), dict(logprobs=21), dict(stop=["a", ""]),
                                      dict(presence_penalty=2.5), dict(repetition_penalty=0),
                                      dict(logit_bias={3: 101}), dict(seed=2**63),
                                      dict(timeout=-1)])
def test_sampling_params_check_their_ranges(settings):
    field = next(iter(settings))
    with pytest.raises(ValueError, match=f"^{field} ") as e:
        SamplingParams(**settings)
    assert e.value.field == field
    with pytest.raises(Exception):  # checked once: a record cannot be changed afterwards
        SamplingParams().temperature = -1


# -- the model API the engine relies on ------------------------------------------------------------
def test_all_logits_and_copy_prefix_match_the_plain_forward(model, tok):
    prompt = tok.encode("copy this prompt")
    T = len(prompt)
    full, _ = model(torch.tensor([prompt]))  # the uncached forward: the independent reference
    cache = model.new_kv_cache(3, 64)
    logits = model.forward_cached(torch.tensor([prompt]), cache, rows=0, all_logits=True)
    assert logits.shape == (1, T, tok.vocab_size)
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    # Rows 1 and 2 get row 0's prompt K/V: their next step equals a forward over prompt + token.
    cache.copy_prefix(0, [1, 2], T)
    assert cache.seqlens.tolist() == [T, T, T]
    nxt = torch.tensor([[5], [6], [7]])
    step = model.forward_cached(nxt, cache)
    for row in range(3):
        ref, _ = model(torch.tensor([prompt + [int(nxt[row, 0])]]))
        torch.testing.assert_close(step[row], ref[0, -1], atol=1e-4, rtol=1e-4)


def test_batched_prefill_equals_one_request_at_a_time(model, tok):
    # Submitted before the engine starts: all are admitted in one step and prefilled by one
    # forward (ragged lengths); each must get what it gets alone.
    prompts = [tok.encode("x" * k + "batched") for k in (1, 9, 3, 17, 5)]
    engine = Engine(model, tok, max_batch=8)
    results = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_tokens=12, temperature=0), results[i].append)
    run_until_finished(engine, len(prompts))
    assert engine.stats()["max_prefill_batch"] == len(prompts)
    with Engine(model, tok, max_batch=8) as alone:
        for p, events in zip(prompts, results):
            ids = [t for ev in events if ev.kind == "text" for t in ev.token_ids]
            assert ids == alone.generate(p, SamplingParams(max_tokens=12, temperature=0))[1][0]
            assert ids == reference(model, tok, p, 12, temperature=0)


def test_a_burst_is_prefilled_shortest_first(model, tok):
    # Admitted together (submitted before the engine starts), with a budget that fits a few
    # prompts a step: the shortest prompts take the lowest slots and get their first tokens
    # first, whole prompts rather than fragments; each still gets what it gets alone.
    lengths = [40, 6, 25, 3, 12]
    prompts = [tok.encode("y" * k) for k in lengths]
    engine = Engine(model, tok, max_batch=8, prefill_budget=16)
    firsts, events = [], [[] for _ in prompts]

    def record(i):
        def on_event(ev):
            if ev.kind == "text" and not events[i]:
                firsts.append(i)
            events[i].append(ev)
        return on_event
    reqs = [engine.submit(p, SamplingParams(max_tokens=8, temperature=0), record(i))
            for i, p in enumerate(prompts)]
    run_until_finished(engine, len(prompts))
    by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
    assert firsts == by_length
    assert [reqs[i].seqs[0].slot for i in by_length] == list(range(len(lengths)))
    for p, evs in zip(prompts, events):
        ids = [t for ev in evs if ev.kind == "text" for t in ev.token_ids]
        assert ids == reference(model, tok, p, 8, temperature=0)


def test_a_later_short_prompt_does_not_pass_an_earlier_long_one(model, tok):
    # Shortest first holds among requests admitted together only: a long prompt already being
    # prefilled in chunks keeps its place ahead of short prompts that arrive later.
    engine = Engine(model, tok, max_batch=4, prefill_budget=16)
    params = SamplingParams(max_tokens=30, temperature=0)
    engine.submit(tok.encode("decoding"), params, lambda ev: None)
    engine.step()  # prefilled alone; decodes from now on (step() drives the engine by hand)
    long = engine.submit(tok.encode("z" * 40), params, lambda ev: None)
    engine.step()
    assert long.prefilled == 16
    short = engine.submit(tok.encode("abc"), params, lambda ev: None)
    engine.step()
    assert (long.prefilled, short.prefilled) == (32, 0)
    engine.step()
    assert long.decoding and short.decoding


@needs_ext
def test_compiled_decode_in_the_engine(tok, monkeypatch):
    # serve --compile: the engine decodes through GPT.compile_decode()'s fused CPU step, also
    # with holes among the slots (a short request finishes first), and greedy tokens stay
    # those of generate on the plain model.
    torch.manual_seed(11)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64)
    plain = GPT(cfg, backend="ext").eval()
    fast = copy.deepcopy(plain).compile_decode()
    plain.decoder.fused = False  # the reference: the layers' own cached forward
    from gptmod_ext.decode import FusedDecode
    calls = []
    real = FusedDecode.step

    def step(self, model, idx, cache, rows, lengths=None):
        calls.append(None if lengths is None else lengths.tolist())
        return real(self, model, idx, cache, rows, lengths)
    monkeypatch.setattr(FusedDecode, "step", step)
    jobs = [(tok.encode(p), SamplingParams(max_tokens=n, temperature=0))
            for p, n in (("first", 30), ("gone soon", 3), ("third one", 30))]
    engine = Engine(fast, tok, max_batch=4)
    results = [[] for _ in jobs]
    for (prompt, params), out in zip(jobs, results):
        engine.submit(prompt, params, out.append)
    run_until_finished(engine, len(jobs))
    assert [1, 0, 1] in calls  # "gone soon" (slot 1) left a hole between the other two
    for (prompt, params), events in zip(jobs, results):
        ids = [t for ev in events if ev.kind == "text" for t in ev.token_ids]
        want = reference(plain, tok, prompt, params.max_tokens, temperature=0)
        assert_greedy_agrees(ids, want, prompt, float64_next_logits(plain))


def test_long_prompt_prefilled_in_chunks_while_others_decode(model, tok):
    with Engine(model, tok, max_batch=4, prefill_budget=4) as engine:
        jobs = [(tok.encode("short"), SamplingParams(max_tokens=40, temperature=0)),
                (tok.encode("a much longer prompt, " * 2), SamplingParams(max_tokens=10, temperature=0))]
        results = run_concurrently(engine, jobs)
    for (prompt, p), (_, ids, _, _) in zip(jobs, results):
        assert ids[0] == reference(model, tok, prompt, p.max_tokens, temperature=0)


def test_penalties_match_a_float64_reference(model, tok):
    # Greedy with a frequency and presence penalty and a logit bias, against the same rule
    # written here over the plain forward in float64.
    prompt = tok.encode("repeat repeat")
    bias = {int(tok.encode("e")[0]): -100.0}
    params = SamplingParams(max_tokens=20, temperature=0, frequency_penalty=0.5,
                            presence_penalty=0.3, logit_bias=bias, stop_at_eos=False)
    with Engine(model, tok, max_batch=2) as engine:
        got = engine.generate(prompt, params)[1][0]
    seq, counts = list(prompt), torch.zeros(tok.vocab_size, dtype=torch.float64)
    for _ in range(20):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0][0, -1].double()
        for t, b in bias.items():
            logits[t] += b
        logits -= 0.5 * counts + 0.3 * (counts > 0).double()
        nxt = int(logits.argmax())
        counts[nxt] += 1
        seq.append(nxt)
    assert got == seq[len(prompt):]
    assert not set(bias) & set(got)


def test_repetition_penalty_matches_a_float64_reference(model, tok):
    prompt = tok.encode("abcabc")
    with Engine(model, tok, max_batch=2) as engine:
        got = engine.generate(prompt, SamplingParams(max_tokens=15, temperature=0,
                                                     repetition_penalty=1.7, stop_at_eos=False))[1][0]
    seq = list(prompt)
    for _ in range(15):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0][0, -1].double()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[seq] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / 1.7, logits * 1.7), logits)
        seq.append(int(logits.argmax()))
    assert got == seq[len(prompt):]


def test_timeout_before_any_token_is_a_504_error(model, tok):
    engine = Engine(model, tok, max_batch=2)
    events = []
    engine.submit(tok.encode("late"), SamplingParams(max_tokens=5, timeout=0.0), events.append)
    with engine:
        deadline = time.time() + 10
        while not events:
            assert time.time() < deadline
            time.sleep(0.01)
    assert [(ev.kind, ev.status) for ev in events] == [("error", 504)]


def test_prompt_logprobs_across_prefill_chunks(model, tok):
    # A prompt prefilled in 3-token chunks while another sequence decodes: its echo logprobs
    # (from the prefill passes) must equal float64 log-softmax over the plain forward.
    prompt = tok.encode("logprobs of a chunked prompt")
    events, busy = [], []
    with Engine(model, tok, max_batch=2, prefill_budget=3) as engine:
        engine.submit(tok.encode("busy"), SamplingParams(max_tokens=80, temperature=0,
                                                         stop_at_eos=False), busy.append)
        deadline = time.time() + 30
        while not busy:  # decoding: the next prompt is prefilled 3 tokens per step
            assert time.time() < deadline
            time.sleep(0.001)
        engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, echo=True, logprobs=2),
                      events.append)
        while not events or events[-1].kind != "done":
            assert time.time() < deadline
            time.sleep(0.01)
    assert not any(ev.kind == "done" for ev in busy)  # it really ran alongside
    prompt_lp = next(ev for ev in events if ev.kind == "prompt").logprobs
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0][0].double().log_softmax(-1)
    assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(prompt_lp[i].logprob - float(ref[i - 1, prompt[i]])) < 1e-4
        assert [t for t, _ in prompt_lp[i].top] == ref[i - 1].topk(2).indices.tolist()
    ids = [t for ev in events if ev.kind == "text" for t in ev.token_ids]
    assert ids == reference(model, tok, prompt, 2, temperature=0)
