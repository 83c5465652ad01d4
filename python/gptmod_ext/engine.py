"""Continuous batching: one thread owns the model and serves many requests at once.

The engine knows nothing about HTTP. A caller submits token ids with sampling settings and a
callback; the engine thread calls it back with text deltas and finish events.

Three parts, each readable on its own:
  Scheduler (queue, admission, slots). One KVCache of `max_batch` rows x block_size is
    allocated at start; each row is a slot that holds one sequence, and a request with n
    choices takes n slots. Requests wait first come first served; one is admitted when enough
    slots are free (lowest first, so the decode range stays dense without moving K/V around:
    compaction would copy L x 2 x S x Hkv x D per move, a hole costs one row of a cheap step);
    of the requests admitted together, the shortest prompts take the lowest slots.
    At most `max_queue` requests wait; submit() raises QueueFull beyond that.
  ModelRunner (prefill, decode step, sampling). Prefill: the prompts of admitted requests go
    through the model together, one forward_cached over their slots (ragged lengths, right
    padded; the model packs the real tokens, so padding costs no matmul), each into its
    request's first slot. At most `prefill_budget` prompt tokens go per step while other
    sequences decode or wait, so they keep their pace, and a prompt longer than that goes in
    chunks. Requests admitted earlier go first; of a burst admitted together, the shortest
    prompts go first (shortest job first: of 32 prompts arriving at once, the first half gets
    its first token after about a quarter of the burst's prefill, not after all of it). When
    a prompt is complete it is copied into the request's other slots (n > 1,
    KVCache.copy_prefix) and the first token of every choice is sampled from its logits.
    Decode: ONE forward_cached over the slot range 0..highest decoding slot with one token per
    row; every row sits at its own length (cache.seqlens), and rows that are not decoding (free,
    or mid-prefill) ride along with `lengths` = 0: they write one throw-away K/V row at their
    length, which does not advance, and their logits are ignored.
    Sampling: each sequence has its own torch.Generator (seed + choice index when a seed is
    given); penalties, logit bias, temperature, top-k/top-p/min-p go to sampling.py per row, so
    a seeded request draws the same tokens whatever else shares the batch. Logprobs are the
    fp32 log_softmax of the model's logits (after the soft-cap, before penalties).
  Engine (the loop and the output). Each step: drop cancelled and timed-out requests, admit,
    prefill, one decode step. streaming.TextStreamer (shared with the sampler CLI) turns each
    sequence's tokens into text: a character cut across tokens is held until complete, stop
    strings are matched on the text and the longest tail that could still begin one is held
    back, so no part of a stop string is ever sent. A sequence cut by max_tokens drops a half
    character at its end.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import sampling
from .streaming import TextStreamer

MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per position


class QueueFull(Exception):
    """Every slot is busy and max_queue requests already wait."""


@dataclass
class SamplingParams:
    """Per-request settings; 'off' values: top_k 0, top_p 1.0, min_p 0.0, penalties 0 (1 for
    repetition). temperature 0 = greedy.

    logprobs: None, or k in 0..20: each generated token comes with its logprob and the k most
    likely alternatives. echo: the caller shows the prompt, so max_tokens may be 0; with
    logprobs the prompt tokens' logprobs come first (Event 'prompt'). timeout: seconds after
    submission at which the request is ended (finish_reason 'length', or an error with status
    504 when nothing was generated yet)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    logprobs: Optional[int] = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict)
    timeout: Optional[float] = None

    @property
    def prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its logprob and the k most likely tokens at that position [(id, logprob)]."""
    token: int
    logprob: float
    top: tuple = ()


@dataclass
class Event:
    """What the engine reports. kind:
      'prompt'  (echo + logprobs) `logprobs` holds one TokenLogprob per prompt token, the first
                one None (nothing predicts it); sent once, before any 'text'
      'text'    choice `index` produced `text` (may be '' when bytes are held) from `token_ids`,
                with one TokenLogprob per token in `logprobs` when params.logprobs is set
      'finish'  choice `index` ended with finish_reason 'stop' or 'length'
      'done'    every choice ended; prompt_tokens / completion_tokens hold the usage
      'error'   the request failed (`text` says why, `status` is the HTTP status it maps to);
                no other event follows
    """
    kind: str
    index: int = 0
    text: str = ""
    token_ids: tuple = ()
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple = ()
    status: int = 500


@dataclass(eq=False)
class _Seq:
    """One choice of a request, living in one slot."""
    request: "Request"
    index: int
    generator: torch.Generator
    text: TextStreamer
    slot: int = -1
    last_token: int = 0
    n_generated: int = 0
    done: bool = False
    counts: Optional[torch.Tensor] = None  # [V] generated-token counts (penalties only)


@dataclass(eq=False)
class Request:
    prompt_ids: list
    params: SamplingParams
    callback: Callable[[Event], None]
    id: int = 0
    seqs: list = field(default_factory=list)
    cancelled: bool = False
    submitted_at: float = 0.0
    prefilled: int = 0  # prompt tokens already in the cache of seqs[0]'s slot
    admitted_at: int = 0  # the engine step that gave it its slots
    prompt_logprobs: list = field(default_factory=list)

    def cancel(self) -> None:
        """Stops the request at the engine's next step and frees its slots (thread safe)."""
        self.cancelled = True

    @property
    def deadline(self) -> float:
        t = self.params.timeout
        return math.inf if t is None else self.submitted_at + t

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)


