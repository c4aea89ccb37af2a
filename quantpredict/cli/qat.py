"""``quantpredict qat MODEL --format F [--steps N] [--lr X] [--init rtn|gptq] --out DIR``: QAT a model and save it."""

from __future__ import annotations

import argparse
import json

from quantpredict.cli import options


def register(subparsers) -> None:
    # the defaults from the Recipe (what quantpredict.qat.runs reads too): importing quantpredict.qat here would
    # import torch and transformers while the parser is built, 3.5 s before every command
    from quantpredict.recipe import Recipe

    defaults = Recipe("int4")
    DEFAULT_STEPS, DEFAULT_LR, DEFAULT_BATCH_SIZE = defaults.qat_steps, defaults.qat_lr, defaults.qat_batch_size

    p = subparsers.add_parser(
        "qat",
        help="quantization-aware fine-tuning baseline",
        description="Quantize a model with quantization-aware fine-tuning: PTQ init (RTN or GPTQ), then AdamW on the "
                    "next-token NLL through straight-through fake quantization of every linear layer PTQ quantizes, "
                    "on exactly the calibration windows GPTQ would get (WikiText-2 train). Saves a model directory "
                    "that `quantpredict eval DIR` takes as is.",
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or local Hugging Face model directory")
    p.add_argument("--format", required=True, dest="weight_format", metavar="F",
                   help="weight format (see `quantpredict formats`), e.g. int4, mxint4, mxfp4_e2m1")
    p.add_argument("--block-size", type=options.positive(int), default=None, metavar="N",
                   help="elements per shared scale along the input dimension (default: 32 for MX, per channel for "
                        "INT/FP8)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N", help=f"AdamW steps ({DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, metavar="X",
                   help=f"peak learning rate, cosine-decayed to 0 ({DEFAULT_LR:g})")
    p.add_argument("--init", choices=("rtn", "gptq"), default="rtn", help="PTQ start of the fine-tuning (rtn)")
    p.add_argument("--batch-size", type=options.positive(int), default=DEFAULT_BATCH_SIZE, metavar="N",
                   help=f"calibration windows per step ({DEFAULT_BATCH_SIZE})")
    p.add_argument("--calib-samples", type=options.positive(int), default=128, metavar="N",
                   help="calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=options.positive(int, minimum=2), default=256, metavar="N",
                   help="tokens per window (default 256)")
    p.add_argument("--act-format", default=None, metavar="F", help="fake-quantize linear-layer inputs to F")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="leave this linear layer unquantized (name, suffix or pattern); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and the minibatch order")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch intra-op threads")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    options.add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from quantpredict.data import token_ids
    from quantpredict.errors import RecipeError
    from quantpredict.models import load
    from quantpredict.qat import QATConfig, finetune
    from quantpredict.qat.runs import save_qat
    from quantpredict.quantize import Recipe

    device = options.device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(weight_format=args.weight_format, block_size=args.block_size, method=args.init,
                    act_format=args.act_format, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                    skip=tuple(args.skip), seed=args.seed)
    try:  # checked before the model loads: a bad --steps/--lr/--batch-size is a user error, at once
        config = QATConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, init=args.init, seed=args.seed)
    except ValueError as exc:
        raise RecipeError(f"{exc} (--steps, --lr, --batch-size)") from None
    options.check_model(args.model)
    options.check_out(args.out, "--out", kind="dir")
    model, tokenizer = load(args.model, dtype=torch.float32, device=device)
    calib = token_ids(tokenizer, "wikitext2", "train")  # calibration: train split only
    result = finetune(model, recipe, calib, config=config)
    out = save_qat(model, result, args.out, tokenizer=tokenizer)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(f"{result.label}: {result.steps} steps ({result.epochs:.2f} epochs of {result.calib_windows} "
              f"calibration windows) in {result.seconds:.1f} s")
        print(f"calibration NLL: FP {result.calib_nll_fp:.4f}, {args.init.upper()} {result.calib_nll_before:.4f}, "
              f"QAT {result.calib_nll_after:.4f} nats/token")
        print(f"saved to {out}; measure it with `quantpredict eval {out} --against {args.model}`")
    return 0
