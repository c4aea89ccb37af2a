"""``quantpredict study ptq-vs-qat [--models ...] [--formats ...] [--steps N] [--max-windows N] --out DIR``."""

from __future__ import annotations

import argparse
import shlex
import sys

from quantpredict.cli import options


def register(subparsers) -> None:
    from quantpredict.qat.study import STUDY_FORMATS, StudySettings

    d = StudySettings()
    p = subparsers.add_parser(
        "study", help="studies: ptq-vs-qat",
        description="Reproducible studies. ptq-vs-qat: WikiText-2 test perplexity of FP, RTN, GPTQ, QAT from RTN and "
                    "QAT from GPTQ at the same calibration budget, with the local-objective vs global-NLL paths; "
                    "writes OUT/qat_results.jsonl (appended as cells finish, resumable), OUT/qat.md and figures.")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    q = sub.add_parser("ptq-vs-qat", help="PTQ (RTN, GPTQ) vs QAT at the same data budget, and the misalignment")
    q.add_argument("--models", nargs="+", default=None, metavar="M",
                   help="zoo names or model directories (default: every zoo model present)")
    q.add_argument("--formats", default=",".join(STUDY_FORMATS), metavar="F,F",
                   help=f"comma-separated weight formats (default {','.join(STUDY_FORMATS)})")
    q.add_argument("--steps", type=int, default=d.steps, help=f"QAT steps (default {d.steps})")
    q.add_argument("--lr", type=float, default=d.lr, help=f"QAT peak learning rate (default {d.lr:g})")
    q.add_argument("--batch-size", type=int, default=d.batch_size, help=f"QAT windows per step ({d.batch_size})")
    q.add_argument("--calib-samples", type=int, default=d.calib_samples, help="calibration windows (128)")
    q.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len, help="tokens per window (256)")
    q.add_argument("--max-windows", type=int, default=d.max_windows,
                   help=f"test windows of 256 tokens (default {d.max_windows}; 0 = the whole test split)")
    q.add_argument("--track-windows", type=int, default=d.track_windows,
                   help=f"test-prefix windows for the trajectory NLLs ({d.track_windows})")
    q.add_argument("--track-every", type=int, default=d.track_every, help=f"QAT steps between points ({d.track_every})")
    q.add_argument("--seed", type=int, default=d.seed, help="calibration windows and minibatch order seed")
    q.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    q.add_argument("--pending", default="", help="a note on what is still to run, printed in the report")
    q.add_argument("--report-only", action="store_true", help="re-render the report from OUT/qat_results.jsonl")
    q.add_argument("--out", default="reports", metavar="DIR", help="output folder (default reports/)")
    options.add_device(q)
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from quantpredict.errors import DataError
    from quantpredict.models import list_zoo
    from quantpredict.qat.report import render_report
    from quantpredict.qat.study import RESULTS_FILE, StudySettings, read_results, run_study

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    results = out / RESULTS_FILE
    # a --report-only rendering reproduces nothing: the page prints the study's own reproduction command instead
    command = ("quantpredict " + " ".join(shlex.quote(a) for a in sys.argv[1:])
               if sys.argv[1:] and not args.report_only else "")
    if not args.report_only:
        models = args.models or list_zoo()
        if not models:
            raise DataError("no models: the zoo is empty; pass --models or build the zoo (`quantpredict zoo build`)")
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        settings = StudySettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                 calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                 max_windows=args.max_windows or None, track_windows=args.track_windows,
                                 track_every=args.track_every, seed=args.seed)
        run_study(models, formats, settings=settings, results=results, device=options.device(args))
    records = read_results(results)
    if not records:
        raise DataError(f"{results} holds no results; run the study without --report-only first")
    path = render_report(records, out, command=command, pending=args.pending)
    print(f"wrote {path} ({len(records)} model x format cells) and its figures")
    return 0
