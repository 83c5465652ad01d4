"""Continuous batching: one thread owns the model and serves many requests at once.

The engine knows nothing about HTTP. A caller submits token ids with a sampling.SamplingParams
and a callback; the engine calls it back with text deltas and finish events.

Each engine step flows one way, in vLLM's shape: schedule -> execute -> update.
  Scheduler (requests, slots, the plan). One KVCache of `max_batch` rows x block_size is
    allocated at start; each row is a slot that holds one sequence, and a request with n
    choices takes n slots. The scheduler owns every request and slot, and resets the cache rows
    of the slots it frees (finish, cancel, timeout), so a slot and its row never part.
    Requests wait first come first served; one is admitted when enough slots are free (lowest
    first, so the decode range stays dense without moving K/V around: compaction would copy
    L x 2 x S x Hkv x D per move, a hole costs one row of a cheap step); of the requests
    admitted together, the shortest prompts take the lowest slots. At most `max_queue`
    requests wait; submit() raises QueueFull beyond that.
    Its plan for a step: the requests to drop (cancelled, timed out) and the prompt chunks to
    prefill. At most `prefill_budget` prompt tokens go per step while other sequences decode or
    wait, so they keep their pace, and a prompt longer than that goes in chunks. Requests
    admitted earlier go first; of a burst admitted together, the shortest prompts go first
    (shortest job first: of 32 prompts arriving at once, the first half gets its first token
    after about a quarter of the burst's prefill, not after all of it).
  ModelRunner (execute). Prefill: the chunks go through the model together, one forward_cached
    over neighbouring slots (ragged lengths, right padded; the model packs the real tokens, so
    padding costs no matmul), and it returns the next-token logits of every prompt that is now
    complete and the prompt logprobs asked for. Decode: ONE forward_cached over the slot range
    0..highest decoding slot with one token per row; rows that are not decoding (free, or
    mid-prefill) ride along with `lengths` = 0 (a throw-away K/V row, no advance). Sampling:
    each sequence has its own torch.Generator (seed + choice index when a seed is given);
    penalties, logit bias, temperature, top-k/top-p/min-p go to sampling.py per row, so a
    seeded request draws the same tokens whatever else shares the batch. Logprobs are the fp32
    log_softmax of the model's logits (after the soft-cap, before penalties).
  Engine (update). Turns the runner's tokens into events through streaming.SequenceOutput
    (shared with the sampler CLI: UTF-8 across tokens, stop strings never partly sent, finish
    reasons) and hands finished sequences back to the scheduler.
The loop runs on a thread (start/stop) or is driven by hand with step().
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
from .sampling import MAX_LOGPROBS, SamplingParams  # noqa: F401  (the engine's API)
from .streaming import SequenceOutput


class QueueFull(Exception):
    """Every slot is busy and max_queue requests already wait."""


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
    out: SequenceOutput
    slot: int = -1
    last_token: int = 0
    counts: Optional[torch.Tensor] = None  # [V] generated-token counts (penalties only)

    @property
    def done(self) -> bool:
        return self.out.finished


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
    admitted_at: int = 0  # the scheduling round that gave it its slots
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


@dataclass
class _Chunk:
    """A piece of one request's prompt to prefill this step: prompt[start:end] into `slot`."""
    request: Request
    slot: int
    start: int
    end: int


