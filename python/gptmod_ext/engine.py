"""Continuous batching: one thread owns the model and serves many requests at once.

The engine knows nothing about HTTP. A caller submits token ids with sampling settings and a
callback; the engine thread calls it back with text deltas and finish events.

Design
  Slots. One KVCache of `max_batch` rows x block_size is allocated at start; each row is a
  slot that holds one sequence. A request with n choices takes n slots.
  Steps. Each loop iteration (1) drops cancelled requests and frees their slots, (2) admits
  waiting requests, first come first served, while enough slots are free (and, while others
  are decoding, until `prefill_budget` prompt tokens were prefilled): one forward_cached
  over the whole prompt into one free slot (prefill), copied into the request's other slots
  when n > 1, and the first token of every choice is sampled from those logits; (3) runs ONE
  decode step for every active slot: forward_cached over the contiguous slot range
  0..highest_active with one token per row.
  Ragged decode. Every row sits at its own length (cache.seqlens); decode_attention (ext
  backend) or its reference (torch backend) attends each row to its own rows only. Free slots
  inside the range ride along with `lengths` = 0: they write one throw-away K/V row at
  position 0, their length does not advance and their logits are ignored. Free slots are
  handed out lowest first, so the range stays dense without moving K/V around (compaction
  would copy L x 2 x S x Hkv x D per move; the holes cost one row each of a cheap step).
  Sampling. Each sequence has its own torch.Generator (seed + choice index when a seed is
  given), and per-row temperature/top-k/top-p/min-p go to sampling.sample as [B] tensors, so
  a seeded request draws the same tokens whatever else shares the batch.
  Text. streaming.TextStreamer (shared with the sampler CLI) turns each sequence's tokens into
  text: a character cut across tokens is held until complete, stop strings are matched on the
  text and the longest tail that could still begin one is held back, so no part of a stop
  string is ever sent. A sequence cut by max_tokens drops a half character at its end.
  Queue. At most `max_queue` requests wait for slots; submit() raises QueueFull beyond that.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import sampling
from .streaming import TextStreamer


class QueueFull(Exception):
    """Every slot is busy and max_queue requests already wait."""


@dataclass
class SamplingParams:
    """Per-request settings; 'off' values: top_k 0, top_p 1.0, min_p 0.0. temperature 0 = greedy."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    stop: Sequence[str] = ()
    stop_at_eos: bool = True


@dataclass
class Event:
    """What the engine reports. kind:
      'text'    choice `index` produced `text` (may be '' when bytes are held) from `token_ids`
      'finish'  choice `index` ended with finish_reason 'stop' or 'length'
      'done'    every choice ended; prompt_tokens / completion_tokens hold the usage
      'error'   the request failed (`text` says why); no other event follows
    """
    kind: str
    index: int = 0
    text: str = ""
    token_ids: tuple = ()
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


@dataclass(eq=False)
class Request:
    prompt_ids: list
    params: SamplingParams
    callback: Callable[[Event], None]
    id: int = 0
    seqs: list = field(default_factory=list)
    cancelled: bool = False
    submitted_at: float = 0.0

    def cancel(self) -> None:
        """Stops the request at the engine's next step and frees its slots (thread safe)."""
        self.cancelled = True


