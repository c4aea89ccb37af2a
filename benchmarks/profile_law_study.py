"""reports/profile_law_study.md: which base quantity and which class corrections should the ``profile`` law read?

    .venv/bin/python benchmarks/profile_law_study.py [--out reports/profile_law_study.md]

Issue #28: "raise the weights-only path to measurement accuracy ... measure, then choose". Offline, from the stored
runs (no evaluation): the ``profile`` kind cross-validated exactly as ``fit --validate`` does
(:func:`quantpredict.predict.targets.folds`: leave one family out; fit xs/s/m and predict l; each real model fitted
on the zoo alone), per method class (:mod:`quantpredict.predict.classes`), for these variants of its log-space law:

- ``token-wise for all (before)``: ``log KLD = a + b log token_gn_quad + corrections`` (the design before
  session 13);
- ``cross as base``: ``token_cross_quad`` (each position's terms summed over the layers before squaring: the
  cross-layer terms at one position kept) in place of ``token_gn_quad``;
- ``+ cross column``: both, ``log token_cross_quad`` as one more column (the law weighs the two);
- ``+ awq``, ``+ awq + per-layer``: indicators of AWQ and of a per-layer recipe (named or allocated mix), as the
  law already has one for GPTQ; ``+ awq + cross column``: both;
- ``cross for AWQ (shipped)`` (``+ awq``): ``token_cross_quad`` as the base of the AWQ rows alone
  (``PhysicsPredictor(awq_base=...)``, the design shipped since), and with the AWQ indicator too.

Every variant is scored on the same runs: those with every input of every variant (``token_cross_quad`` included),
so a store that lacks it must be backfilled first (``quantpredict backfill --groups profile``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import write_between  # noqa: E402 -- benchmarks/ is the script's own folder

from quantpredict.predict import physics, targets  # noqa: E402
from quantpredict.predict.classes import METHOD_CLASSES, method_classes  # noqa: E402

STORES = ("runs.sqlite", "long.sqlite", "formats.sqlite", "alloc.sqlite", "classes.sqlite", "smollm2.sqlite",
          "qwen2.5-coder-1.5b.sqlite")
SPLITS = {"family": "Leave one family out", "largest_size": "Fit xs/s/m, predict l",
          "real": "Each real model, fitted on the zoo alone (both 4-bit on the way in: their GGUF packages)"}
#: (name, base of every row, more design columns, base of the AWQ rows)
VARIANTS = (("token-wise for all (before)", None, (), None), ("cross as base", "token_cross_quad", (), None),
            ("+ cross column", None, ("cross",), None), ("+ awq", None, ("awq",), None),
            ("+ awq + per-layer", None, ("awq", "per_layer"), None),
            ("+ awq + cross column", None, ("awq", "cross"), None),
            ("cross for AWQ (shipped)", None, (), "token_cross_quad"),
            ("cross for AWQ + awq", None, ("awq",), "token_cross_quad"))


@contextlib.contextmanager
def variant(base: str | None, columns: tuple[str, ...]):
    """The ``profile`` law with another base quantity and/or more design columns, for the duration of the block."""
    design, base0 = physics.design_columns, physics.BASE_FEATURE["profile"]

    def columns_of(kind, target, df, extra=(), awq_base=None):
        X = design(kind, target, df, extra, awq_base)
        recipe = df["recipe"].astype(str) if "recipe" in df else pd.Series("", index=df.index)
        if "cross" in columns:
            X["log_token_cross_quad"] = physics._log(physics._num(df, "token_cross_quad"))
        if "awq" in columns:
            X["awq"] = recipe.str.contains("-awq").to_numpy(float)
        if "per_layer" in columns:
            X["per_layer"] = recipe.str.contains("-L=").to_numpy(float)
        return X

    physics.design_columns = columns_of
    if base:
        physics.BASE_FEATURE["profile"] = base
    try:
        yield
    finally:
        physics.design_columns, physics.BASE_FEATURE["profile"] = design, base0


def scored_runs(runs_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    from quantpredict.runs.table import read_runs

    stores = [s for s in STORES if (runs_dir / s).exists()]
    runs = read_runs([runs_dir / s for s in stores])
    runs = physics.PhysicsPredictor("profile").usable(runs)
    cross = pd.to_numeric(runs.get("token_cross_quad"), errors="coerce").to_numpy(float)
    return runs[np.isfinite(cross)], stores


def cross_validate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, split, class): runs, KLD median relative error, 90% coverage."""
    classes = pd.Series(method_classes(runs), index=runs.index)
    rows = []
    for name, base, columns, awq_base in VARIANTS:
        with variant(base, columns), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for split in SPLITS:
                preds = [physics.PhysicsPredictor("profile", awq_base=awq_base).fit(runs[tr]).predict(runs[te])
                         for _, tr, te in targets.folds(runs, split)]
                if not preds:
                    continue
                p = pd.concat(preds)
                k = runs.loc[p.index, "kld"].to_numpy(float)
                err = np.abs(p["kld"].to_numpy(float) / k - 1)
                cover = (p["kld_low"].to_numpy(float) <= k) & (k <= p["kld_high"].to_numpy(float))
                c = classes.loc[p.index].to_numpy()
                for cls in ("all",) + METHOD_CLASSES:
                    sel = np.ones(len(c), bool) if cls == "all" else c == cls
                    if sel.any():
                        rows.append({"variant": name, "split": split, "class": cls, "runs": int(sel.sum()),
                                     "err": float(np.median(err[sel])), "cover": float(np.mean(cover[sel]))})
    return pd.DataFrame(rows)


def tables(res: pd.DataFrame, runs: pd.DataFrame, stores: list[str]) -> str:
    out = [f"Scored runs: {len(runs)} of {runs['model'].nunique()} models with every input of every variant, from "
           f"{', '.join(stores)}. Cells: KLD median relative error / 90% coverage (runs).", ""]
    for split, title in SPLITS.items():
        sub = res[res["split"] == split]
        if sub.empty:
            continue
        classes = [c for c in ("all",) + METHOD_CLASSES if c in set(sub["class"])]
        out += [f"**{title}**", "", "| variant | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for name, *_ in VARIANTS:
            cells = []
            for c in classes:
                r = sub[(sub["variant"] == name) & (sub["class"] == c)]
                cells.append("–" if r.empty else f"{100 * r['err'].iloc[0]:.1f}% / {100 * r['cover'].iloc[0]:.0f}% "
                             f"({int(r['runs'].iloc[0])})")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "profile_law_study.md"))
    ap.add_argument("--runs-dir", default=str(ROOT / "data" / "runs"))
    args = ap.parse_args(argv)
    runs, stores = scored_runs(Path(args.runs_dir))
    res = cross_validate(runs)
    text = tables(res, runs, stores)
    print(text)
    write_between(Path(args.out), "profile_law_study:tables", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