# -- scheduling ----------------------------------------------------------------------------------
class Scheduler:
    """The waiting queue and the slots; thread safe (submit runs on the caller's thread)."""

    def __init__(self, max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.slots: list[Optional[_Seq]] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()

    def push(self, req: Request) -> None:
        with self.cond:
            if self._would_wait(req) > self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {self.max_queue} "
                                f"requests are already waiting")
            self.waiting.append(req)
            self.cond.notify_all()

    def _would_wait(self, new: Request) -> int:
        # How many requests would wait for slots if `new` joined: admit FIFO into free slots.
        free = sum(s is None for s in self.slots)
        waiting = 0
        for r in itertools.chain(self.waiting, (new,)):
            if waiting == 0 and r.params.n <= free:
                free -= r.params.n
            else:
                waiting += 1
        return waiting

    def idle(self) -> bool:
        return not self.waiting and not any(self.slots)

    def running(self) -> list[Request]:
        """The requests holding slots, in admission order (their first slots ascending is not
        guaranteed, so order by request id)."""
        reqs = {s.request.id: s.request for s in self.slots if s is not None}
        return [reqs[k] for k in sorted(reqs)]

    def decoding(self) -> list[_Seq]:
        return [s for s in self.slots if s is not None and s.request.decoding]

    def admit(self, make_seq: Callable[[Request, int, int], _Seq]) -> list[Request]:
        """Moves waiting requests into free slots, FIFO; returns the admitted ones. Of the
        requests admitted together, the shortest prompt takes the lowest free slots: the engine
        prefills them shortest first, and neighbouring slots go through one forward."""
        admitted = []
        with self.cond:
            free = [i for i, s in enumerate(self.slots) if s is None]
            left = len(free)
            while self.waiting and self.waiting[0].params.n <= left:
                admitted.append(self.waiting.popleft())
                left -= admitted[-1].params.n
            slots = iter(free)
            for req in sorted(admitted, key=lambda r: len(r.prompt_ids)):
                for i, slot in zip(range(req.params.n), slots):
                    seq = make_seq(req, i, slot)
                    req.seqs.append(seq)
                    self.slots[slot] = seq
        return admitted

    def release(self, req: Request) -> list[int]:
        """Takes every slot of req back (or its place in the queue); returns the slots freed."""
        with self.cond:
            if req in self.waiting:
                self.waiting.remove(req)
            freed = [s.slot for s in req.seqs if self.slots[s.slot] is s]
            for slot in freed:
                self.slots[slot] = None
            return freed

    def free(self, seq: _Seq) -> bool:
        with self.cond:
            if seq.slot >= 0 and self.slots[seq.slot] is seq:
                self.slots[seq.slot] = None
                return True
            return False

    def take_all(self) -> list[Request]:
        """Empties the queue and every slot; returns the requests that were there."""
        with self.cond:
            reqs = {s.request.id: s.request for s in self.slots if s is not None}
            reqs.update({r.id: r for r in self.waiting})
            self.waiting.clear()
            self.slots = [None] * self.max_batch
            return list(reqs.values())

    def all_requests(self) -> list[Request]:
        with self.cond:
            return list(self.waiting) + self.running()


# -- running the model -------------------------------------------------------------------------
@dataclass
class _Chunk:
    """A piece of one request's prompt to prefill this step: prompt[start:end] into `slot`."""
    request: Request
    slot: int
    start: int
    end: int


