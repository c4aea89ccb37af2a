"""The ``quantpredict`` command line: argument parsing only, every command a thin call into the packages.

Each subcommand lives in its own module ``quantpredict.cli.<name>`` exposing ``register(subparsers)``, which adds
the subparser and sets ``func`` to a callable ``(args) -> int``. Stages whose module does not exist yet get a stub
that says so and exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from quantpredict.errors import NotImplementedYetError, QuantpredictError

# name -> one-line help; the module quantpredict.cli.<module> implements it.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the main job on the embedded default (what README's first command runs)"),
    "formats": ("formats", "list every number format with its bits per element"),
    "zoo": ("zoo", "list or build the model zoo"),
    "eval": ("eval_", "WikiText-2 perplexity of a model, or its comparison against an FP model"),
    "quantize": ("quantize", "quantize a model (RTN, GPTQ, SmoothQuant) and save it"),
    "features": ("features", "loss-landscape features of a model under a recipe"),
    "collect": ("collect", "run a sweep of models x formats x methods into a run store"),
    "runs": ("runs", "show or export a run store"),
    "backfill": ("backfill", "add feature groups to a store's runs without evaluating them again"),
    "fit": ("fit", "fit (and validate) a predictor on a run store"),
    "predict": ("predict", "predict a quantized model's perplexity without evaluating it"),
    "profile": ("profile", "measure a model's sensitivity profile once (what rank and allocate read) and cache it"),
    "rank": ("rank", "rank every candidate recipe by predicted quality; recommend one under a budget"),
    "allocate": ("allocate", "choose per-layer formats minimising the predicted KLD under a bit budget"),
    "report": ("report", "render figures and reports/index.md from a run store"),
    "qat": ("qat", "quantization-aware fine-tuning baseline"),
    "study": ("study", "studies: ptq-vs-qat"),
    "attention": ("attention", "sparse attention: benchmark and self-selected spans"),
}


def _stub(name: str):
    def run(args: argparse.Namespace) -> int:
        raise NotImplementedYetError(f"`quantpredict {name}` is not implemented in this version yet")

    return run


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
    for name, (module, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"quantpredict.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"quantpredict.cli.{module}":
                raise
            p = sub.add_parser(name, help=f"{help_} (not implemented yet)")
            p.set_defaults(func=_stub(name))
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except QuantpredictError as exc:
        if args.debug:
            raise
        print(f"quantpredict {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: still one line without --debug, and a distinct exit code
        if args.debug:
            raise
        print(f"quantpredict {args.command}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
