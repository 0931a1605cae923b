"""`taskvec` command line. Each subcommand lives in taskvec/commands/<name>.py and defines
`add_parser(subparsers)` (which must set `func`) — modules are discovered, so adding a command
touches no other file."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import warnings

from . import __version__
from .errors import TaskvecError, TaskvecWarning


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block, up to a dozen lines, above it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskvec",
        description="Task vectors, the pretrained model's eNTK, early-stopping theory, task arithmetic and merging.",
    )
    parser.add_argument("--version", action="version", version=f"taskvec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.add_parser(sub)
    return parser


def _quiet_transformers() -> None:
    """taskvec shows its own progress; transformers' per-load bars and load reports are noise here.

    Before transformers is imported this only sets its environment switches, so commands that never
    load a model (vectors, merge, scopes) do not pay the ~1 s import."""
    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _calm_progress_in_logs() -> None:
    """Progress bars redraw many times a second; into a log file (stderr not a terminal) that is thousands
    of lines, so there they update every 30 s instead (tqdm reads TQDM_* defaults from the environment)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """taskvec's own warnings as 'taskvec CMD: warning: …' on stderr (Python's default adds file and line),
    each shown once per command — also when main() runs again in the same process (setting a filter resets
    Python's once-per-process memory of shown warnings)."""
    show = warnings.showwarning

    def show_taskvec(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TaskvecWarning):
            print(f"taskvec {command}: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("default", TaskvecWarning)
        warnings.showwarning = show_taskvec
        yield


def main(argv: list[str] | None = None) -> int:
    _quiet_transformers()
    _calm_progress_in_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    previous = _terminate_as_interrupt()
    try:
        with _one_line_warnings(args.command):
            return int(args.func(args) or 0)
    except TaskvecError as exc:
        print(f"taskvec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"taskvec {args.command}: interrupted; nothing partial was left behind", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same cleanup runs (exit status 128 + 15)."""


def _terminate_as_interrupt():
    """SIGTERM (`kill`, `timeout`, a job scheduler) unwinds like Ctrl-C, so temporary outputs are removed."""
    def raise_interrupt(signum, frame):
        raise _Terminated

    try:
        return signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread (taskvec called from a worker thread): leave signals alone
        return None


if __name__ == "__main__":
    sys.exit(main())
