"""A trained run against llama.cpp: export it as GGUF, then llama.cpp's own tools must give our
token ids and our sampler's greedy text. Writes a markdown and a JSON report.

    PYTHONPATH=python python benchmarks/gguf_check.py --ckpt out/ \
        [--llama-cpp ~/.cache/gptmod_ext/llama.cpp/bin] [--out benchmarks/results]

Steps: `python -m gptmod_ext.export --format gguf` writes fp32 and q8_0 files; llama-tokenize
(special tokens parsed, as our prompts are) tokenizes the hard texts below and the first 4 KB of
a few standard-library source files, compared with our tokenizer's ids; llama-simple (llama.cpp's
minimal greedy loop) continues each prompt from the fp32 file, compared with `python -m gptmod_ext.sample
--temperature 0` on the run; the q8_0 file continues the same prompts (reported, with the length
of the prefix it shares with ours: 8-bit weights may turn a near tie). Each greedy row also
gives the smallest gap between our best and second-best logit (float64) along our path: where
it is tiny, a CPU's rounding could pick either token. The tools come from
benchmarks/build_llama_cpp.sh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

import _paths  # noqa: F401  (python/ only when gptmod_ext is not installed)
from common import machine_info, machine_slug, md_table, write_json, write_text
from gptmod_ext import checkpoint, sample

HARD_TEXTS = [
    "def f(x):\n\treturn {'a': [1, 2], \"b\": x ** 2}  # dict\n\n\nclass C(object):\n    pass\n",
    "    indented    by four\t\ttab tab \t mixed   \n        \n", "a\r\nb\r\n\r\nc\rd\n\re",
    "It's, it'S, IT'S, they're THEY'RE, we'VE, I'd I'LL you'm don't DON'T '' 's",
    "3.14159 2718281828 1e-10 0x1F 1_000_000 12,345 ¼ ½ ٠١٢ 五",
    "Ünïcödé: naïve café Straße — «quotes» “curly” ‘single’ … ©",
    "中文字符串，日本語のひらがな、한국어 텍스트, Ελληνικά, кириллица, עברית, العربية, हिन्दी",
    "emoji 😀🎉👍🏽 👩‍💻 🇯🇵 ❤️ family 👨‍👩‍👧‍👦 keycap 1️⃣", "<|endoftext|>", "a<|endoftext|>b",
    "x = '''\n  multi\n  line\n'''\n", "\t\t\t", "   ", "\n\n\n\n", "trailing space ",
]
PROMPTS = ["def ", "import os\n", "class ", "    return ", "# ", ""]


def stdlib_samples(n: int = 6, size: int = 4096) -> list[str]:
    """The first `size` characters of a few standard-library modules: real code."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "json/decoder.py", "textwrap.py", "csv.py", "string.py", "shlex.py"]
    return [(lib / f).read_text(encoding="utf-8")[:size] for f in names[:n] if (lib / f).is_file()]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=600, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{Path(str(cmd[0])).name} failed: "
                         f"{r.stderr.decode(errors='replace').strip()[-800:]}")
    return r


def llama_ids(bin_dir: Path, gguf: Path, text: str, tmp: Path) -> list[int]:
    (tmp / "t.txt").write_bytes(text.encode())
    out = run([bin_dir / "llama-tokenize", "-m", gguf, "-f", tmp / "t.txt", "--ids", "--no-escape",
               "--log-disable"]).stdout  # special tokens parsed (the tool's default), as ours
    return json.loads(out.decode().strip().splitlines()[-1])


