"""Options shared by every command that runs a model: ``--device``, ``--dtype``, ``--max-memory``, ``--threads``, the
text flags, and :func:`add_feature_run` (the flags ``features`` and ``predict`` share).

Each is checked before any model is loaded, so ``--device cuda`` on a machine without CUDA fails at once with one
message naming the flag and the devices this machine has (exit status 2, as for every bad input).
"""

from __future__ import annotations

import argparse
from typing import Any

from quantpredict.memory import DEFAULT_MAX_MEMORY_TEXT


def add_device(p: argparse.ArgumentParser, *, default: str | None = "cpu",
               help: str = "where the model runs: cpu (default), cuda, cuda:N or mps") -> None:
    p.add_argument("--device", default=default, metavar="DEV", help=help)


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for the whole command, set by :func:`quantpredict.cli.main` before
    the command runs (a command with its own per-run thread handling, such as ``collect``, adds its own flag)."""
    p.add_argument("--threads", type=positive(int), default=None, metavar="N",
                   help="torch threads for this command (default: torch's choice, one per core); on a shared or "
                        "busy machine give the cores it may use: oversubscribed threads slow torch badly")
    p.set_defaults(process_threads=True)


def set_process_threads(args: argparse.Namespace) -> None:
    """``--threads`` as torch's intra-op thread count for the rest of the process (nothing without the flag). The
    CLI's main does it before the command runs; a command that may finish without torch (``quantize``'s torch-free
    direct path) opts out (``process_threads=False``) and calls this where it needs torch."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_dtype(p: argparse.ArgumentParser, what: str = "forward passes") -> None:
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help=f"compute dtype of the {what} (default fp32); bf16 keeps float32 for the head, softmax, "
                        "KL, Hessians and every accumulator")


def add_max_memory(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_MAX_MEMORY_TEXT,
                   help: str | None = None) -> None:
    p.add_argument("--max-memory", default=default, metavar="SIZE",
                   help=help or "working-memory budget beyond the weights, e.g. 6GiB or 512MB (default "
                        f"{DEFAULT_MAX_MEMORY_TEXT}): calibration spills block inputs to disk above it, the features "
                        "split their autograd graphs into micro-batches that fit it")


def add_text(p: argparse.ArgumentParser, *, eval_text: bool = False, calib_text: bool = False) -> None:
    """``--eval-text FILE`` / ``--calib-text FILE``: a user's own UTF-8 text instead of WikiText-2, under the same
    protocol (BOS where the tokenizer prepends one, literal ``<unk>`` kept as text)."""
    if eval_text:
        p.add_argument("--eval-text", default=None, metavar="FILE",
                       help="evaluate on this UTF-8 text instead of WikiText-2 test")
    if calib_text:
        p.add_argument("--calib-text", default=None, metavar="FILE",
                       help="calibrate on this UTF-8 text instead of WikiText-2 train")


def add_feature_run(p: argparse.ArgumentParser) -> None:
    """The flags of a command that measures features of one model on a calibration batch (``features``,
    ``predict``), in this order: ``--json``, ``--calib-text``, ``--device``, ``--max-memory``."""
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_text(p, calib_text=True)
    add_device(p)
    add_max_memory(p)


def check_texts(args: argparse.Namespace) -> None:
    """Fail on a missing, empty or non-UTF-8 ``--eval-text``/``--calib-text`` before any model is loaded."""
    from quantpredict.data import read_text_file

    for name in ("eval_text", "calib_text"):
        if getattr(args, name, None) is not None:
            read_text_file(getattr(args, name))


def calib_stream(args: argparse.Namespace, tokenizer) -> Any:
    """The calibration token stream: ``--calib-text`` if given, else WikiText-2 train, under the tokenizer's
    protocol (:func:`quantpredict.data.token_stream`)."""
    from quantpredict import data

    return data.token_stream(tokenizer, "wikitext2", "train", text_file=getattr(args, "calib_text", None))


def cpu_device(args: argparse.Namespace) -> bool:
    """Whether ``--device`` asks for the CPU (its default), told without importing torch."""
    return str(getattr(args, "device", None) or "cpu").strip().lower() == "cpu"


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


def positive(kind: type = int, *, minimum: int | None = None):
    """An argparse ``type=`` that accepts numbers above zero only, or of at least ``minimum`` (a usage error, exit
    2, otherwise: the flag's own words, never the library's parameter names)."""
    noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if minimum is not None and not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above zero")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def check_model(name_or_path: str, *, tokenizer: bool = True) -> Any:
    """The model directory of a zoo name, imported model or path, checked from file headers alone (config, whole
    weights, tokenizer) before any weight loads: a corrupt or incomplete model is one message naming the file."""
    from quantpredict.models import check_model_dir

    return check_model_dir(name_or_path, tokenizer=tokenizer)


def check_out(path: Any, flag: str, *, kind: str = "file") -> Any:
    """``path`` if this user can write it (a ``kind`` of ``"file"`` or ``"dir"``), checked before any work and
    without creating anything; otherwise one message naming ``flag`` and the path."""
    from quantpredict.files import check_output

    return None if path is None else check_output(path, flag, kind=kind)


def add_runtime(p) -> None:
    """``--runtime``: price the recipes as an inference runtime runs them (:mod:`quantpredict.runtime`)."""
    from quantpredict.runtime import RUNTIMES

    p.add_argument("--runtime", default=None, choices=list(RUNTIMES),
                   help="price each recipe as this runtime runs it: llama.cpp-cpu rounds every quantized layer's "
                        "input to 8 bits as its CPU backend does (Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0/IQ4_NL "
                        "weights and Q4_1/Q5_1's Q8_1, Q8_K blocks of 256 for the k-quants and IQ4_XS, fp16 for F16), "
                        "on top of the weights (llama.cpp types only; default: the project's model, activations "
                        "in full precision)")


def add_protocol(p) -> None:
    """``--protocol``: the evaluation the predicted KLD is for (:data:`quantpredict.predict.rank.PROTOCOLS`)."""
    p.add_argument("--protocol", default="project", choices=["project", "llama.cpp"],
                   help="the evaluation the predictions are for: 'project' (256-token windows, every position "
                        "after the first scored; default) or 'llama.cpp' (llama-perplexity's 512-token chunks, the "
                        "second half scored: what `llama-perplexity --kl-divergence -c 512` reports; a profile of "
                        "its own, measured once and cached)")


def protocol_words(protocol: str | None) -> str:
    """The printed label of a protocol: empty for the project's."""
    return "" if protocol in (None, "project") else (f"; for {protocol}'s protocol (512-token chunks, the second "
                                                      "half scored)")


def runtime_words(runtime: str | None) -> str:
    """The printed label of a runtime: empty for none."""
    return "" if runtime is None else f"; as {runtime} runs it (activation rounding included)"


def add_imatrix(p, what: str) -> None:
    """``--imatrix FILE``: an importance matrix in llama.cpp's format (llama-imatrix's GGUF or legacy ``.dat``, or
    ``quantpredict imatrix``'s), for ``what`` the command does with it (:mod:`quantpredict.imatrix`)."""
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help=f"an importance matrix in llama.cpp's format (from llama-imatrix or `quantpredict imatrix`): "
                        f"{what}, as llama-quantize --imatrix does (llama.cpp types only)")


def imatrix_words(label: str | None) -> str:
    """The printed label of an imatrix: empty for none."""
    return "" if label is None else f"; with the imatrix {label}"
