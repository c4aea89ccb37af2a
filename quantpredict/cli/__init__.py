"""The ``quantpredict`` command line: argument parsing only, every command a thin call into the packages.

Each subcommand lives in its own module ``quantpredict.cli.<name>`` exposing ``register(subparsers)``, which adds
the subparser and sets ``func`` to a callable ``(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from quantpredict.errors import QuantpredictError

# The subcommand modules quantpredict.cli.<module>, in the order `quantpredict --help` lists them; each names its
# own subcommand and help in its register().
COMMANDS: tuple[str, ...] = ("demo", "formats", "zoo", "eval_", "quantize", "export", "imatrix", "features",
                             "collect", "runs", "backfill", "fit", "predict", "profile", "rank", "allocate", "report",
                             "qat", "study", "attention")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the command, the problem, where the help is) and exit
    code 2, like every other user error; sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(text: object) -> str:
    """``text`` on one line: an error message's line breaks become '; ' (the CLI prints exactly one line)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quantpredict",
        description="Predict how much quality a quantized LLM loses, before evaluating it.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(f"quantpredict.cli.{module}").register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C in the main thread, so that every ``finally`` and ``atexit`` cleanup runs (the
    default action would kill the process where it stands, temporary files and all)."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "process_threads", False):  # options.add_threads: the whole process
            from quantpredict.cli.options import set_process_threads

            set_process_threads(args)
        return int(args.func(args) or 0)
    except QuantpredictError as exc:
        if args.debug:
            raise
        print(f"quantpredict {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # a bug, not a user error: still one line without --debug, and a distinct exit code
        if args.debug:
            raise
        print(f"quantpredict {args.command}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
