"""What each modern piece buys: `python -m gptmod_ext.ablate` trains a grid of architectures on
the same data, with the same budget and seeds, and writes a report.

The default grid walks from GPT-2 to the modern model one change at a time, cumulatively:
gpt2, +rope, +rmsnorm, +swiglu, +no-bias, +gqa, +untie, modern (= +softcap). Other lists are
given with --variants, in a small grammar (parse_variant): `gpt2` and `modern`, `+X` (the
default grid's row that ends with change X), and `gpt2+X+Y...` / `modern-X-Y...` (one end of
the walk with changes X, Y switched on, or off).

What is held equal, and how (the rules the report states):
- Tokens: every run trains --max-iters steps of --batch-size x block_size tokens, from the
  same data, with the trainer's own schedule and options (--train-args for the rest).
- Seeds: seed s is the same --seed for every variant, so the runs of one seed draw the same
  training windows in the same order (the trainer's sampler is seeded by it), and differences
  between variants are paired by seed.
- Widths: n_layer, n_embd, n_head and head_dim are the same everywhere; each variant's
  ffn_hidden (a multiple of 8) is the one that brings its non-embedding parameter count (the
  matmul weights of the blocks: the compute per token) closest to gpt2's, which gets GPT-2's
  4 x n_embd back from the same rule. The embedding tables are not matched: RoPE drops the
  position table, and +untie adds an lm_head of vocab x n_embd, parameters that cost no
  compute (the tied model multiplies by the same matrix). Both counts are reported.
- Tying is a step of the walk (+untie), not held fixed: GPT-2 ties and the modern model (as
  Llama) does not, and `gpt2` and `modern` are those two models.

Every run is `python -m gptmod_ext.train --out-dir <out>/runs/<variant>/seed<s> ...` in a
subprocess of its own (--jobs at a time, --threads torch threads each), so a run directory is
exactly what the trainer writes and samples, serves and exports like any other. Its console
output goes to <out>/logs/. A grid started again skips finished runs and resumes unfinished
ones (--resume, from their last checkpoint); Ctrl-C stops every run at its next step with a
checkpoint. The report (results.json, results.md, curves.png) is read back from the run
directories alone, and rewritten as each run ends.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import prepare as prepare_mod
from . import train as train_mod
from .common import Parser, UserError, atomic_write, first_line, run_cli

PROG = "python -m gptmod_ext.ablate"
FORMAT = "gptmod_ext.ablate/1"
GRID_FILE = "grid.json"
RESULTS_JSON, RESULTS_MD, CURVES_PNG = "results.json", "results.md", "curves.png"
RUNS, LOGS = "runs", "logs"
DEFAULT_SHAPE = "n_layer=4,n_embd=128,n_head=4,n_kv_head=2,block_size=128,logit_softcap=15"
FFN_MULTIPLE = 8
# GPTConfig fields the variants decide; --model-args may set every other one.
SWITCHED = ("pos_emb", "norm", "mlp", "bias", "tie_embeddings", "ffn_hidden", "vocab_size")
# Trainer options the grid sets for each run.
OWNED = ("--out-dir", "--data", "--preset", "--model-args", "--seed", "--max-iters",
         "--batch-size", "--block-size", "--eval-interval", "--resume", "--stop-at", "--threads",
         "--no-progress")


class AblateError(UserError):
    """A bad option or an out-dir that cannot be used; one line, exit status 1."""


# -- variants ---------------------------------------------------------------------------------
# The changes from GPT-2 to the modern model, in the order the default grid adds them.
COMPONENTS = {
    "rope": "learned absolute positions -> rotary embeddings (RoPE)",
    "rmsnorm": "LayerNorm -> RMSNorm",
    "swiglu": "GELU MLP -> SwiGLU MLP (width matched)",
    "no-bias": "biases in every Linear and LayerNorm -> none",
    "gqa": "multi-head attention -> grouped-query (fewer KV heads)",
    "untie": "lm_head tied to the token table -> a matrix of its own",
    "softcap": "raw logits -> soft-capped logits, cap * tanh(z / cap)",
}
GPT2_CHANGE = "GPT-2: learned positions, LayerNorm, GELU, biases, MHA, tied embeddings"
MODERN_CHANGE = "every change: RoPE, RMSNorm, SwiGLU, no biases, GQA, untied, soft-cap"


@dataclass(frozen=True)
class Variant:
    name: str
    on: frozenset      # the COMPONENTS switched on (none: gpt2, all: modern)
    change: str        # one line for --list and the table


def arch_fields(on: frozenset, shape: dict) -> dict:
    """The GPTConfig fields a set of components decides (shape gives n_kv_head and the cap)."""
    return {"pos_emb": "rope" if "rope" in on else "learned",
            "norm": "rmsnorm" if "rmsnorm" in on else "layernorm",
            "mlp": "swiglu" if "swiglu" in on else "gelu",
            "bias": "no-bias" not in on,
            "n_kv_head": shape["n_kv_head"] if "gqa" in on else shape["n_head"],
            "tie_embeddings": "untie" not in on,
            "logit_softcap": shape["logit_softcap"] if "softcap" in on else 0.0}


def default_grid() -> list[Variant]:
    """gpt2, then each change added to the row before; the last row is the modern model."""
    rows, on = [Variant("gpt2", frozenset(), GPT2_CHANGE)], frozenset()
    names = list(COMPONENTS)
    for i, c in enumerate(names):
        on = on | {c}
        last = i == len(names) - 1
        rows.append(Variant("modern" if last else f"+{c}", on,
                            COMPONENTS[c] + (" (all changes: the modern model)" if last else "")))
    return rows


_TERM = "|".join(sorted(map(re.escape, COMPONENTS), key=len, reverse=True))
_NAME = re.compile(rf"(gpt2|modern)?((?:[+-](?:{_TERM}))*)")


def known_variants() -> str:
    return (f"known variants: {', '.join(v.name for v in default_grid())}; or gpt2+X... / "
            f"modern-X... with X one of {', '.join(COMPONENTS)}")


def parse_variant(name: str) -> Variant:
    """A Variant from its name (see the module doc); AblateError lists the known names."""
    if name == "modern":  # outside the default grid, its row is every change at once
        return Variant(name, frozenset(COMPONENTS), MODERN_CHANGE)
    for v in default_grid():
        if v.name == name:
            return v
    m = _NAME.fullmatch(name)
    terms = re.findall(rf"([+-])({_TERM})", m.group(2)) if m else []
    base = m.group(1) if m else None
    if not terms or base is None and terms[0][0] == "-" or base is None and len(terms) > 1:
        raise AblateError(f"unknown variant {name!r}; {known_variants()}")
    if base is None:  # +X: the default grid's row that adds X (the last one is named modern)
        row = next(v for v in default_grid() if terms[0][1] in v.on)
        return Variant(name, row.on, row.change)
    on = set() if base == "gpt2" else set(COMPONENTS)
    for sign, c in terms:
        if (sign == "+") == (c in on):
            said = f"has {c} already" if c in on else f"has no {c} to take away"
            raise AblateError(f"variant {name!r}: {base} {said}; {known_variants()}")
        on.symmetric_difference_update({c})
    words = ", ".join(c for _, c in terms)
    change = f"{base} {'with' if base == 'gpt2' else 'without'}: {words}"
    return Variant(name, frozenset(on), change)


def parse_variants(text: str | None) -> list[Variant]:
    if text is None:
        return default_grid()
    variants = [parse_variant(n) for n in filter(None, (s.strip() for s in text.split(",")))]
    if not variants:
        raise AblateError(f"--variants is empty; {known_variants()}")
    seen: dict[frozenset, str] = {}
    for v in variants:
        if v.on in seen:
            raise AblateError(f"--variants: {v.name!r} is the same model as {seen[v.on]!r}")
        seen[v.on] = v.name
    return variants


# -- widths: non-embedding parameters matched to gpt2's ---------------------------------------
def _non_embedding(fields: dict) -> int:
    import torch

    from .model import GPT, GPTConfig

    with torch.device("meta"):  # counts without allocating
        return GPT(GPTConfig(**fields)).num_params(exclude_embeddings=True)


def model_fields(variant: Variant, shape: dict) -> dict:
    """The variant's GPTConfig overrides: the shared sizes, its switches, its matched
    ffn_hidden (the multiple of FFN_MULTIPLE whose non-embedding count is nearest gpt2's)."""
    sizes = {k: v for k, v in shape.items() if k not in ("n_kv_head", "logit_softcap")}
    fields = {**sizes, **arch_fields(variant.on, shape), "vocab_size": 64}
    gpt2 = {**sizes, **arch_fields(frozenset(), shape), "vocab_size": 64}
    target = _non_embedding({**gpt2, "ffn_hidden": 4 * shape["n_embd"]})
    m = FFN_MULTIPLE
    a, b = _non_embedding({**fields, "ffn_hidden": m}), _non_embedding({**fields, "ffn_hidden": 2 * m})
    units = max(1, round((target - a) / (b - a)) + 1)  # the count is linear in ffn_hidden
    fields["ffn_hidden"] = m * units
    del fields["vocab_size"]  # the tokenizer's, set by the trainer
    return fields


def parse_shape(text: str) -> dict:
    """--model-args: the sizes every variant shares, with n_kv_head (the GQA rows') and
    logit_softcap (the soft-capped rows') defaulted."""
    try:
        given = train_mod.parse_model_args(text)
    except train_mod.TrainError as e:
        raise AblateError(str(e)) from None
    fixed = sorted(set(given) & set(SWITCHED))
    if fixed:
        raise AblateError(f"--model-args: {', '.join(fixed)} are what the variants decide; "
                          "set sizes (n_layer, n_embd, n_head, block_size, ...), n_kv_head "
                          "and logit_softcap")
    shape = {**train_mod.parse_model_args(DEFAULT_SHAPE), **given}
    if "n_kv_head" not in given and "n_head" in given:
        shape["n_kv_head"] = max(1, shape["n_head"] // 2)
    return shape


def model_args_text(fields: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in fields.items())


# -- the grid and its runs --------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """What every run shares; key() is what makes two grids the same grid."""
    out_dir: Path
    data: str
    shape: dict
    max_iters: int
    batch_size: int
    eval_interval: int
    train_args: tuple

    @property
    def tokens_per_step(self) -> int:
        accum = train_mod.parse_args(list(self.train_args)).grad_accum or 1
        return self.batch_size * self.shape["block_size"] * accum

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        del d["out_dir"]
        return {**d, "train_args": list(self.train_args)}


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int
    fields: dict       # its GPTConfig overrides
    run_dir: Path
    log: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def variant_fields(variants: list[Variant], shape: dict) -> dict[str, dict]:
    """Each variant's GPTConfig overrides; AblateError for a model the sizes cannot make."""
    out, kv, heads = {}, shape["n_kv_head"], shape["n_head"]
    for v in variants:
        if "gqa" in v.on and (kv is None or kv >= heads):
            raise AblateError(f"variant {v.name} has GQA, but --model-args n_kv_head={kv} is not "
                              f"fewer than n_head={heads}")
        try:
            out[v.name] = model_fields(v, shape)
        except (ValueError, TypeError) as e:
            raise AblateError(f"variant {v.name}: {first_line(e)}") from None
    return out


def plan(grid: Grid, variants: list[Variant], fields: dict[str, dict],
         seeds: list[int]) -> list[RunSpec]:
    return [RunSpec(v, s, fields[v.name], grid.out_dir / RUNS / v.name / f"seed{s}",
                    grid.out_dir / LOGS / f"{v.name}-seed{s}.log")
            for v in variants for s in seeds]


def run_state(run_dir: Path, max_iters: int) -> str:
    """'done' (trained to max_iters and finally evaluated), 'resume' (a checkpoint before
    max_iters) or 'new'."""
    rows = read_rows(run_dir / train_mod.METRICS_FILE)
    if any(r.get("step") == max_iters and "final_val_loss" in r for r in rows):
        return "done"
    try:
        step = json.loads((run_dir / "config.json").read_text()).get("step")
    except (OSError, ValueError):
        return "new"
    if isinstance(step, int) and step < max_iters and (run_dir / "train_state.pt").is_file():
        return "resume"
    return "new"


def train_argv(spec: RunSpec, grid: Grid, threads: int, resume: bool,
               stop_at: int | None) -> list[str]:
    preset = "modern" if spec.variant.on == frozenset(COMPONENTS) else "gpt2"
    argv = ["--out-dir", str(spec.run_dir), "--data", grid.data, "--preset", preset,
            "--model-args", model_args_text(spec.fields), "--seed", str(spec.seed),
            "--max-iters", str(grid.max_iters), "--batch-size", str(grid.batch_size),
            "--eval-interval", str(grid.eval_interval), "--threads", str(threads),
            "--no-progress", *grid.train_args]
    if resume:
        argv.append("--resume")
    if stop_at is not None:
        argv += ["--stop-at", str(stop_at)]
    return argv


def open_grid(grid: Grid, force: bool) -> None:
    """Claims out_dir for this grid: refuses another grid's (or anything else's) unless
    --force, which removes the other grid's runs and report."""
    out, path = grid.out_dir, grid.out_dir / GRID_FILE
    mine = {"format": FORMAT, "grid": grid.key()}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old == mine:
            return
        if not force:
            raise AblateError(f"{out} holds another grid (other data, sizes or budget: see "
                              f"{path}); use another --out-dir, or --force to replace it")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise AblateError(f"{out} is not empty and holds no grid; use another --out-dir, or "
                          "--force to write the grid into it")
    for name in (RUNS, LOGS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (RESULTS_JSON, RESULTS_MD, CURVES_PNG):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(mine, indent=1) + "\n")


# -- running ----------------------------------------------------------------------------------
_STEP = re.compile(r"^step (\d+): loss")


class Executor:
    """Runs the trainer in subprocesses, `jobs` at a time, each in a session of its own so
    that Ctrl-C reaches them once, from here (the trainer's second Ctrl-C aborts unsaved)."""

    def __init__(self, jobs: int, bar):
        self.jobs, self.bar = jobs, bar
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, spec: RunSpec, argv: list[str], start_step: int) -> tuple[int, str]:
        """(exit status, the run's last error line) of one trainer run; output to its log."""
        try:
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            with open(spec.log, "a") as log:
                log.write(f"$ {train_mod.PROG} {shlex.join(argv)}\n")
                log.flush()
                return self._train(spec, argv, start_step, log)
        except OSError as e:
            return 1, f"{e.filename}: {e.strerror}" if e.filename else first_line(e)

    def _train(self, spec: RunSpec, argv: list[str], step: int, log) -> tuple[int, str]:
        env = dict(os.environ, OMP_NUM_THREADS=argv[argv.index("--threads") + 1])
        # The package this module came from, whatever the working directory.
        pkg_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
        with self.lock:
            if self.stopping:
                return 130, "not started (interrupted)"
            proc = subprocess.Popen([sys.executable, "-m", "gptmod_ext.train", *argv],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, text=True,
                                    errors="replace", start_new_session=True)
            self.live.add(proc)
        error = ""
        for line in proc.stdout:
            log.write(line)
            if ": error: " in line:
                error = line.split(": error: ", 1)[1].strip()
            m = _STEP.match(line)
            if m and self.bar is not None:
                with self.lock:
                    self.bar.update(int(m.group(1)) - step)
                step = int(m.group(1))
        rc = proc.wait()
        with self.lock:
            self.live.discard(proc)
        return rc, error or (f"exit status {rc}" if rc else "")

    def interrupt(self) -> None:
        """Asks every live run to stop at its next step (with a checkpoint), starts no more."""
        with self.lock:
            self.stopping = True
            for p in self.live:
                p.send_signal(signal.SIGINT)


def run_grid(specs: list[RunSpec], grid: Grid, args, on_done) -> int:
    """Trains every run that is not done; on_done(spec, rc, error) as each one ends. The
    number of runs that failed; KeyboardInterrupt after the live runs have stopped."""
    todo = [(s, run_state(s.run_dir, grid.max_iters)) for s in specs]
    todo = [(s, st) for s, st in todo if st != "done"]
    if not todo:
        return 0
    starts = {s.run_dir: (_checkpoint_step(s.run_dir) if st == "resume" else 0) for s, st in todo}
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        end = grid.max_iters if args.stop_at is None else min(args.stop_at, grid.max_iters)
        bar = tqdm(total=len(todo) * end, initial=sum(starts.values()),
                   unit="step", desc=PROG.split()[-1], dynamic_ncols=True, file=sys.stderr)
    ex, failed = Executor(args.jobs, bar), 0
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    futures = {pool.submit(ex.run, s, train_argv(s, grid, args.threads, st == "resume",
                                                 args.stop_at), starts[s.run_dir]): s
               for s, st in todo}
    try:
        for fut in as_completed(futures):
            spec = futures[fut]
            rc, error = fut.result()
            failed += rc not in (0, 130)
            on_done(spec, rc, error)
    except KeyboardInterrupt:
        ex.interrupt()
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:  # a second Ctrl-C: the runs abort without a checkpoint
            ex.interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return failed


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "config.json").read_text()).get("step") or 0)
    except (OSError, ValueError):
        return 0