def llama_greedy(bin_dir: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation (it prints the prompt, the new text, a newline)."""
    prompt = prompt or "<|endoftext|>"
    out = run([bin_dir / "llama-simple", "-m", gguf, "-n", n, prompt]).stdout
    return out[len(prompt.encode()):-1].decode("utf-8", errors="replace")


def our_greedy(ckpt: Path, prompt: str, n: int) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = run([sys.executable, "-m", "gptmod_ext.sample", "--ckpt", ckpt, "--prompt", prompt,
               "--temperature", 0, "--max-new-tokens", n, "--no-echo", "-q"], env=env).stdout
    return out.decode()[:-1]  # the sampler ends with one newline


def min_margin(model, tok, prompt: str, n: int) -> float:
    """Smallest top-1 minus top-2 logit gap (float64) along our greedy continuation."""
    ids = sample.encode_prompt(tok, prompt)
    seq = list(model.generate([ids], n, temperature=0, eos_id=tok.eot_id)[0])  # prompt + new
    m = model.double()
    with torch.no_grad():
        logits = m(torch.tensor([seq]))[0][0, len(ids) - 1:-1, :tok.vocab_size]
    model.float()
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="out")
    ap.add_argument("--llama-cpp", default=str(Path.home() / ".cache/gptmod_ext/llama.cpp/bin"))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--note", default="", help="a line for the report (how the run was made)")
    args = ap.parse_args()
    ckpt, bin_dir = Path(args.ckpt), Path(args.llama_cpp)
    model, tok, info = checkpoint.load_model(ckpt, device="cpu", dtype="float32", backend="torch")
    train = info.config.get("train", {})
    res = {"machine": machine_info(), "ckpt": str(ckpt), "step": info.config.get("step"),
           "val_loss": info.config.get("val_loss"), "preset": train.get("preset"),
           "load_average": os.getloadavg()[0], "note": args.note,
           "llama_cpp": (bin_dir.parent / "build-info.txt").read_text().strip()
           if (bin_dir.parent / "build-info.txt").exists() else str(bin_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {d: tmp / f"run-{d}.gguf" for d in ("fp32", "q8_0")}
        for d, f in files.items():
            line = run([sys.executable, "-m", "gptmod_ext.export", "--ckpt", ckpt, "--out", f,
                        "--format", "gguf", "--dtype", d],
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))).stdout
            res[f"export_{d}"] = line.decode().strip().replace(str(tmp) + "/", "")
        texts = HARD_TEXTS + stdlib_samples()
        res["tokens"] = [dict(text=t[:60], chars=len(t), ours=len(tok.encode(t)),
                              equal=llama_ids(bin_dir, files["fp32"], t, tmp) == tok.encode(t))
                         for t in texts]
        res["greedy"] = []
        for p in PROMPTS:
            ours = our_greedy(ckpt, p, args.new_tokens)
            theirs = llama_greedy(bin_dir, files["fp32"], p, args.new_tokens)
            q8 = llama_greedy(bin_dir, files["q8_0"], p, args.new_tokens)
            res["greedy"].append(dict(prompt=p, ours=ours, llama_fp32=theirs, equal=ours == theirs,
                                      margin=round(min_margin(model, tok, p, args.new_tokens), 4),
                                      llama_q8_0=q8, q8_0_common_prefix=common_prefix(ours, q8)))
    date = datetime.date.today().isoformat()
    stem = Path(args.out) / f"{machine_slug(res['machine'])}-{date}-gguf"
    write_json(stem.with_suffix(".json"), res)
    write_text(stem.with_suffix(".md"), report(res, date))
    ok_t = sum(r["equal"] for r in res["tokens"])
    ok_g = sum(r["equal"] for r in res["greedy"])
    print(f"token ids equal on {ok_t}/{len(res['tokens'])} texts, greedy text equal on "
          f"{ok_g}/{len(res['greedy'])} prompts; wrote {stem}.md")
    return 0 if ok_t == len(res["tokens"]) and ok_g == len(res["greedy"]) else 1


def cell(s: str) -> str:
    """A string as one markdown table cell: escapes visible, no column breaks."""
    text = json.dumps(s, ensure_ascii=False)[1:-1]
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def report(res: dict, date: str) -> str:
    m = res["machine"]
    yes = {True: "yes", False: "NO"}
    toks = md_table(["text (first 60 chars)", "chars", "our tokens", "llama.cpp ids equal"],
                    [[cell(r["text"]), str(r["chars"]), str(r["ours"]), yes[r["equal"]]]
                     for r in res["tokens"]], align=["l", "r", "r", "l"])
    greedy = md_table(["prompt", "ours", "llama.cpp fp32 equal", "min margin", "q8_0 shares"],
                      [[cell(r["prompt"]), cell(r["ours"]), yes[r["equal"]], f"{r['margin']:.3f}",
                        f"{r['q8_0_common_prefix']}/{len(r['ours'])} chars"]
                       for r in res["greedy"]], align=["l", "l", "l", "r", "r"])
    q8 = md_table(["prompt", "llama.cpp q8_0"],
                  [[cell(r["prompt"]), cell(r["llama_q8_0"])] for r in res["greedy"]],
                  align=["l", "l"])
    return f"""# A trained run in llama.cpp: GGUF export check ({date})

Machine: {m['cpu_model']}, {m['usable_cpus']} CPUs (load average {res['load_average']:.1f});
torch {m['torch']}. llama.cpp: {res['llama_cpp']}.
Run: `{res['ckpt']}`, preset {res['preset']}, step {res['step']}, val loss {res['val_loss']:.3f}
nats/token. Made with `benchmarks/gguf_check.py --ckpt RUN` (see its docstring). {res['note']}

- {res['export_fp32']}
- {res['export_q8_0']}

## llama-tokenize vs our tokenizer

{toks}

## Greedy text: llama-simple (fp32 GGUF) vs python -m gptmod_ext.sample --temperature 0

The empty prompt is `<|endoftext|>` in llama.cpp (what our sampler starts an empty prompt with).
"min margin": the smallest gap between our best and second-best logit (float64) along the
continuation. "q8_0 shares": how many leading characters the q8_0 file's greedy text shares
with ours.

{greedy}

q8_0 continuations:

{q8}
"""


if __name__ == "__main__":
    sys.exit(main())
