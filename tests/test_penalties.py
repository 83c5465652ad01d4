"""Penalties and logit bias in GPT.generate and the sampler CLI (sampling.SamplingParams), against
the rule written out here in float64 over the plain (uncached, torch backend) forward."""
import pytest
import torch

from gptmod_ext import GPT, GPTConfig, sample
from gptmod_ext.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=32)).eval()
    # Larger logits than the init gives, so greedy decoding repeats itself without penalties.
    with torch.no_grad():
        m.lm_head.weight.mul_(10)
    return m


def reference_greedy(model, prompt, steps, p: SamplingParams):
    seq, counts = list(prompt), torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0][0, -1].double()
        for t, b in p.logit_bias.items():
            logits[t] += b
        seen = counts > 0
        seen[list(prompt)] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / p.repetition_penalty,
                                               logits * p.repetition_penalty), logits)
        logits = (logits - p.frequency_penalty * counts
                  - p.presence_penalty * (counts > 0).double())
        nxt = int(logits.argmax())
        counts[nxt] += 1
        seq.append(nxt)
    return seq


# Each alone (small enough that it changes some greedy choices, not all), then all together.
PENALTIES = [SamplingParams(frequency_penalty=0.4), SamplingParams(presence_penalty=0.5),
             SamplingParams(repetition_penalty=1.3),
             SamplingParams(logit_bias={5: -100.0, 9: 2.5}),
             SamplingParams(presence_penalty=0.3, frequency_penalty=0.7, repetition_penalty=1.5,
                            logit_bias={5: -100.0})]


@pytest.mark.parametrize("p", PENALTIES, ids=["frequency", "presence", "repetition", "bias", "all"])
@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_with_penalties_matches_float64_reference(model, backend, use_cache, p):
    model.backend = backend
    prompts = [[1, 2, 3, 1, 2], [7, 7]]  # ragged: the padding after row 1 is not "seen"
    plain = model.generate(prompts, 20, temperature=0, use_cache=use_cache)
    got = model.generate(prompts, 20, p, temperature=0, use_cache=use_cache)
    want = [reference_greedy(model, pr, 20, p) for pr in prompts]
    model.backend = "torch"
    assert got == want
    assert got != plain  # the setting is strong enough to matter here
    if p.logit_bias:
        assert all(5 not in row[len(pr):] for row, pr in zip(got, prompts))


def test_off_penalties_change_nothing(model):
    plain = model.generate([[4, 5, 6]], 15, temperature=0)
    assert model.generate([[4, 5, 6]], 15, SamplingParams(), temperature=0) == plain


def test_frequency_penalty_reduces_repeats(model):
    plain = model.generate([[3]], 30, temperature=0)[0][1:]
    penalized = model.generate([[3]], 30, temperature=0, frequency_penalty=2.0)[0][1:]
    assert len(set(penalized)) > len(set(plain))


def test_sampler_options_parse_into_sampling_params():
    args = sample.parse_args(["--presence-penalty", "0.5", "--frequency-penalty", "-1",
                              "--repetition-penalty", "1.2", "--logit-bias", "3=-100",
                              "--logit-bias", "4=1.5"])
    p = args.params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias) == \
        (0.5, -1.0, 1.2, {3: -100.0, 4: 1.5})
    assert not sample.parse_args([]).params.penalized


@pytest.mark.parametrize("argv", [["--logit-bias", "3"], ["--logit-bias", "x=1"],
                                  ["--logit-bias", "3=101"], ["--logit-bias", "-1=5"],
                                  ["--frequency-penalty", "2.5"], ["--repetition-penalty", "0"]])
def test_sampler_rejects_bad_penalty_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_repetition_penalty_covers_the_prompt(model):
    # The prompt is the model's own greedy continuation, so the prompt tokens are exactly the
    # ones it would repeat: a penalty that forgot the prompt would pick them again.
    prompt = model.generate([[3]], 6, temperature=0)[0]
    p = SamplingParams(repetition_penalty=3.0)
    assert model.generate([prompt], 12, p, temperature=0) == \
        [reference_greedy(model, prompt, 12, p)]
