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

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch

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


@dataclass(frozen=True)
class Penalties:
    """One generation's logit adjustments for GPT.generate and the sampler CLI (the server keeps
    them per request in engine.SamplingParams): 0 / 1.0 / {} are off."""
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.logit_bias or self.repetition != 1.0)


class PenaltyTracker:
    """What apply_penalties needs while a batch generates: which tokens each row's prompt holds
    (for the repetition penalty) and how often each row generated each token."""

    def __init__(self, penalties: Penalties, prompts: torch.Tensor, lengths: Optional[torch.Tensor],
                 vocab_size: int):
        B, T = prompts.shape
        device = prompts.device
        self.p = penalties
        self.rows = torch.arange(B, device=device)
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
        self.prompt_seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        real = (torch.ones(B, T, dtype=torch.bool, device=device) if lengths is None
                else torch.arange(T, device=device) < lengths.view(B, 1))  # not the right padding
        self.prompt_seen[self.rows.view(B, 1).expand(B, T)[real], prompts[real]] = True
        self.bias = (bias_vector(penalties.logit_bias, vocab_size, device)
                     if penalties.logit_bias else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_penalties(logits, self.counts, self.prompt_seen | (self.counts > 0),
                               self.p.presence, self.p.frequency, self.p.repetition, self.bias)

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
