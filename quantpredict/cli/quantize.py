"""``quantpredict quantize MODEL --format F --method {rtn,gptq} ... --out DIR``: quantize a model and save it."""

from __future__ import annotations

import argparse
import json
import sys

from quantpredict.cli import options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model (RTN, GPTQ, SmoothQuant, AWQ) and save it",
        description="Quantize a zoo model or local Hugging Face causal LM, block by block, calibrated on WikiText-2 "
                    "train, and save it as a model directory that `quantpredict eval DIR` takes as is. Plain RTN "
                    "(no --smoothquant, no --awq; --act-format or not) is data-free: it reads no calibration text "
                    "and runs no calibration pass unless --output-errors asks for its per-layer output errors. For "
                    "llama-layout checkpoints it is read straight from the files without building the model, and "
                    "the llama.cpp types Q4_0-Q8_0 and Q3_K-Q6_K without importing torch; there --threads sets the "
                    "C kernel's threads (default: OMP_NUM_THREADS, else every CPU this process may use).",
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or local Hugging Face model directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", dest="weight_format", metavar="F",
                      help="weight format (see `quantpredict formats`), e.g. mxint4, mxfp4_e2m1, int4")
    what.add_argument("--mix", default=None, metavar="NAME",
                      help="one of llama.cpp's named mixes instead of one format: q4_k_m, q5_k_m, q4_k_s, q5_k_s, "
                           "q4_k_pure, q5_k_pure, q6_k_pure, q3_k_s, q3_k_m, q3_k_l, q2_k_mix, iq4_xs_mix (its "
                           "per-layer types for this model's layers, with "
                           "llama.cpp's fallback where rows are not a multiple of 256)")
    p.add_argument("--block-size", type=options.positive(int), default=None, metavar="N",
                   help="elements per shared scale along the input dimension (default: 32 for MX, per channel for "
                        "INT/FP8)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq", help="rounding method (default: gptq)")
    p.add_argument("--smoothquant", type=float, default=None, metavar="A", help="SmoothQuant alpha in [0, 1]")
    p.add_argument("--awq", action="store_true",
                   help="AWQ's activation-aware scales (and, before RTN, its clipping search) before rounding")
    p.add_argument("--act-format", default=None, metavar="F", help="fake-quantize linear-layer inputs to F")
    p.add_argument("--act-block-size", type=options.positive(int), default=None, metavar="N",
                   help="block size of --act-format")
    p.add_argument("--calib-samples", type=options.positive(int), default=128, metavar="N",
                   help="calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=options.positive(int, minimum=2), default=256, metavar="N",
                   help="tokens per window (default 256)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by descending Hessian diagonal")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag H (0.01)")
    p.add_argument("--gptq-blocksize", type=options.positive(int), default=128, metavar="N",
                   help="GPTQ lazy-batch columns (128)")
    p.add_argument("--output-errors", action="store_true",
                   help="measure each layer's output error on calibration data even for data-free RTN (a "
                        "calibration pass, many times RTN's own cost; the saved weights are the same). GPTQ, "
                        "SmoothQuant and AWQ always report them: their calibration pass measures them anyway")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="leave this linear layer unquantized (name, suffix such as mlp.down_proj, or pattern); "
                        "repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--batch-size", type=options.positive(int), default=8, help="windows per forward pass")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    options.add_imatrix(p, "round each layer of a llama.cpp type with it (data-free RTN of llama.cpp types: "
                           "--method rtn), recorded in quantization.json")
    options.add_text(p, calib_text=True)
    options.add_device(p)
    options.add_dtype(p, "calibration's block forward passes (the model stays in its checkpoint's dtype)")
    options.add_max_memory(p)
    options.add_threads(p)
    # --threads applied by run itself: the direct path of the one-pass types never imports torch (about 1 s)
    p.set_defaults(func=run, process_threads=False)


