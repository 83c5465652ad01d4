"""Checks the machine code of the built CUDA library for known slow access patterns.

Disassembles libgptmod_cuda.so with `cuobjdump -sass` (the `nvidia-cuda-cuobjdump` and
`nvidia-cuda-nvdisasm` wheels have the two tools it needs) and, for every architecture in it,
fails when
  - a bf16 or fp16 instance of decode_attention_split_kernel reads shared memory in pieces
    narrower than 32 bits (LDS.U16 / LDS.64 of a 16-byte K/V chunk instead of one LDS.128), or
  - a 16-byte-pack instance of rope_kernel or swiglu_*_kernel (N = 16 / sizeof(T)) stores
    global memory in pieces narrower than 128 bits (4 x STG.E of one pack instead of STG.E.128).
These are instruction-level facts a GPU-less machine can still check (issue 15); the numbers of
every instance are printed, and `--json` writes them.

    python benchmarks/cuda_sass_check.py build-ci-cuda/libgptmod_cuda.so
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

_ARCH = re.compile(r"code for (sm_\d+a?)")
_FUNC = re.compile(r"Function : (\S+)")
# An SASS memory instruction with its modifiers, e.g. "LDS.U16", "LDS.128", "STG.E.128", "STG.E".
_MEM = re.compile(r"\b((?:LDS|STG|LDG|STS)(?:\.[A-Z0-9_]+)*)\b")


def find_cuobjdump(explicit: str | None = None) -> str:
    """cuobjdump from --cuobjdump, $CUOBJDUMP, PATH, the nvidia-cuda-cuobjdump wheel or a toolkit."""
    candidates = [explicit, os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", "cuobjdump")))
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_cuobjdump", "bin", "cuobjdump")))
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("cuda_sass_check: no cuobjdump found; `pip install nvidia-cuda-cuobjdump "
                     "nvidia-cuda-nvdisasm` or pass --cuobjdump PATH")


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def parse_sass(text: str) -> dict[tuple[str, str], Counter]:
    """{(arch, mangled function): Counter of memory instruction spellings}."""
    funcs: dict[tuple[str, str], Counter] = {}
    arch, cur = "?", None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = _FUNC.search(line)
        if m:
            cur = funcs.setdefault((arch, m.group(1)), Counter())
            continue
        if cur is not None and "/*" in line:
            for ins in _MEM.findall(line.split(";")[0]):
                cur[ins] += 1
    return funcs


def _width(ins: str) -> int:
    """Access width in bits of an LDS/STG spelling (no size suffix = 32 bits)."""
    for part in ins.split(".")[1:]:
        if part in ("U8", "S8"):
            return 8
        if part in ("U16", "S16"):
            return 16
        if part in ("64", "128"):
            return int(part)
    return 32


_PACK = {"c10::BFloat16": 8, "c10::Half": 8, "float": 4, "double": 2}


def _template_args(name: str) -> list[str]:
    inner = name[name.index("<") + 1:name.rindex(">")] if "<" in name else ""
    return [a.strip() for a in inner.split(",")]


def check(funcs: dict[tuple[str, str], Counter], names: dict[str, str]) -> tuple[list[str], list[dict]]:
    """Returns (failures, one row per checked instance)."""
    failures, rows = [], []
    seen = Counter()
    for (arch, mangled), ins in sorted(funcs.items()):
        name = names.get(mangled, mangled)
        args = _template_args(name)
        kind = None
        if "decode_attention_split_kernel<" in name and args[0] in ("c10::BFloat16", "c10::Half"):
            kind = "decode_attention"
            narrow = {k: v for k, v in ins.items() if k.startswith("LDS") and _width(k) not in (32, 128)}
            bad = bool(narrow) or not any(k.startswith("LDS") and _width(k) == 128 for k in ins)
            why = (f"reads shared memory with {dict(narrow)}" if narrow else
                   "has no LDS.128 (K/V chunks not read as 16 bytes)")
        elif (("::rope_kernel<" in name or "swiglu_fwd_kernel<" in name or "swiglu_bwd_kernel<" in name)
              and len(args) >= 2 and args[0] in _PACK and args[1] == str(_PACK[args[0]])):
            kind = "rope" if "rope_kernel" in name else "swiglu"
            narrow = {k: v for k, v in ins.items() if k.startswith("STG") and _width(k) != 128}
            bad = bool(narrow) or not any(k.startswith("STG") for k in ins)
            why = f"stores 16-byte packs with {dict(narrow)}" if narrow else "has no global store"
        if kind is None:
            continue
        seen[kind] += 1
        mem = {k: v for k, v in sorted(ins.items()) if k[:3] in ("LDS", "STG", "LDG")}
        rows.append({"arch": arch, "kernel": name, "ok": not bad, "memory_instructions": mem})
        if bad:
            failures.append(f"{arch} {name}: {why}")
    for kind in ("decode_attention", "rope", "swiglu"):
        if not seen[kind]:
            failures.append(f"no {kind} instance to check was found (is this libgptmod_cuda.so?)")
    return failures, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib", type=Path, help="path of libgptmod_cuda.so")
    ap.add_argument("--cuobjdump", help="cuobjdump executable (default: found automatically)")
    ap.add_argument("--json", type=Path, help="write the per-instance counts here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every checked instance")
    args = ap.parse_args(argv)
    tool = find_cuobjdump(args.cuobjdump)
    # cuobjdump runs nvdisasm, which the wheels put next to it.
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(tool), os.environ.get("PATH", "")]))
    r = subprocess.run([tool, "-sass", str(args.lib)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"cuda_sass_check: {tool} -sass failed: {r.stderr.strip()}")
    sass = r.stdout
    funcs = parse_sass(sass)
    names = demangle(sorted({f for _, f in funcs}))
    failures, rows = check(funcs, names)
    archs = sorted({r["arch"] for r in rows})
    print(f"cuda_sass_check: {args.lib} ({', '.join(archs)}): {len(rows)} instances checked "
          f"with {tool}")
    for r in rows:
        if args.verbose or not r["ok"]:
            mark = "ok  " if r["ok"] else "FAIL"
            print(f"  {mark} {r['arch']} {r['kernel']}: {r['memory_instructions']}")
    if args.json:
        args.json.write_text(json.dumps({"lib": str(args.lib), "failures": failures, "instances": rows},
                                        indent=1) + "\n")
    if failures:
        print(f"cuda_sass_check: FAILED, {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print("cuda_sass_check: passed (decode_attention fp16/bf16 read K/V tiles with LDS.128, "
          "rope/swiglu store 16-byte packs with STG.E.128)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
