"""``quantpredict study ptq-vs-qat [--models ...] [--formats ...] [--steps N] [--lr LR ...] [--results SET] --out DIR``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from quantpredict.cli import options


def register(subparsers) -> None:
    from quantpredict.studies.study import RESULTS_FILES, STUDY_FORMATS, RunOptions, StudySettings

    d = StudySettings()
    o = RunOptions  # the field defaults, read off the class: an instance validates against quantpredict.qat, whose
    # import (torch, transformers) would cost every command seconds while the parser is built
    p = subparsers.add_parser(
        "study", help="studies: ptq-vs-qat",
        description="Reproducible studies. ptq-vs-qat: WikiText-2 test perplexity of FP, RTN, GPTQ, QAT from RTN and "
                    "QAT from GPTQ at the same calibration budget, with the local-objective vs global-NLL paths; "
                    "writes OUT/qat_results.jsonl (the zoo) or OUT/qat_hurts_results.jsonl (--results hurts: models "
                    "where quantization hurts), appended as cells finish (resumable), and OUT/qat.md with figures "
                    "from both.")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    q = sub.add_parser("ptq-vs-qat", help="PTQ (RTN, GPTQ) vs QAT at the same data budget, and the misalignment")
    q.add_argument("--models", nargs="+", default=None, metavar="M",
                   help="zoo or registry names, or model directories (filed under their last path part; default: "
                        "every zoo model present)")
    q.add_argument("--formats", default=",".join(STUDY_FORMATS), metavar="F,F",
                   help=f"comma-separated weight formats (default {','.join(STUDY_FORMATS)})")
    q.add_argument("--steps", type=int, default=d.steps, help=f"QAT steps (default {d.steps})")
    q.add_argument("--lr", type=float, nargs="+", default=[d.lr], metavar="LR",
                   help=f"QAT peak learning rate(s); several: each model runs every format at the first, then the "
                        f"next (default {d.lr:g})")
    q.add_argument("--batch-size", type=int, default=d.batch_size, help=f"QAT windows per step ({d.batch_size})")
    q.add_argument("--calib-samples", type=int, default=d.calib_samples, help="calibration windows (128)")
    q.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len, help="tokens per window (256)")
    q.add_argument("--max-windows", type=int, default=d.max_windows,
                   help=f"test windows of 256 tokens (default {d.max_windows}; 0 = the whole test split)")
    q.add_argument("--track-windows", type=int, default=d.track_windows,
                   help=f"test-prefix windows for the trajectory NLLs ({d.track_windows})")
    q.add_argument("--track-every", type=int, default=d.track_every, help=f"QAT steps between points ({d.track_every})")
    q.add_argument("--seed", type=int, default=d.seed, help="calibration windows and minibatch order seed")
    q.add_argument("--results", choices=tuple(RESULTS_FILES), default="zoo",
                   help="which results file the cells go to: zoo (qat_results.jsonl, the shipped study) or hurts "
                        "(qat_hurts_results.jsonl: real and long-trained models, reported above the zoo)")
    q.add_argument("--ptq-points", choices=("layer", "block"), default=o.ptq_points,
                   help="PTQ trajectory points after every layer or every transformer block (default "
                        f"{o.ptq_points}; block: far cheaper on deep models, same numbers at those points)")
    q.add_argument("--reference-dtype", choices=("float64", "float32"), default=o.reference_dtype,
                   help=f"dtype of the local objective's FP weights and Hessians (default {o.reference_dtype})")
    q.add_argument("--micro-batch-size", type=int, default=None, metavar="N",
                   help="QAT forward/backward passes of at most N windows, gradients accumulated (default: the "
                        "whole batch; bounds activation memory)")
    q.add_argument("--fp-control", action="store_true",
                   help="also fine-tune the FP model at each lr's data budget (the control: what fine-tuning on the "
                        "calibration text gains without quantization), once per model and lr, into "
                        "OUT/qat_fp_control.jsonl (resumable); the report pairs it with the cells")
    q.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars (one line per finished cell)")
    q.add_argument("--pending", default="", help="a note on what is still to run, printed in the report")
    q.add_argument("--report-only", action="store_true", help="re-render the report from OUT/qat_results.jsonl")
    q.add_argument("--out", default="reports", metavar="DIR", help="output folder (default reports/)")
    options.add_device(q)
    q.set_defaults(func=run)

    from quantpredict.studies.sq_study import ALPHAS, SQ_FORMATS, SQSettings

    sd = SQSettings()
    sq = sub.add_parser("smoothquant", help="SmoothQuant+GPTQ with MXINT8 activations, and the activation outliers",
                        description="GPTQ with MXINT8 activations, without and after SmoothQuant at each alpha, and "
                                    "GPTQ with FP activations, per weight format: WikiText-2 test perplexity, delta "
                                    "NLL and KLD against the FP model with standard errors, and the size; plus the "
                                    "activation outliers at every smoothed linear's input and SmoothQuant's local "
                                    "error per layer. Appends to OUT/sq_results.jsonl (resumable); "
                                    "`python benchmarks/ptq_report.py --render-only` puts it on reports/ptq.md.")
    sq.add_argument("--models", nargs="+", required=True, metavar="M",
                    help="zoo or registry names, or model directories (filed under their last path part)")
    sq.add_argument("--formats", default=",".join(SQ_FORMATS), metavar="F,F",
                    help=f"comma-separated weight formats (default {','.join(SQ_FORMATS)})")
    sq.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), metavar="A",
                    help=f"SmoothQuant migration strengths (default {' '.join(f'{a:g}' for a in ALPHAS)})")
    sq.add_argument("--max-windows", type=int, default=sd.max_windows,
                    help=f"test windows of 256 tokens (default {sd.max_windows}; 0 = the whole test split)")
    sq.add_argument("--calib-samples", type=int, default=sd.calib_samples, help="calibration windows (128)")
    sq.add_argument("--calib-seq-len", type=int, default=sd.calib_seq_len, help="tokens per window (256)")
    sq.add_argument("--local-windows", type=int, default=sd.local_windows,
                    help=f"calibration windows for the per-layer local errors ({sd.local_windows})")
    sq.add_argument("--no-weights-only", action="store_true",
                    help="skip the GPTQ runs with FP activations (the reference for the activations' cost)")
    sq.add_argument("--fp-cache-dir", default=None, metavar="DIR",
                    help="keep FP logits there between comparisons when they exceed 2 GiB (deleted afterwards)")
    sq.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    sq.add_argument("--out", default="reports", metavar="DIR", help="output folder (default reports/)")
    sq.set_defaults(func=run_smoothquant)


def run(args: argparse.Namespace) -> int:

    import torch

    from quantpredict.errors import DataError
    from quantpredict.models import list_zoo
    from quantpredict.studies.qat_report import render_report
    from quantpredict.studies.study import (
        CONTROL_FILE,
        RESULTS_FILES,
        RunOptions,
        StudySettings,
        read_results,
        run_study,
    )

    torch.set_num_threads(max(1, args.threads))
    out = options.check_out(args.out, "--out", kind="dir")
    results = out / RESULTS_FILES[args.results]
    # a --report-only rendering reproduces nothing: the page prints the study's own reproduction command instead
    command = ("quantpredict " + " ".join(shlex.quote(a) for a in sys.argv[1:])
               if sys.argv[1:] and not args.report_only else "")
    if not args.report_only:
        if not args.models:
            from quantpredict.data import data_dir

            data_dir()  # the zoo is in the data folder: no folder is the error naming $QUANTPREDICT_DATA
        models = args.models or list_zoo()
        if not models:
            raise DataError("no models: the zoo is empty; pass --models or build the zoo (`quantpredict zoo build`)")
        for m in models:
            options.check_model(m)
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        settings = [StudySettings(steps=args.steps, lr=lr, batch_size=args.batch_size,
                                  calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                  max_windows=args.max_windows or None, track_windows=args.track_windows,
                                  track_every=args.track_every, seed=args.seed) for lr in args.lr]
        run_options = RunOptions(ptq_points=args.ptq_points, reference_dtype=args.reference_dtype,
                             micro_batch_size=args.micro_batch_size)
        run_study(models, formats, settings=settings, results=results, options=run_options,
                  progress=not args.no_progress, device=options.device(args), fp_control=args.fp_control)
    records = read_results(out / RESULTS_FILES["zoo"])
    hurts = read_results(out / RESULTS_FILES["hurts"])
    controls = read_results(out / CONTROL_FILE)
    if not records and not hurts:
        raise DataError(f"{out} holds no study results; run the study without --report-only first")
    path = render_report(records, out, command=command if args.results == "zoo" else "", pending=args.pending,
                         hurts=hurts, controls=controls)
    print(f"wrote {path} ({len(records)} zoo cells, {len(hurts)} cells where quantization hurts) and its figures")
    return 0


def run_smoothquant(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quantpredict.studies.sq_study import RESULTS_FILE, SQSettings, run_sq_study

    torch.set_num_threads(max(1, args.threads))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for m in args.models:
        options.check_model(m)
    options.check_out(args.out, "--out", kind="dir")
    options.check_out(args.fp_cache_dir, "--fp-cache-dir", kind="dir")
    settings = SQSettings(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                          max_windows=args.max_windows or None, local_windows=args.local_windows)
    results = Path(args.out) / RESULTS_FILE
    records = run_sq_study(args.models, formats, args.alphas, settings=settings, results=results,
                           weights_only=not args.no_weights_only, fp_cache_dir=args.fp_cache_dir)
    print(f"{results}: {len(records)} records; render reports/ptq.md with `python benchmarks/ptq_report.py "
          "--render-only`")
    return 0