# -- the report -------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """A run's metrics.jsonl rows (none when it cannot be read)."""
    try:
        return train_mod.read_metrics(path, math.inf)
    except OSError:
        return []


def collect(spec: RunSpec, grid: Grid, error: str = "") -> dict:
    """One run's record, read from its run directory alone (metrics.jsonl, config.json)."""
    state = run_state(spec.run_dir, grid.max_iters)
    rec = {"variant": spec.variant.name, "seed": spec.seed,
           "run_dir": str(spec.run_dir.relative_to(grid.out_dir)),
           "status": "done" if state == "done" else ("failed" if error else "unfinished")}
    rows = read_rows(spec.run_dir / train_mod.METRICS_FILE)
    try:
        config = json.loads((spec.run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if error and state != "done":
        rec["error"] = error
    if config is None:
        return rec
    t = config["train"]
    per_step = t["batch_size"] * t["block_size"] * t["grad_accum"]
    final = next((r for r in reversed(rows) if "final_val_loss" in r), {})
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    times = [r["time"] for r in rows if "time" in r]
    rec.update(
        step=config.get("step"), tokens=(config.get("step") or 0) * per_step,
        final_val_loss=final.get("final_val_loss"), final_val_bpb=final.get("final_val_bpb"),
        final_val_tokens=final.get("final_val_tokens"),
        params=next((r["params"] for r in rows if "params" in r), None),
        params_non_embedding=_non_embedding(config["model"]),
        tokens_per_s=statistics.median(speeds) if speeds else None,
        train_s=(max(times) - min(times)) if len(times) > 1 else None,
        dtype=t["dtype"], device=t["device"], backend=t["backend"],
        curve=[[r["step"] * per_step, r["val_loss"]] for r in rows if "val_loss" in r])
    return rec


# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def paired_delta(a: list[dict], b: list[dict]) -> dict | None:
    """a - b over the seeds both finished: mean and std of the per-seed differences, and
    whether the mean exceeds the seed spread (a paired t-test at 95%)."""
    la = {r["seed"]: r["final_val_loss"] for r in a}
    lb = {r["seed"]: r["final_val_loss"] for r in b}
    d = [la[s] - lb[s] for s in sorted(set(la) & set(lb))]
    if not d:
        return None
    out = {"mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else None,
           "n": len(d), "significant": None}
    if len(d) > 1:
        df = len(d) - 1
        t = _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96
        out["significant"] = abs(out["mean"]) > t * out["std"] / math.sqrt(len(d))
    return out


def summarize(variants: list[Variant], records: list[dict]) -> list[dict]:
    done = {v.name: [r for r in records if r["variant"] == v.name and r["status"] == "done"]
            for v in variants}
    out = []
    for i, v in enumerate(variants):
        rs = done[v.name]
        losses = [r["final_val_loss"] for r in rs]
        row = {"variant": v.name, "change": v.change, "n": len(rs),
               "failed": sum(r["variant"] == v.name and r["status"] == "failed" for r in records),
               "mean": statistics.fmean(losses) if rs else None,
               "std": statistics.stdev(losses) if len(rs) > 1 else None,
               "bpb_mean": statistics.fmean(r["final_val_bpb"] for r in rs) if rs else None,
               "params": rs[0]["params"] if rs else None,
               "params_non_embedding": rs[0]["params_non_embedding"] if rs else None,
               "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
               "delta_prev": paired_delta(rs, done[variants[i - 1].name]) if i else None,
               "delta_gpt2": (paired_delta(rs, done["gpt2"]) if "gpt2" in done
                              and v.name != "gpt2" else None)}
        out.append(row)
    return out


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_report(grid: Grid, variants: list[Variant], seeds: list[int],
                 records: list[dict]) -> None:
    summary = summarize(variants, records)
    doc = {"format": FORMAT, "grid": grid.key(), "seeds": seeds,
           "runs": [{k: v for k, v in r.items() if k != "curve"} for r in records],
           "summary": summary}
    with atomic_write(grid.out_dir / RESULTS_JSON) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    with atomic_write(grid.out_dir / RESULTS_MD) as tmp:
        tmp.write_text(render_markdown(grid, seeds, summary, records))
    plot_curves(grid.out_dir / CURVES_PNG, variants, records)


def _m(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _delta(d: dict | None) -> str:
    if d is None:
        return ""
    spread = "" if d["std"] is None else f" ± {d['std']:.3f}"
    return f"{d['mean']:+.3f}{spread}{' *' if d['significant'] else ''}"


def render_markdown(grid: Grid, seeds: list[int], summary: list[dict],
                    records: list[dict]) -> str:
    """results.md: what was run, the table, the failed and unfinished runs."""
    s = grid.shape
    done = [r for r in records if r["status"] == "done"]
    tokens = grid.max_iters * grid.tokens_per_step
    first = done[0] if done else {}
    nonemb = [r["params_non_embedding"] for r in summary if r["params_non_embedding"]]
    spread = (max(nonemb) / min(nonemb) - 1) * 100 if nonemb else 0.0
    lines = [
        "# Ablation: GPT-2 to the modern architecture", "",
        f"{len(summary)} variants x {len(seeds)} seeds ({', '.join(map(str, seeds))}); every run "
        f"{grid.max_iters} steps of {grid.tokens_per_step:,} tokens = {tokens:,} tokens of "
        f"`{Path(grid.data).name}`, {first.get('device', '?')} {first.get('dtype', '?')}, "
        f"{first.get('backend', '?')} backend"
        + (f", trainer options `{' '.join(grid.train_args)}`" if grid.train_args else "") + ".",
        f"Model: {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads ({s['n_kv_head']} KV "
        f"heads with GQA), soft-cap {s['logit_softcap']}; ffn_hidden set per variant so that "
        f"non-embedding parameters match gpt2's (spread {spread:.1f}%).", "",
        "| variant | change | params (non-emb.) | val loss | Δ prev | Δ gpt2 | bits/byte | tok/s |",
        "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        loss = ("failed" if r["failed"] else "not finished") if r["mean"] is None else (
            f"{r['mean']:.3f}" + ("" if r["std"] is None else f" ± {r['std']:.3f}"))
        if r["mean"] is not None and r["n"] < len(seeds):
            loss += f" (n={r['n']})"
        lines.append(
            f"| {r['variant']} | {r['change']} | {_m(r['params'])} ({_m(r['params_non_embedding'])})"
            f" | {loss} | {_delta(r['delta_prev'])} | {_delta(r['delta_gpt2'])} | "
            f"{'' if r['bpb_mean'] is None else format(r['bpb_mean'], '.3f')} | "
            f"{'' if r['tokens_per_s'] is None else format(r['tokens_per_s'], ',.0f')} |")
    lines += ["", "val loss: the final evaluation on the whole val split (nats/token), mean ± "
              "std over seeds. Δ: paired by seed (the same training windows), mean ± std of "
              "the per-seed differences; * marks a difference beyond the seed spread (paired "
              "t-test, 95%). tok/s: the median training step of each run (median over seeds)."]
    bad = [r for r in records if r["status"] != "done"]
    if bad:
        lines += ["", "Runs not finished:", ""]
        lines += [f"- {r['variant']} seed {r['seed']}: {r['status']}"
                  + (f" at step {r['step']}" if r.get("step") is not None else "")
                  + (f": {r['error']}" if r.get("error") else "") for r in bad]
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, variants: list[Variant], records: list[dict]) -> None:
    """curves.png: val loss against tokens per variant, the mean over seeds with a ±std band;
    the right panel is the second half of training, where the variants part."""
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for v in variants:
        curves = [dict(map(tuple, r["curve"])) for r in records
                  if r["variant"] == v.name and r.get("curve")]
        xs = sorted(set().union(*curves)) if curves else []
        xs = [x for x in xs if all(x in c for c in curves)]
        if not xs:
            continue
        ys = [[c[x] for c in curves] for x in xs]
        mean = [statistics.fmean(y) for y in ys]
        std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
        for ax in axes:
            line, = ax.plot(xs, mean, "o-", ms=2.5, lw=1.2, label=f"{v.name} (n={len(curves)})")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
    xmax = max((r["curve"][-1][0] for r in records if r.get("curve")), default=1)
    axes[1].set_xlim(xmax / 2, xmax * 1.01)
    _fit_y(axes[1], xmax / 2)
    for ax, title in zip(axes, ("val loss (--eval-iters batches)", "second half")):
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 300k, not 300000
        ax.set_xlabel("training tokens")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _fit_y(ax, x0: float) -> None:
    """The y range of the lines right of x0, with a margin."""
    ys = [y for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())
          if x >= x0]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max((hi - lo) * 0.15, 0.01)
        ax.set_ylim(lo - pad, hi + pad)


# -- the command ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description="Train a grid of GPT-2 -> modern variants with equal "
                                      "budgets and seeds, and report what each change buys.")
    a = p.add_argument
    a("--variants", default=None,
      help="comma-separated variant names (default: the grid --list prints)")
    a("--list", action="store_true", help="print the default grid and exit")
    a("--seeds", type=int, default=3, help="seeds per variant")
    a("--seed", type=int, default=1337, help="the first seed (then seed+1, ...)")
    a("--out-dir", default="ablate", help="the grid's folder: runs/, logs/ and the report")
    a("--data", default=None,
      help="as the trainer takes it: a prepared data directory or raw text (default: the "
           f"Python stdlib source, prepared into {train_mod.DEFAULT_DATA})")
    a("--model-args", default=DEFAULT_SHAPE,
      help="the sizes every variant shares, and n_kv_head (the GQA rows') and logit_softcap "
           f"(the soft-capped rows'); default {DEFAULT_SHAPE}")
    a("--max-iters", type=int, default=300, help="optimizer steps of every run")
    a("--batch-size", type=int, default=16, help="windows per step")
    a("--eval-interval", type=int, default=30, help="steps between points of the curves")
    a("--train-args", default="",
      help="more trainer options for every run, e.g. \"--lr 3e-3 --dtype float32\"")
    a("--stop-at", type=int, default=None,
      help="stop every run at this step with a checkpoint; run again without it to finish")
    a("--jobs", type=int, default=None,
      help="runs at a time (default: one per CPU core, or 1 with a GPU)")
    a("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    a("--force", action="store_true", help="replace another grid in --out-dir")
    a("--no-progress", action="store_true", help="no progress bar")
    prepare_mod.add_tokenizer_args(p)
    return p.parse_args(argv)


def _train_args(text: str) -> tuple:
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise AblateError(f"--train-args: {e}") from None
    if any(a.split("=", 1)[0] == "--init-from" for a in argv):
        raise AblateError("--train-args: --init-from would start every variant from one model; "
                          "the grid trains each architecture from scratch")
    owned = sorted({a.split("=", 1)[0] for a in argv} & set(OWNED))
    if owned:
        raise AblateError(f"--train-args: {', '.join(owned)} is set by the grid (the ablate "
                          "option of that name; the window is --model-args block_size)")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            train_mod.parse_args(argv)
    except SystemExit:
        said = err.getvalue().strip().split(": error: ", 1)[-1]
        raise AblateError(f"--train-args: {said}") from None
    return tuple(argv)


def _resources(args) -> None:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.jobs is None:
        args.jobs = 1 if torch.cuda.is_available() else max(1, cores or 1)
    if args.threads is None:
        args.threads = max(1, (cores or 1) // args.jobs)
    for name in ("jobs", "threads", "seeds", "max_iters", "batch_size", "eval_interval"):
        if getattr(args, name) < 1:
            raise AblateError(f"--{name.replace('_', '-')} must be at least 1")


def ablate(args) -> int:
    variants = parse_variants(args.variants)
    shape = parse_shape(args.model_args)
    fields = variant_fields(variants, shape)
    train_args = _train_args(args.train_args)
    _resources(args)
    env = train_mod.Env(False, 0, 1, train_mod.resolve_device("cpu"))
    data = train_mod.resolve_data(args.data, train_mod.tokenizer_args(args), env,
                                  progress=not args.no_progress)
    grid = Grid(Path(args.out_dir).resolve(), str(Path(data).resolve()), shape,
                args.max_iters, args.batch_size, args.eval_interval, train_args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    specs = plan(grid, variants, fields, seeds)
    open_grid(grid, args.force)
    states = [run_state(s.run_dir, grid.max_iters) for s in specs]
    print(f"{len(variants)} variants x {len(seeds)} seeds = {len(specs)} runs into {args.out_dir} "
          f"({states.count('done')} done, {states.count('resume')} to resume), "
          f"{args.jobs} at a time x {args.threads} thread(s); every run "
          f"{grid.max_iters * grid.tokens_per_step:,} tokens", file=sys.stderr)
    errors: dict[Path, str] = {}

    def report(spec=None, rc=0, error=""):
        if spec is not None and rc not in (0, 130):
            errors[spec.run_dir] = error
            print(f"{spec.label} failed: {error} (log: {spec.log})", file=sys.stderr)
        write_report(grid, variants, seeds,
                     [collect(s, grid, errors.get(s.run_dir, "")) for s in specs])

    try:
        failed = run_grid(specs, grid, args, report)
    except KeyboardInterrupt:
        report()
        print(f"interrupted: the runs saved checkpoints; run the same command again to "
              f"resume ({grid.out_dir / RESULTS_MD} holds what is done)", file=sys.stderr)
        return 130
    report()
    print((grid.out_dir / RESULTS_MD).read_text())
    if args.stop_at is not None and args.stop_at < grid.max_iters:
        print(f"stopped every run at step {args.stop_at} (--stop-at); run again without it to "
              "finish them", file=sys.stderr)
    print(f"report: {grid.out_dir / RESULTS_MD}, {RESULTS_JSON}, {CURVES_PNG}", file=sys.stderr)
    if failed:
        raise AblateError(f"{failed} of {len(specs)} runs failed (see {grid.out_dir / RESULTS_MD}"
                          f" and {grid.out_dir / LOGS})")
    return 0


def list_grid() -> int:
    width = max(len(v.name) for v in default_grid())
    for v in default_grid():
        print(f"{v.name:<{width}}  {v.change}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: list_grid() if args.list else ablate(args))


if __name__ == "__main__":
    sys.exit(main())