class Engine:
    """The continuous-batching loop around one model (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 eos_id: Optional[int] = None, prefill_budget: int = 512):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.block_size = model.config.block_size
        self.eos_id = tokenizer.eot_id if eos_id is None else eos_id
        # Prompt tokens prefilled between two decode steps while sequences are decoding: a
        # burst of new requests then delays the running ones by a bounded time per step.
        self.prefill_budget = prefill_budget
        self.device = model.device
        self._cache = None
        self._slots: list[Optional[_Seq]] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steps = 0            # decode steps run (for stats and tests)
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
        with self._cond:
            self._running = False
            self._cond.notify_all()
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
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.block_size:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) exceeds the model's context of "
                             f"{self.block_size} tokens")
        if not 1 <= params.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and max_batch={self.max_batch}, got {params.n}")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               callback: Callable[[Event], None]) -> Request:
        """Queues a request; callback(Event) is called from the engine thread.
        Raises ValueError (a bad request) or QueueFull."""
        self.check(prompt_ids, params)
        req = Request(list(map(int, prompt_ids)), params, callback, next(self._ids),
                      submitted_at=time.perf_counter())
        with self._cond:
            if self._would_wait(req) > self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {self.max_queue} "
                                f"requests are already waiting")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def _would_wait(self, new: Request) -> int:
        # How many requests would wait for slots if `new` joined: admit FIFO into free slots.
        free = sum(s is None for s in self._slots)
        waiting = 0
        for r in itertools.chain(self._waiting, (new,)):
            if waiting == 0 and r.params.n <= free:
                free -= r.params.n
            else:
                waiting += 1
        return waiting

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
        with self._cond:
            active = sum(s is not None for s in self._slots)
            return {"max_batch": self.max_batch, "max_queue": self.max_queue,
                    "active_slots": active, "waiting_requests": len(self._waiting),
                    "decode_steps": self.steps, "max_active_seen": self.max_active_seen,
                    "requests_finished": self.finished, "requests_cancelled": self.cancelled}

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            self._cache = self.model.new_kv_cache(self.max_batch, self.block_size)
            while True:
                with self._cond:
                    while self._running and not self._waiting and not any(self._slots):
                        self._cond.wait(timeout=1.0)
                    if not self._running:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if any(self._slots):
                        self._decode_step()
                except Exception as e:  # a bug must not take the server down: fail the batch
                    self._fail_all(f"engine error: {type(e).__name__}: {e}")
            self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            reqs = {id(s.request): s.request for s in self._slots if s is not None}
            reqs.update({id(r): r for r in self._waiting})
            self._waiting.clear()
            for i in range(self.max_batch):
                self._slots[i] = None
        if self._cache is not None:
            self._cache.reset()
        for r in reqs.values():
            self._emit(r, Event("error", text=message))

    def _emit(self, req: Request, ev: Event) -> None:
        try:
            req.callback(ev)
        except Exception:  # a broken consumer only loses its own events
            req.cancelled = True

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = {id(r) for r in self._waiting if r.cancelled}
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for i, s in enumerate(self._slots):
                if s is not None and s.request.cancelled:
                    dropped.add(id(s.request))
                    self._free(i)
            self.cancelled += len(dropped)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._cache.reset(slot)

    def _admit(self) -> None:
        decoding = any(self._slots)
        spent = 0
        while True:
            with self._cond:
                free = [i for i, s in enumerate(self._slots) if s is None]
                if not self._waiting or self._waiting[0].params.n > len(free):
                    return
                if decoding and spent >= self.prefill_budget:
                    return  # the rest join after the next decode step
                spent += len(self._waiting[0].prompt_ids)
                req = self._waiting.popleft()
                slots = free[:req.params.n]  # lowest first: keeps the decode range dense
                p = req.params
                for i, slot in enumerate(slots):
                    seed = None if p.seed is None else p.seed + i
                    seq = _Seq(req, i, sampling.make_generator(seed, self.device),
                               TextStreamer(self.tokenizer, p.stop), slot=slot)
                    req.seqs.append(seq)
                    self._slots[slot] = seq
            self._prefill(req)

    def _prefill(self, req: Request) -> None:
        cache, T = self._cache, len(req.prompt_ids)
        first = req.seqs[0].slot
        idx = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model.forward_cached(idx, cache, rows=first)  # [1, V]
        for seq in req.seqs[1:]:  # n > 1: the same prompt K/V, computed once
            cache.buffer[:, :, seq.slot, :T] = cache.buffer[:, :, first, :T]
            cache.seqlens[seq.slot] = T
        self._sample_and_emit(req.seqs, logits.expand(len(req.seqs), -1))

    def _decode_step(self) -> None:
        active = [s for s in self._slots if s is not None]
        hi = max(s.slot for s in active) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        lengths = torch.zeros(hi, dtype=torch.long)
        for s in active:
            tokens[s.slot, 0] = s.last_token
            lengths[s.slot] = 1
        logits = self.model.forward_cached(tokens.to(self.device), self._cache,
                                           rows=slice(0, hi), lengths=lengths.to(self.device))
        rows = torch.tensor([s.slot for s in active], device=self.device)
        self.steps += 1
        self.max_active_seen = max(self.max_active_seen, len(active))
        self._sample_and_emit(active, logits[rows])

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        ps = [s.request.params for s in seqs]
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
        for seq, tok in zip(seqs, nxt.tolist()):
            self._advance(seq, tok)

    def _is_text(self, tok: int) -> bool:
        # Special tokens (<|endoftext|> with ignore_eos) have no text, and an id the tokenizer
        # lacks (a model vocabulary larger than its tokenizer's) must not fail the whole batch.
        return 0 <= tok < self.tokenizer.vocab_size and not self.tokenizer.is_special(tok)

    def _advance(self, seq: _Seq, tok: int) -> None:
        req, p = seq.request, seq.request.params
        seq.n_generated += 1
        seq.last_token = tok
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
        self._emit(req, Event("text", seq.index, text, (tok,)))
        if reason is None:
            return
        seq.done = True
        with self._cond:
            if seq.slot >= 0 and self._slots[seq.slot] is seq:
                self._free(seq.slot)
        self._emit(req, Event("finish", seq.index, finish_reason=reason,
                              completion_tokens=seq.n_generated))
        if all(s.done for s in req.seqs):
            self.finished += 1
            self._emit(req, Event("done", prompt_tokens=len(req.prompt_ids),
                                  completion_tokens=sum(s.n_generated for s in req.seqs)))