def run(args: argparse.Namespace) -> int:
    from quantpredict.recipe import Recipe

    recipe = Recipe(
        weight_format=args.weight_format or "q4_k", block_size=args.block_size, method=args.method,
        smoothquant_alpha=args.smoothquant, act_format=args.act_format, act_block_size=args.act_block_size,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, gptq_blocksize=args.gptq_blocksize,
        percdamp=args.percdamp, act_order=args.act_order, skip=tuple(args.skip), seed=args.seed, awq=args.awq,
    )
    budget = options.max_memory(args)
    if not options.cpu_device(args):
        options.device(args)  # a device this machine lacks is refused before any work (resolving it needs torch)
    if args.mix and args.block_size is not None:
        from quantpredict.errors import RecipeError

        raise RecipeError("--block-size does not apply to --mix: llama.cpp's layouts fix their blocks")
    options.check_texts(args)
    model_dir = options.check_model(args.model)  # every input and output checked before the weights load
    options.check_out(args.out, "--out", kind="dir")
    imatrix_label = None
    if args.imatrix is not None:
        from quantpredict.imatrix import check_imatrix_recipe
        from quantpredict.imatrix import load as load_imatrix

        if not args.mix:
            check_imatrix_recipe(recipe)  # GPTQ (the default method) and non-llama.cpp formats: before the load
        imatrix_label = load_imatrix(args.imatrix)[1]  # a missing or malformed file, before the weights load
    direct = _quantize_from_files(args, recipe, model_dir)
    if direct is not None:
        return _print_report(args, *direct)
    from quantpredict.models import load
    from quantpredict.quantize import needs_calibration, quantize_model, sample_calibration, save_quantized

    options.set_process_threads(args)
    device, dtype = options.device(args), options.dtype(args)

    # the checkpoint's own dtype in memory (a bf16 checkpoint stays bf16), blocks computed in --dtype on --device
    model, tokenizer = load(args.model, dtype="auto")
    if args.mix:
        from quantpredict.mixes import named_mix

        recipe = named_mix(args.mix, model, base=recipe)
    # GPTQ, SmoothQuant and AWQ calibrate (and measure output errors on the way); plain RTN reads no text at all
    # unless --output-errors asks for the pass
    output_errors = needs_calibration(recipe, output_errors=args.output_errors)
    calib = (sample_calibration(tokenizer, recipe.calib_samples, recipe.calib_seq_len, seed=recipe.seed,
                                text_file=args.calib_text) if output_errors else None)
    if not output_errors:
        _note_unread_text(args)
    report = quantize_model(model, recipe, calib, batch_size=args.batch_size, output_errors=output_errors,
                            max_memory=budget, device=device, dtype=dtype, imatrix=args.imatrix)
    out = save_quantized(model, recipe, report, args.out, tokenizer=tokenizer, imatrix=imatrix_label)
    return _print_report(args, report, out)


def _quantize_from_files(args: argparse.Namespace, recipe, model_dir):
    """``(report, out)`` of plain RTN done from the checkpoint's files alone (:mod:`quantpredict.checkpoint_rtn`:
    the model path's result, without building the model), or ``None`` where the recipe or checkpoint needs the
    model path (``--debug`` says why). ``model_dir``: the checked model directory."""
    from quantpredict import checkpoint_rtn

    why = checkpoint_rtn.recipe_problem(recipe, mix=args.mix, output_errors=args.output_errors,
                                        imatrix=args.imatrix)
    plan = checkpoint_rtn.direct_plan(model_dir) if why is None else why
    if isinstance(plan, str):
        if getattr(args, "debug", False):
            print(f"note: quantizing through the built model: {plan}", file=sys.stderr)
        return None
    resolved = checkpoint_rtn.resolve_recipe(plan, recipe, args.mix)
    _note_unread_text(args)
    report = checkpoint_rtn.quantize_checkpoint(plan, resolved, args.out, threads=args.threads)
    return report, args.out


def _note_unread_text(args: argparse.Namespace) -> None:
    if args.calib_text is not None:
        print("note: --calib-text is not read: data-free RTN runs no calibration pass (--output-errors runs one)",
              file=sys.stderr)


def _print_report(args: argparse.Namespace, report, out) -> int:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
        print(f"saved to {out}; measure it with `quantpredict eval {out} --against {args.model}`")
    return 0
