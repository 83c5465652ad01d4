"""Small pieces every module may use; a leaf: it imports nothing of the package.

- UserError: the base of every error a user can fix (a missing file, a bad option value, a
  corrupt checkpoint). Each module's own error (CheckpointError, TrainError, ...) derives from
  it, so the one command-line runner reports them all the same way.
- run_cli: how every `python -m gptmod_ext.*` entry point ends: one line on stderr
  (`python -m gptmod_ext.X: error: ...`), exit status 1 for a user error, 2 for bad options,
  130 on Ctrl-C; GPTMOD_DEBUG=1 shows tracebacks instead.
- Parser: argparse with one-line usage errors.
- atomic_write: the one atomic file write of the package.
- first_line: an exception's message as one line.
- transformers_module: the optional transformers package, or an ImportError saying how to get it.

The shape follows nanochat's common.py (a leaf module that breaks import cycles).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix; reported as one line (its message) and exit status 1."""


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type when it has none), for one-line reports."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def debugging() -> bool:
    """GPTMOD_DEBUG=1: let errors raise with their tracebacks."""
    return os.environ.get("GPTMOD_DEBUG") == "1"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (the default prints the whole
    usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"  # "[Errno 13] ..." says less than the path
    if isinstance(e, (UserError, ImportError, OSError, ValueError, RuntimeError)):
        return first_line(e)
    return f"unexpected {type(e).__name__}: {first_line(e)} (set GPTMOD_DEBUG=1 for the traceback)"


def run_cli(prog: str, run: Callable[[], int]) -> int:
    """Runs a command's body and turns every failure into one line on stderr and an exit status:
    1 for any error (UserError, a missing package, a refused value, torch's RuntimeError...),
    130 for Ctrl-C; a reader that went away (`| head`) ends it quietly. Usage errors (exit 2)
    happen before, in Parser. With GPTMOD_DEBUG=1 errors propagate with their tracebacks."""
    def fail(msg: str, code: int) -> int:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()  # what was printed so far comes before the message
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return code

    try:
        return run()
    except KeyboardInterrupt:
        if debugging():
            raise
        return fail("interrupted", 130)
    except BrokenPipeError:
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if debugging():
            raise
        return fail(_message(e), 1)


# -- files -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_write(path) as tmp:` write tmp; it is renamed over path when the block ends
    without an error, removed otherwise (path keeps its old content). The one atomic write of
    the package: checkpoints, metrics, plots, tokenizers and prepared data all go through it.

    tmp is `.NAME.tmpPID` next to path. A process killed mid-write (SIGKILL, a lost machine)
    leaves its tmp behind; the next write of the same path removes those whose process is gone.
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _remove_stale_temporaries(path: Path) -> None:
    prefix = _tmp_prefix(path)
    for old in path.parent.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            old.unlink(missing_ok=True)


# -- optional packages -----------------------------------------------------------------------------
def transformers_module():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("gptmod_ext.hf needs the optional dependency `transformers`: "
                          "pip install transformers (the package's hf extra)") from e
    return transformers
