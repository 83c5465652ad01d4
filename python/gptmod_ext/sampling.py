"""Turning next-token logits into tokens: penalties, logit bias, temperature, top-k, top-p,
min-p, greedy.

Plain functions on logits [B, V], shared by GPT.generate, the sampler and the server. Every
parameter is either one number for the whole batch or a tensor [B] with one value per row
(a server batches requests with different settings); a filter whose value is None or "off"
(top_k <= 0, top_p >= 1, min_p <= 0) leaves the row unchanged. Filtered-out tokens get -inf.

Order, as in Hugging Face and vLLM: penalties and logit bias (apply_penalties), then
temperature, then top-k, then top-p, then min-p.
Randomness comes only from the torch.Generator passed in (or one per row), never from the
global RNG, so the same seed gives the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch

from .common import UserError

Param = Union[None, float, int, torch.Tensor]


def _per_row(value, logits: torch.Tensor, dtype=None) -> torch.Tensor:
    """A scalar or [B] parameter as a [B, 1] tensor that broadcasts over the vocabulary."""
    t = torch.as_tensor(value, device=logits.device, dtype=dtype or logits.dtype)
    return t.reshape(-1, 1) if t.dim() else t.reshape(1, 1)


def _is_off(value, off) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return False
    return off(value)


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    """logits / temperature. Rows with temperature 0 (greedy) are left as they are."""
    if _is_off(temperature, lambda t: t == 1.0 or t == 0.0):
        return logits
    t = _per_row(temperature, logits)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def top_k_filter(logits: torch.Tensor, top_k: Param) -> torch.Tensor:
    """Keeps each row's k largest logits (ties with the k-th are kept too)."""
    if _is_off(top_k, lambda k: k <= 0 or k >= logits.size(-1)):
        return logits
    V = logits.size(-1)
    if not isinstance(top_k, torch.Tensor):
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
    else:
        k = top_k.to(device=logits.device, dtype=torch.long).reshape(-1, 1)
        k = torch.where(k <= 0, V, k).clamp(max=V)  # <= 0 means off for that row
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Nucleus filter: keeps the smallest set of most likely tokens whose mass reaches top_p.

    A token is dropped when the tokens ranked above it already hold at least top_p of the
    probability, so the most likely token always stays.
    """
    if _is_off(top_p, lambda p: p >= 1.0):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= _per_row(top_p, logits, torch.float32)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Keeps the tokens whose probability is at least min_p times the row's largest one."""
    if _is_off(min_p, lambda p: p <= 0.0):
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
    threshold = logits.amax(dim=-1, keepdim=True) + _per_row(min_p, logits).log()
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_penalties(logits: torch.Tensor, counts: Optional[torch.Tensor] = None,
                    seen: Optional[torch.Tensor] = None, presence_penalty: Param = None,
                    frequency_penalty: Param = None, repetition_penalty: Param = None,
                    logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OpenAI's and vLLM's logit adjustments, applied before temperature: logits [B, V] -> [B, V].

    logit_bias [B, V] (or [V]) is added first. repetition_penalty r (vLLM's, over `seen`: a bool
    [B, V] of the prompt's and the generated tokens) divides positive logits of seen tokens by r
    and multiplies negative ones by r. frequency_penalty f and presence_penalty p (OpenAI's,
    over `counts`: [B, V] how often each token was generated) subtract f * count and p * (count
    > 0). Penalties are numbers or [B] tensors; 0 (1 for repetition) or None is off.
    """
    logits = logits.float()
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.device, torch.float32)
    if repetition_penalty is not None and seen is not None \
            and not _is_off(repetition_penalty, lambda r: r == 1.0):
        r = _per_row(repetition_penalty, logits)
        scaled = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen.to(logits.device), scaled, logits)
    if counts is not None:
        c = counts.to(logits.device, torch.float32)
        if not _is_off(frequency_penalty, lambda f: f == 0):
            logits = logits - _per_row(frequency_penalty, logits) * c
        if not _is_off(presence_penalty, lambda p: p == 0):
            logits = logits - _per_row(presence_penalty, logits) * (c > 0).float()
    return logits


def bias_vector(logit_bias: Mapping[int, float], vocab_size: int, device=None) -> torch.Tensor:
    """{token id: bias} as the dense fp32 [vocab_size] tensor apply_penalties adds."""
    bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    for tok, b in logit_bias.items():
        bias[int(tok)] = float(b)
    return bias


MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per position
MAX_STOP_STRINGS = 256  # lm-evaluation-harness sends a task's whole `until` list


class SamplingError(UserError, ValueError):
    """A sampling setting out of its range. `field` names it, `problem` says what is wrong, so
    each front end words it its own way: the CLI as --top-p, the server as 'top_p' (HTTP 400)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class SamplingParams:
    """Every setting of one generation, for GPT.generate, the sampler CLI and the server alike,
    checked once, here (as vLLM's SamplingParams). 'Off' values: top_k 0 (or -1), top_p 1,
    min_p 0, penalties 0 (1 for repetition), logit_bias {}. temperature 0 is greedy.

    max_tokens: tokens to generate (0 only with echo: the prompt is scored, nothing generated).
    seed: choice i draws from a torch.Generator seeded with seed + i; None: a random one.
    n: choices per prompt. stop: strings that end a choice (not included in its text).
    stop_at_eos: False keeps going past the end-of-text token (fixed-length benchmarks).
    logprobs: None, or k in 0..20: each token's logprob and the k most likely alternatives.
    echo: the caller shows the prompt (with logprobs: the prompt tokens' logprobs too).
    presence/frequency_penalty (OpenAI's, over the generated tokens), repetition_penalty
    (vLLM's, over prompt and output), logit_bias {token id: bias}: applied in that order
    (bias first) before the temperature; see apply_penalties.
    timeout: seconds after which the server ends the request (finish_reason 'length').
    generate() uses the fields that choose tokens (temperature to logit_bias, seed); the text
    fields (stop, logprobs, echo, n, timeout) belong to the sampler and the server."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    stop: tuple = ()
    stop_at_eos: bool = True
    logprobs: Optional[int] = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    timeout: Optional[float] = None

    def __post_init__(self):
        # Normalized first (frozen: through object.__setattr__), then checked.
        set_ = object.__setattr__
        set_(self, "top_k", 0 if self.top_k in (None, -1) else self.top_k)
        set_(self, "top_p", 1.0 if self.top_p is None else self.top_p)
        set_(self, "min_p", 0.0 if self.min_p is None else self.min_p)
        set_(self, "stop", tuple(self.stop))
        set_(self, "logit_bias", dict(self.logit_bias))
        for name, ok, problem in self._rules():
            if not ok:
                got = repr(getattr(self, name))
                raise SamplingError(name, f"{problem}, got {got[:40]}{'...' if len(got) > 40 else ''}")

    def _rules(self):
        lo = 0 if self.echo else 1
        yield "max_tokens", _int(self.max_tokens) and self.max_tokens >= lo, f"must be >= {lo}"
        yield "temperature", _num(self.temperature) and self.temperature >= 0, "must be >= 0"
        yield "top_k", _int(self.top_k) and self.top_k >= 0, "must be >= 1 (0 or -1: off)"
        yield "top_p", _num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"
        yield "min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"
        yield "seed", self.seed is None or (_int(self.seed) and -2**63 <= self.seed < 2**63), \
            "must be an integer in [-2^63, 2^63)"
        yield "n", _int(self.n) and self.n >= 1, "must be >= 1"
        yield "stop", (len(self.stop) <= MAX_STOP_STRINGS
                       and all(isinstance(s, str) and s for s in self.stop)), \
            f"must be at most {MAX_STOP_STRINGS} non-empty strings"
        yield "logprobs", self.logprobs is None or (_int(self.logprobs)
                                                    and 0 <= self.logprobs <= MAX_LOGPROBS), \
            f"must be between 0 and {MAX_LOGPROBS}"
        for name in ("presence_penalty", "frequency_penalty"):
            yield name, _num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, \
                "must be in [-2, 2]"
        yield "repetition_penalty", _num(self.repetition_penalty) and self.repetition_penalty > 0, \
            "must be > 0 (1: off)"
        yield "logit_bias", all(_int(t) and t >= 0 and _num(b) and -100 <= b <= 100
                                for t, b in self.logit_bias.items()), \
            "must map token ids >= 0 to biases in [-100, 100]"
        yield "timeout", self.timeout is None or (_num(self.timeout) and self.timeout >= 0), \
            "must be >= 0 seconds"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class PenaltyTracker:
    """What apply_penalties needs while a batch generates: which tokens each row's prompt holds
    (for the repetition penalty) and how often each row generated each token."""

    def __init__(self, params: SamplingParams, prompts: torch.Tensor,
                 lengths: Optional[torch.Tensor], vocab_size: int):
        B, T = prompts.shape
        device = prompts.device
        self.p = params
        self.rows = torch.arange(B, device=device)
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
        self.prompt_seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        real = (torch.ones(B, T, dtype=torch.bool, device=device) if lengths is None
                else torch.arange(T, device=device) < lengths.view(B, 1))  # not the right padding
        self.prompt_seen[self.rows.view(B, 1).expand(B, T)[real], prompts[real]] = True
        self.bias = (bias_vector(params.logit_bias, vocab_size, device)
                     if params.logit_bias else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        return apply_penalties(logits, self.counts, self.prompt_seen | (self.counts > 0),
                               p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
                               self.bias)

    def update(self, tokens: torch.Tensor) -> None:
        """tokens [B]: the step's new token of each row."""
        self.counts[self.rows, tokens] += 1


def process_logits(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = None,
                   top_p: Param = None, min_p: Param = None) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied in that order: logits [B, V] -> [B, V]."""
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i (the "exponential race");
    # unlike torch.multinomial it needs no host sync on GPUs (as in gpt-fast).
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.empty_like(probs[i]).exponential_(generator=g)
                             for i, g in enumerate(generator)])
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    # A draw of exactly 0 would turn a filtered token's 0 / 0 into NaN, which argmax picks.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: Param = 1.0, top_k: Param = None,
           top_p: Param = None, min_p: Param = None,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Draws one token per row of logits [B, V]: LongTensor [B].

    temperature 0 is greedy (argmax, the first index on ties); with a [B] temperature, rows
    at 0 are greedy and the others sample. generator is one torch.Generator for the batch or a
    list with one per row (per-request seeds in the server); None uses a fresh unseeded one.
    """
    greedy = logits.argmax(dim=-1)
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return greedy
    logits = process_logits(logits.float(), temperature, top_k, top_p, min_p)
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.seed()
    drawn = _draw(logits.softmax(dim=-1), generator)
    if isinstance(temperature, torch.Tensor):
        drawn = torch.where(temperature.to(logits.device).reshape(-1) == 0, greedy, drawn)
    return drawn


def make_generator(seed: int | None, device=None) -> torch.Generator:
    """A torch.Generator on device seeded with seed, or non-deterministically when seed is None."""
    g = torch.Generator(device=device if device is not None else "cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
