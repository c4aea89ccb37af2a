"""Options shared by every command that runs a model: ``--device``, ``--dtype``, ``--max-memory``.

Each is checked before any model is loaded, so ``--device cuda`` on a machine without CUDA fails at once with one
message naming the flag and the devices this machine has (exit status 2, as for every bad input).
"""

from __future__ import annotations

import argparse
from typing import Any

from quantpredict.memory import DEFAULT_MAX_MEMORY_TEXT


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where the model runs: cpu (default), cuda, cuda:N or mps")


def add_dtype(p: argparse.ArgumentParser, what: str = "forward passes") -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help=f"compute dtype of the {what} (default fp32); bf16 keeps float32 for the head, softmax, "
                        "KL, Hessians and every accumulator")


def add_max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY_TEXT, metavar="SIZE",
                   help="working-memory budget beyond the weights, e.g. 6GiB or 512MB (default "
                        f"{DEFAULT_MAX_MEMORY_TEXT}): calibration spills block inputs to disk above it, the features "
                        "split their autograd graphs into micro-batches that fit it")


def device(args: argparse.Namespace) -> Any:
    """``--device`` as a torch device (a clear error naming the flag when this machine lacks it)."""
    from quantpredict.memory import resolve_device

    return resolve_device(getattr(args, "device", None), flag="--device")


def dtype(args: argparse.Namespace) -> Any:
    """``--dtype`` as a torch dtype."""
    from quantpredict.memory import resolve_dtype

    return resolve_dtype(getattr(args, "dtype", None), flag="--dtype")


def max_memory(args: argparse.Namespace) -> int:
    """``--max-memory`` in bytes."""
    from quantpredict.memory import parse_bytes

    return parse_bytes(getattr(args, "max_memory", None), flag="--max-memory")


def positive(kind: type = int):
    """An argparse ``type=`` that accepts numbers above zero only (a usage error, exit 2, otherwise)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above zero")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse
