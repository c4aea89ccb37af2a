"""reports/training_tokens.md: quantization damage against training tokens per parameter, and Ouyang's law.

    .venv/bin/python benchmarks/training_tokens_report.py [--zoo data/runs/runs.sqlite] \\
        [--long data/runs/long.sqlite] [--real data/runs/smollm2.sqlite] [--out reports/training_tokens.md]

The runs of the long-trained checkpoints (``<base>-d<NN>``) and of their base zoo models, with each model's training
tokens and non-embedding parameters from its zoo card where a run did not record them; rendered by
:func:`quantpredict.studies.training_tokens.render`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUNS = ROOT / "data" / "runs"
BASES = ("llama-xs", "opt-xs", "gpt2-xs", "llama-s")


def with_card_attributes(runs, cards: dict[str, dict]):
    """``runs`` with ``tokens_per_param`` and ``n_params_nonembed`` filled from the cards where missing."""
    runs = runs.copy()
    for col, key in (("tokens_per_param", "tokens_per_param"), ("n_params_nonembed", "n_params_nonembed")):
        from_card = runs["model"].map(lambda m, k=key: cards.get(m, {}).get(k))
        if key == "tokens_per_param":  # base zoo cards carry tokens_trained only
            derived = runs["model"].map(lambda m: cards.get(m, {}).get("tokens_trained", float("nan"))
                                        / max(cards.get(m, {}).get("n_params_nonembed", 0) or 1, 1))
            from_card = from_card.fillna(derived)
        runs[col] = runs[col].fillna(from_card) if col in runs else from_card
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", nargs="+", type=Path, default=[RUNS / "runs.sqlite"])
    ap.add_argument("--long", nargs="+", type=Path, default=[RUNS / "long.sqlite"])
    ap.add_argument("--real", nargs="+", type=Path, default=[RUNS / "smollm2.sqlite"])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "training_tokens.md")
    args = ap.parse_args(argv)
    import pandas as pd

    from quantpredict.models import zoo_card
    from quantpredict.runs.table import read_runs, sweep_setting_runs
    from quantpredict.studies.training_tokens import base_of, render, tokens_value

    runs = read_runs([p for p in args.zoo + args.long if p.exists()])
    runs = runs[runs["model"].map(base_of).isin(BASES) | runs["model"].isin(BASES)]
    real = read_runs([p for p in args.real if p.exists()]) if any(p.exists() for p in args.real) else None
    models = set(runs["model"]) | (set(real["model"]) if real is not None else set())
    cards = {}
    for m in models:
        try:
            cards[m] = zoo_card(m)
        except Exception as exc:  # a model without a card has no known training tokens
            print(f"no card for {m}: {exc}", file=sys.stderr)
    runs = with_card_attributes(runs, cards)
    if real is not None:
        real = with_card_attributes(real[real["status"] == "done"], cards)
        real = sweep_setting_runs(real)[0]
    note = ["## What the training-token count adds to the predictor", "",
            *tokens_value(pd.concat([runs, real], ignore_index=True) if real is not None else runs)]
    commands = ["quantpredict zoo build --long --threads 1   # resumable; checkpoints <base>-d<NN> in data/zoo",
                "quantpredict collect --models llama-xs-d30 ... --formats mxint8 mxint6 mxint4 mxint3 mxint2 "
                "mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1 int8 int4 int3 int2 --methods rtn gptq "
                "--store data/runs/long.sqlite --eval-max-windows 256 --threads 1",
                "python benchmarks/training_tokens_report.py"]
    path = render(runs, cards, args.out, bases=BASES, real=real, predictor_note=note, commands=commands)
    print(f"wrote {path} ({len(runs)} runs of {runs['model'].nunique()} models)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
