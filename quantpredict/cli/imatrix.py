"""``quantpredict imatrix MODEL --out FILE``: llama.cpp's importance matrix of a model, computed by the project on the
calibration text and written in llama-imatrix's GGUF format (:func:`quantpredict.imatrix.compute_imatrix`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from quantpredict.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "imatrix",
        help="compute llama.cpp's importance matrix of a model on calibration text (llama-imatrix's GGUF file)",
        description="Run MODEL on calibration windows (WikiText-2 train, or --calib-text; the windows `quantpredict "
                    "quantize` samples) and write, for every linear layer of its blocks under its GGUF tensor name, "
                    "the per-column sum of its squared inputs and the number of input rows (tokens), as "
                    "llama-imatrix does, in its GGUF format: the file `quantpredict export/rank/predict --imatrix` "
                    "and llama-quantize --imatrix read. Sums in float64, stored in float32 (llama-imatrix "
                    "accumulates in float32).")
    p.add_argument("model", metavar="MODEL", help="zoo name or local Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="FILE", help="the imatrix file to write (GGUF)")
    p.add_argument("--calib-samples", type=options.positive(int), default=128, metavar="N",
                   help="calibration windows (llama-imatrix's chunks; default 128)")
    p.add_argument("--calib-seq-len", type=options.positive(int, minimum=16), default=256, metavar="N",
                   help="tokens per window (llama-imatrix's chunk size; at least 16, the fewest it collects; "
                        "default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--batch-size", type=options.positive(int), default=8, help="windows per forward pass")
    p.add_argument("--threads", type=options.positive(int), default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists (only once the new one is whole)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    options.add_text(p, calib_text=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from quantpredict import models
    from quantpredict.errors import OutputError
    from quantpredict.files import honour_umask
    from quantpredict.imatrix import compute_imatrix, imatrix_label, write_imatrix
    from quantpredict.quantize import sample_calibration

    options.check_texts(args)  # every input and output checked before the weights load
    model_dir = options.check_model(args.model)
    out = options.check_out(args.out, "--out")
    if out.exists() and not args.force:
        raise OutputError(f"--out {args.out} exists; pass --force to replace it, or another path")
    if out.exists() and out.is_dir():
        raise OutputError(f"--out {args.out} is a folder; give a file path")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model)
    windows = sample_calibration(tokenizer, args.calib_samples, args.calib_seq_len, seed=args.seed,
                                 text_file=args.calib_text)
    dataset = str(args.calib_text) if args.calib_text is not None else "wikitext2:train"
    im = compute_imatrix(model, windows, batch_size=args.batch_size, datasets=(dataset,),
                         progress=not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write_imatrix(im, tmp)
        honour_umask(Path(tmp))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    label = imatrix_label(out)
    tokens = int(windows.numel())
    if args.json:
        print(json.dumps({"path": str(out), "imatrix": label, "model": args.model, "model_dir": str(model_dir),
                          "entries": len(im.entries), "chunk_count": im.chunk_count, "chunk_size": im.chunk_size,
                          "tokens": tokens, "datasets": list(im.datasets)}, indent=1))
        return 0
    print(f"wrote {out} ({label}): {len(im.entries)} tensors of {args.model}, {im.chunk_count} windows of "
          f"{im.chunk_size} tokens ({tokens} tokens) of {dataset}", file=sys.stdout)
    print(f"  use it: quantpredict export {args.model} --recipe q4_k_m --imatrix {out} --gguf OUT.gguf; "
          f"llama-quantize --imatrix {out} ...")
    return 0