# -- scheduling ----------------------------------------------------------------------------------
class Scheduler:
    """The waiting queue, the slots and the plan of each step; thread safe (submit runs on the
    caller's thread). reset_rows(slots) empties those KV cache rows; it is called for every
    slot the scheduler frees."""

    def __init__(self, max_batch: int, max_queue: int, prefill_budget: int,
                 reset_rows: Callable[[list], None]):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_budget = max(1, prefill_budget)
        self.reset_rows = reset_rows
        self.slots: list[Optional[_Seq]] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.rounds = 0     # scheduling rounds so far (Request.admitted_at)
        self.cancelled = 0  # requests dropped after cancel() (the client went away)

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
        """The requests holding slots, in admission order (by request id)."""
        reqs = {s.request.id: s.request for s in self.slots if s is not None}
        return [reqs[k] for k in sorted(reqs)]

    def decoding(self) -> list[_Seq]:
        return [s for s in self.slots if s is not None and s.request.decoding]

    def all_requests(self) -> list[Request]:
        with self.cond:
            return list(self.waiting) + self.running()

    # -- one step's plan ---------------------------------------------------------------------
    def drop(self) -> list[Request]:
        """Cancelled requests lose their slots here; returns the timed-out ones, the engine's to
        end (what they generated is sent first)."""
        now = time.perf_counter()
        expired = []
        for req in self.all_requests():
            if req.cancelled:
                self.release(req, cancelled=True)
            elif now >= req.deadline:
                expired.append(req)
        return expired

    def schedule(self, make_seq: Callable[[Request, int, int], _Seq]) -> list[_Chunk]:
        """Admits waiting requests into free slots and picks the prompt chunks to prefill
        this step."""
        for req in self._admit(make_seq):
            req.admitted_at = self.rounds
        self.rounds += 1
        return self._plan_prefill(bool(self.decoding()))

    def _admit(self, make_seq: Callable[[Request, int, int], _Seq]) -> list[Request]:
        """Moves waiting requests into free slots, FIFO; returns the admitted ones. Of the
        requests admitted together, the shortest prompt takes the lowest free slots: they are
        prefilled shortest first, and neighbouring slots go through one forward."""
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
        self.reset_rows([s.slot for r in admitted for s in r.seqs])
        return admitted

    def _plan_prefill(self, decoding: bool) -> list[_Chunk]:
        """The prompt pieces to prefill this step, within prefill_budget tokens while others
        decode or wait for their first token (a lone prompt with nothing decoding goes whole).
        Requests admitted at an earlier step go first, so none waits behind later arrivals;
        among those admitted together (a burst), the shortest remaining prompt goes first:
        shortest job first minimises the mean wait, and the short prompts' first tokens no
        longer wait for the long prompts' prefill."""
        pending = sorted((r for r in self.running() if not r.decoding),
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

    # -- freeing -----------------------------------------------------------------------------
    def release(self, req: Request, cancelled: bool = False) -> None:
        """Takes every slot of req back (or its place in the queue)."""
        with self.cond:
            if req in self.waiting:
                self.waiting.remove(req)
            freed = [s.slot for s in req.seqs if self.slots[s.slot] is s]
            for slot in freed:
                self.slots[slot] = None
            self.cancelled += cancelled  # counted as the slots go: stats() sees both at once
        self.reset_rows(freed)

    def finish(self, seq: _Seq) -> None:
        """A sequence ended: its slot is free for the next request."""
        with self.cond:
            mine = seq.slot >= 0 and self.slots[seq.slot] is seq
            if mine:
                self.slots[seq.slot] = None
        if mine:
            self.reset_rows([seq.slot])

    def take_all(self) -> list[Request]:
        """Empties the queue and every slot; returns the requests that were there."""
        with self.cond:
            reqs = {s.request.id: s.request for s in self.slots if s is not None}
            reqs.update({r.id: r for r in self.waiting})
            self.waiting.clear()
            self.slots = [None] * self.max_batch
        self.reset_rows(list(range(self.max_batch)))
        return list(reqs.values())


# -- running the model -------------------------------------------------------------------------
@dataclass
class PrefillOutput:
    """What a prefill returns: the next-token logits [V] of every request whose prompt is now
    complete, and the prompt logprobs of the chunks whose requests asked for them."""
    first: dict = field(default_factory=dict)            # request id -> logits [V]
    prompt_logprobs: dict = field(default_factory=dict)  # request id -> [TokenLogprob or None]


class ModelRunner:
    """Owns the KV cache; runs prefill chunks and decode rows through the model, and samples."""

    def __init__(self, model, max_batch: int):
        self.model = model
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.max_batch = max_batch
        self.cache = None
        self.max_prefill_rows = 0  # the most prompts prefilled by one forward so far

    def start(self) -> None:
        if self.cache is None:
            self.cache = self.model.new_kv_cache(self.max_batch, self.model.config.block_size)

    def reset(self, slots: Sequence[int]) -> None:
        if self.cache is not None:
            for slot in slots:
                self.cache.reset(slot)

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, chunks: list[_Chunk]) -> PrefillOutput:
        """Runs the chunks (each into its slot, at that slot's length). Request state is not
        touched: the engine advances each request by its chunk."""
        out = PrefillOutput()
        for run in self._runs(chunks):
            self.max_prefill_rows = max(self.max_prefill_rows, len(run))
            logits = self._forward_run(run)
            for r, c in enumerate(run):
                req, n = c.request, c.end - c.start
                if req.params.prompt_logprobs:
                    out.prompt_logprobs[req.id] = self._prompt_logprobs(req, c, logits[r, :n])
                if c.end == len(req.prompt_ids):
                    out.first[req.id] = logits[r, n - 1] if logits.dim() == 3 else logits[r]
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
            return self.model.forward_cached(ids, self.cache, rows=c.slot, all_logits=all_logits)
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

    @staticmethod
    def _prompt_logprobs(req: Request, c: _Chunk, logits: torch.Tensor) -> list:
        # logits[i] predicts prompt[c.start + i + 1]; the last position of the last chunk
        # predicts the first generated token instead.
        entries = [None] if c.start == 0 else []
        targets = req.prompt_ids[c.start + 1:c.end + 1]
        if targets:
            entries += token_logprobs(logits[:len(targets)], targets, req.params.logprobs)
        return entries

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
        if all(p.greedy for p in ps):
            nxt = logits.argmax(dim=-1)
        else:
            dev = logits.device

            def per_row(values, dtype=torch.float32):
                return torch.tensor(values, device=dev, dtype=dtype)
            # top_p 1 (off) goes in as inf: a cumulative sum can reach 1.0 before the last token.
            nxt = sampling.sample(
                logits, temperature=per_row([p.temperature for p in ps]),
                top_k=per_row([p.top_k for p in ps], torch.long),
                top_p=per_row([p.top_p if p.top_p < 1 else math.inf for p in ps]),
                min_p=per_row([p.min_p for p in ps]), generator=[s.generator for s in seqs])
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
        self.runner = ModelRunner(model, max_batch)
        # Prompt tokens prefilled between two decode steps while sequences are decoding: a
        # burst of new requests then delays the running ones by a bounded time per step.
        self.scheduler = Scheduler(max_batch, max_queue, prefill_budget, self.runner.reset)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.block_size = model.config.block_size
        self.eos_id = tokenizer.eot_id if eos_id is None else eos_id
        self.device = model.device
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steps = 0            # decode steps run (for stats and tests)
        self.max_active_seen = 0  # the largest decode batch so far
        self.finished = 0         # requests that ended normally

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
        """Raises ValueError if the request can never run on this model (the server maps it to
        HTTP 400); the settings themselves were checked by SamplingParams."""
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: it needs at least one token")
        if len(prompt_ids) + params.max_tokens > self.block_size:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds the model's context of "
                             f"{self.block_size} tokens")
        if params.n > self.max_batch:
            raise ValueError(f"n must be between 1 and max_batch={self.max_batch}, got {params.n}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(int(t) >= vocab for t in params.logit_bias):
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
                    "requests_finished": self.finished, "requests_cancelled": s.cancelled,
                    "max_prefill_batch": self.runner.max_prefill_rows}

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        cond = self.scheduler.cond
        with torch.inference_mode():
            while True:
                with cond:
                    while self._running and self.scheduler.idle():
                        cond.wait(timeout=1.0)
                    if not self._running:
                        break
                try:
                    self.step()
                except Exception as e:  # a bug must not take the server down: fail the batch
                    self._fail_all(f"engine error: {type(e).__name__}: {e}")
            self._fail_all("the server is shutting down")

    @torch.inference_mode()
    def step(self) -> None:
        """One step: schedule (drop, admit, plan the prefill), execute the prefill and update;
        then one decode step for every decoding sequence, and update."""
        self.runner.start()
        for req in self.scheduler.drop():
            self._time_out(req)
        chunks = self.scheduler.schedule(self._new_seq)
        self._prefilled(chunks, self.runner.prefill(chunks))
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
        out = SequenceOutput(self.tokenizer, p, self.eos_id, context=req.prompt_ids[-4:])
        return _Seq(req, index, sampling.make_generator(seed, self.device), out, slot=slot,
                    counts=self.runner.new_counts() if p.penalized else None)

    # -- update: tokens and prompts into events ---------------------------------------------
    def _prefilled(self, chunks: list[_Chunk], out: PrefillOutput) -> None:
        """Advances each request by its chunk; a request whose prompt is complete gets its
        other slots' prompt K/V and the first token of every choice."""
        seqs, rows = [], []
        for c in chunks:
            req = c.request
            req.prefilled = c.end
            req.prompt_logprobs += out.prompt_logprobs.get(req.id, [])
            if not req.decoding:
                continue
            self.runner.copy_prompt(req)
            if req.params.prompt_logprobs:
                self._emit(req, Event("prompt", logprobs=tuple(req.prompt_logprobs)))
            if req.params.max_tokens == 0:  # echo only: scored, nothing generated
                for seq in req.seqs:
                    self._finish(seq, "length")
                continue
            seqs += req.seqs
            rows += [out.first[req.id]] * len(req.seqs)
        if seqs:
            self._sample_and_emit(seqs, torch.stack(rows))

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        tokens, lps = self.runner.sample(seqs, logits)
        for seq, tok, lp in zip(seqs, tokens, lps):
            seq.last_token = tok
            if seq.counts is not None:
                seq.counts[tok] += 1
            text = seq.out.add(tok)
            self._emit(seq.request, Event("text", seq.index, text, (tok,),
                                          logprobs=(lp,) if lp else ()))
            if seq.done:
                self._finish(seq, seq.out.finish_reason)

    def _time_out(self, req: Request) -> None:
        if not any(s.out.num_tokens for s in req.seqs):
            self.scheduler.release(req)
            self._emit(req, Event("error", text=f"the request did not finish within its timeout "
                                                 f"of {req.params.timeout} s", status=504))
            return
        for seq in req.seqs:
            if not seq.done:
                self._emit(req, Event("text", seq.index, seq.out.cut()))
                self._finish(seq, "length")

    def _finish(self, seq: _Seq, reason: str) -> None:
        req = seq.request
        if not seq.done:
            seq.out.finish_reason = reason  # ended from outside (echo only: nothing generated)
        self.scheduler.finish(seq)
        self._emit(req, Event("finish", seq.index, finish_reason=reason,
                              completion_tokens=seq.out.num_tokens))
        if all(s.done for s in req.seqs):
            self.finished += 1
            self._emit(req, Event("done", prompt_tokens=len(req.prompt_ids),
                                  completion_tokens=sum(s.out.num_tokens for s in req.seqs)))

    def _fail_all(self, message: str) -> None:
        for r in self.scheduler.take_all():
            self._emit(r, Event("error", text=message))

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.callback(ev)
        except Exception:  # a broken consumer only loses its own events
            req.cancelled = True