class ModelRunner:
    """Owns the KV cache; turns prompts and last tokens into logits, logits into tokens."""

    def __init__(self, model, max_batch: int):
        self.model = model
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.max_batch = max_batch
        self.cache = None
        self.max_prefill_rows = 0  # the most prompts prefilled by one forward so far

    def start(self) -> None:
        self.cache = self.model.new_kv_cache(self.max_batch, self.model.config.block_size)

    def reset(self, slots=None) -> None:
        if self.cache is None:
            return
        if slots is None:
            self.cache.reset()
        for slot in slots or ():
            self.cache.reset(slot)

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, chunks: list[_Chunk]) -> dict:
        """Runs the chunks (each into its slot, at that slot's length) and returns
        {request id: next-token logits [V]} for the requests whose prompt is now complete.
        Prompt logprobs of requests that asked for them are appended to request.prompt_logprobs."""
        out = {}
        for run in self._runs(chunks):
            self.max_prefill_rows = max(self.max_prefill_rows, len(run))
            logits = self._forward_run(run)
            for r, c in enumerate(run):
                req, n = c.request, c.end - c.start
                if req.params.prompt_logprobs:
                    self._prompt_logprobs(req, c, logits[r, :n])
                req.prefilled = c.end
                if req.decoding:
                    out[req.id] = logits[r, n - 1] if logits.dim() == 3 else logits[r]
        return out

    def _runs(self, chunks: list[_Chunk]) -> list[list[_Chunk]]:
        """The chunks grouped into forwards over slot ranges, in slot order. The matmuls of a
        range see only its real tokens, but its attention and K/V writes cover the padding of
        short chunks and the rows in between (other sequences riding along with length 0), so
        a chunk joins the run before it only while that grid stays within twice the real
        work, and only if the rows in between can take T throw-away positions. Every forward
        reads all the weights, so few large runs beat many small ones (hence the neighbouring
        slots of a burst)."""
        if not chunks:
            return []
        seqlens = self.cache.seqlens.tolist()  # one host sync per step that prefills
        runs: list[list[_Chunk]] = []
        for c in sorted(chunks, key=lambda c: c.slot):
            if runs and self._worth_batching(runs[-1] + [c], seqlens):
                runs[-1].append(c)
            else:
                runs.append([c])
        return runs

    def _worth_batching(self, run: list[_Chunk], seqlens: list) -> bool:
        lo, hi = run[0].slot, run[-1].slot + 1
        T = max(c.end - c.start for c in run)
        if (hi - lo) * T > 2 * sum(c.end - c.start for c in run):
            return False
        ours = {c.slot for c in run}
        return all(i in ours or seqlens[i] + T <= self.cache.max_seq_len for i in range(lo, hi))

    def _forward_run(self, run: list[_Chunk]) -> torch.Tensor:
        all_logits = any(c.request.params.prompt_logprobs for c in run)
        if len(run) == 1:
            c = run[0]
            ids = torch.tensor([c.request.prompt_ids[c.start:c.end]], device=self.device)
            logits = self.model.forward_cached(ids, self.cache, rows=c.slot, all_logits=all_logits)
            return logits
        lo, hi = run[0].slot, run[-1].slot + 1
        T = max(c.end - c.start for c in run)
        tokens = torch.zeros(hi - lo, T, dtype=torch.long)
        lengths = torch.zeros(hi - lo, dtype=torch.long)
        for c in run:
            tokens[c.slot - lo, :c.end - c.start] = torch.tensor(c.request.prompt_ids[c.start:c.end])
            lengths[c.slot - lo] = c.end - c.start
        logits = self.model.forward_cached(tokens.to(self.device), self.cache, rows=slice(lo, hi),
                                           lengths=lengths.to(self.device), all_logits=all_logits)
        return logits[[c.slot - lo for c in run]]

    def _prompt_logprobs(self, req: Request, c: _Chunk, logits: torch.Tensor) -> None:
        # logits[i] predicts prompt[c.start + i + 1]; the last position of the last chunk
        # predicts the first generated token instead.
        if c.start == 0:
            req.prompt_logprobs.append(None)
        targets = req.prompt_ids[c.start + 1:c.end + 1]
        if targets:
            req.prompt_logprobs += token_logprobs(logits[:len(targets)], targets, req.params.logprobs)

    def copy_prompt(self, req: Request) -> None:
        """n > 1: the other choices get the first slot's prompt K/V, computed once."""
        if len(req.seqs) > 1:
            self.cache.copy_prefix(req.seqs[0].slot, [s.slot for s in req.seqs[1:]],
                                   len(req.prompt_ids))

    # -- decode ----------------------------------------------------------------------------
    def decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """One token for each of seqs (their last_token) -> next-token logits [len(seqs), V]."""
        hi = max(s.slot for s in seqs) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        lengths = torch.zeros(hi, dtype=torch.long)
        for s in seqs:
            tokens[s.slot, 0] = s.last_token
            lengths[s.slot] = 1
        logits = self.model.forward_cached(tokens.to(self.device), self.cache,
                                           rows=slice(0, hi), lengths=lengths.to(self.device))
        return logits[torch.tensor([s.slot for s in seqs], device=self.device)]

    # -- sampling --------------------------------------------------------------------------
    def sample(self, seqs: list[_Seq], logits: torch.Tensor) -> tuple[list[int], list]:
        """One token per seq from logits [len(seqs), V]: (token ids, TokenLogprob or None each)."""
        ps = [s.request.params for s in seqs]
        raw = logits
        if any(p.penalized for p in ps):
            logits = self._penalize(seqs, logits)
        if all(p.temperature == 0 for p in ps):
            nxt = logits.argmax(dim=-1)
        else:
            dev = logits.device
            # Per-row settings; rows with a filter off get a value the filter ignores.
            nxt = sampling.sample(
                logits,
                temperature=torch.tensor([float(p.temperature) for p in ps], device=dev),
                top_k=torch.tensor([int(p.top_k or 0) for p in ps], device=dev),
                top_p=torch.tensor([float(p.top_p) if p.top_p < 1 else float("inf") for p in ps],
                                   device=dev),
                min_p=torch.tensor([float(p.min_p or 0.0) for p in ps], device=dev),
                generator=[s.generator for s in seqs])
        tokens = nxt.tolist()
        lps = [None] * len(seqs)
        want = [i for i, p in enumerate(ps) if p.logprobs is not None]
        if want:
            k = max(ps[i].logprobs for i in want)
            rows = token_logprobs(raw[want], [tokens[i] for i in want], k)
            for i, lp in zip(want, rows):
                lps[i] = TokenLogprob(lp.token, lp.logprob, lp.top[:ps[i].logprobs])
        return tokens, lps

    def _penalize(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        ps = [s.request.params for s in seqs]
        dev, V = logits.device, logits.size(-1)
        counts = torch.stack([s.counts if s.counts is not None
                              else torch.zeros(V, dtype=torch.int32, device=dev) for s in seqs])
        seen = counts > 0
        if any(p.repetition_penalty != 1.0 for p in ps):
            prompt = torch.zeros_like(seen)
            for i, s in enumerate(seqs):
                prompt[i, s.request.prompt_ids] = True
            seen |= prompt
        bias = None
        if any(p.logit_bias for p in ps):
            bias = torch.stack([sampling.bias_vector(p.logit_bias, V, dev) for p in ps])

        def per_row(name):
            return torch.tensor([float(getattr(p, name)) for p in ps], device=dev)
        return sampling.apply_penalties(
            logits, counts, seen, presence_penalty=per_row("presence_penalty"),
            frequency_penalty=per_row("frequency_penalty"),
            repetition_penalty=per_row("repetition_penalty"), logit_bias=bias)

    def new_counts(self) -> torch.Tensor:
        return torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """TokenLogprob of tokens[i] under logits[i] (fp32 log_softmax), with the k most likely."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device).view(-1, 1))[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


# -- the engine ---------------------------------------------------------------------------------
class Engine:
    """The continuous-batching loop around one model (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 eos_id: Optional[int] = None, prefill_budget: int = 512):
        self.scheduler = Scheduler(max_batch, max_queue)
        self.runner = ModelRunner(model, max_batch)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.block_size = model.config.block_size
        self.eos_id = tokenizer.eot_id if eos_id is None else eos_id
        # Prompt tokens prefilled between two decode steps while sequences are decoding: a
        # burst of new requests then delays the running ones by a bounded time per step.
        self.prefill_budget = max(1, prefill_budget)
        self.device = model.device
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steps = 0            # decode steps run (for stats and tests)
        self.admissions = 0       # engine steps run (admission rounds)
        self.max_active_seen = 0  # the largest decode batch so far
        self.finished = 0         # requests that ended normally
        self.cancelled = 0        # requests dropped after cancel() (client went away)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="gptmod-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self.scheduler.cond:
            self._running = False
            self.scheduler.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- submitting --------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError if the request can never run (the server maps it to HTTP 400)."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: it needs at least one token")
        if params.max_tokens < (0 if params.echo else 1):
            raise ValueError(f"max_tokens must be >= {0 if params.echo else 1}, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.block_size:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds the model's context of "
                             f"{self.block_size} tokens")
        if not 1 <= params.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and max_batch={self.max_batch}, got {params.n}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {params.logprobs}")
        if any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               callback: Callable[[Event], None]) -> Request:
        """Queues a request; callback(Event) is called from the engine thread.
        Raises ValueError (a bad request) or QueueFull."""
        self.check(prompt_ids, params)
        req = Request(list(map(int, prompt_ids)), params, callback, next(self._ids),
                      submitted_at=time.perf_counter())
        self.scheduler.push(req)
        return req

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float = 300):
        """Blocking helper: returns (texts, token id lists, finish reasons, final 'done' Event)."""
        events, done = [], threading.Event()

        def on_event(ev):
            events.append(ev)
            if ev.kind in ("done", "error"):
                done.set()
        self.submit(prompt_ids, params, on_event)
        if not done.wait(timeout):
            raise TimeoutError("engine did not finish the request in time")
        if events[-1].kind == "error":
            raise RuntimeError(events[-1].text)
        n = params.n
        texts, ids, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        for ev in events:
            if ev.kind == "text":
                texts[ev.index] += ev.text
                ids[ev.index] += ev.token_ids
            elif ev.kind == "finish":
                reasons[ev.index] = ev.finish_reason
        return texts, ids, reasons, events[-1]

    def stats(self) -> dict:
        s = self.scheduler
        with s.cond:
            active = sum(x is not None for x in s.slots)
            return {"max_batch": self.max_batch, "max_queue": self.max_queue,
                    "active_slots": active, "waiting_requests": len(s.waiting),
                    "decode_steps": self.steps, "max_active_seen": self.max_active_seen,
                    "requests_finished": self.finished, "requests_cancelled": self.cancelled,
                    "max_prefill_batch": self.runner.max_prefill_rows}

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        cond = self.scheduler.cond
        with torch.inference_mode():
            self.runner.start()
            while True:
                with cond:
                    while self._running and self.scheduler.idle():
                        cond.wait(timeout=1.0)
                    if not self._running:
                        break
                try:
                    self._step()
                except Exception as e:  # a bug must not take the server down: fail the batch
                    self._fail_all(f"engine error: {type(e).__name__}: {e}")
            self._fail_all("the server is shutting down")

    def _step(self) -> None:
        self._drop_finished_early()
        for req in self.scheduler.admit(self._new_seq):
            req.admitted_at = self.admissions
            self.runner.reset([s.slot for s in req.seqs])
        self.admissions += 1
        decoding = self.scheduler.decoding()
        chunks = self._plan_prefill(bool(decoding))
        first = self.runner.prefill(chunks)
        ready = [c.request for c in chunks if c.request.id in first]
        if ready:
            self._start_decoding(ready, first)
        decoding = self.scheduler.decoding()
        if decoding:
            logits = self.runner.decode(decoding)
            self.steps += 1
            self.max_active_seen = max(self.max_active_seen, len(decoding))
            self._sample_and_emit(decoding, logits)

    def _new_seq(self, req: Request, index: int, slot: int) -> _Seq:
        p = req.params
        seed = None if p.seed is None else p.seed + index
        # context: a decode-only (Hugging Face) tokenizer needs the prompt's last tokens to
        # get a word-initial space right (see streaming._RedecodeDecoder).
        return _Seq(req, index, sampling.make_generator(seed, self.device),
                    TextStreamer(self.tokenizer, p.stop, context=req.prompt_ids[-4:]), slot=slot,
                    counts=self.runner.new_counts() if p.penalized else None)

    def _plan_prefill(self, decoding: bool) -> list[_Chunk]:
        """The prompt pieces to prefill this step, within prefill_budget tokens while others
        decode or wait for their first token (a lone prompt with nothing decoding goes whole).
        Requests admitted at an earlier step go first, so none waits behind later arrivals;
        among those admitted together (a burst), the shortest remaining prompt goes first:
        shortest job first minimises the mean wait, and the short prompts' first tokens no
        longer wait for the long prompts' prefill."""
        pending = sorted((r for r in self.scheduler.running() if not r.decoding),
                         key=lambda r: (r.admitted_at, len(r.prompt_ids) - r.prefilled))
        budget = math.inf if not decoding and len(pending) == 1 else self.prefill_budget
        chunks = []
        for req in pending:
            left = len(req.prompt_ids) - req.prefilled
            if chunks and left > budget:  # the rest next step, whole, rather than a fragment now
                break
            end = req.prefilled + min(left, budget)
            chunks.append(_Chunk(req, req.seqs[0].slot, req.prefilled, end))
            budget -= end - req.prefilled
        return chunks

    def _start_decoding(self, reqs: list[Request], first: dict) -> None:
        seqs, rows = [], []
        for req in reqs:
            self.runner.copy_prompt(req)
            if req.params.prompt_logprobs:
                self._emit(req, Event("prompt", logprobs=tuple(req.prompt_logprobs)))
            if req.params.max_tokens == 0:  # echo only: scored, nothing generated
                for seq in req.seqs:
                    self._finish(seq, "length")
                continue
            seqs += req.seqs
            rows += [first[req.id]] * len(req.seqs)
        if seqs:
            self._sample_and_emit(seqs, torch.stack(rows))

    def _fail_all(self, message: str) -> None:
        reqs = self.scheduler.take_all()
        self.runner.reset()
        for r in reqs:
            self._emit(r, Event("error", text=message))

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.callback(ev)
        except Exception:  # a broken consumer only loses its own events
            req.cancelled = True

    def _drop_finished_early(self) -> None:
        """Cancelled requests lose their slots; requests past their deadline end now."""
        now = time.perf_counter()
        for req in self.scheduler.all_requests():
            if req.cancelled:
                self.runner.reset(self.scheduler.release(req))
                self.cancelled += 1
            elif now >= req.deadline:
                self._time_out(req)

    def _time_out(self, req: Request) -> None:
        if not any(s.n_generated for s in req.seqs):
            self.runner.reset(self.scheduler.release(req))
            self._emit(req, Event("error", text=f"the request did not finish within its timeout "
                                                 f"of {req.params.timeout} s", status=504))
            return
        for seq in req.seqs:
            if not seq.done:
                self._emit(req, Event("text", seq.index, seq.text.finish(truncated=True)))
                self._finish(seq, "length")

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        tokens, lps = self.runner.sample(seqs, logits)
        for seq, tok, lp in zip(seqs, tokens, lps):
            self._advance(seq, tok, lp)

    def _is_text(self, tok: int) -> bool:
        # Special tokens (<|endoftext|> with ignore_eos) have no text, and an id the tokenizer
        # lacks (a model vocabulary larger than its tokenizer's) must not fail the whole batch.
        return 0 <= tok < self.tokenizer.vocab_size and not self.tokenizer.is_special(tok)

    def _advance(self, seq: _Seq, tok: int, lp: Optional[TokenLogprob]) -> None:
        req, p = seq.request, seq.request.params
        seq.n_generated += 1
        seq.last_token = tok
        if seq.counts is not None:
            seq.counts[tok] += 1
        reason = None
        if p.stop_at_eos and tok == self.eos_id:
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.put([tok] if self._is_text(tok) else [])
            if seq.text.stopped:
                reason = "stop"
            elif seq.n_generated >= p.max_tokens:
                # Cut by the limit: a character the next token would have completed is dropped
                # rather than sent as U+FFFD (as the sampler CLI does).
                text, reason = text + seq.text.finish(truncated=True), "length"
        self._emit(req, Event("text", seq.index, text, (tok,), logprobs=(lp,) if lp else ()))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: _Seq, reason: str) -> None:
        req = seq.request
        seq.done = True
        if self.scheduler.free(seq):
            self.runner.reset([seq.slot])
        self._emit(req, Event("finish", seq.index, finish_reason=reason,
                              completion_tokens=seq.n_generated))
        if all(s.done for s in req.seqs):
            self.finished += 1
            self._emit(req, Event("done", prompt_tokens=len(req.prompt_ids),
                                  completion_tokens=sum(s.n_generated for s in req.seqs)))
