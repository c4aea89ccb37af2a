"""Allocated recipes for the store: per-layer formats at three bit budgets for zoo models and SmolLM2.

    .venv/bin/python benchmarks/allocation_runs.py --models llama-m opt-l ... --budget-formats mxint3 mxint4 mxint6 \\
        --methods rtn --out data/runs/allocations.json

The budget of each allocation is the bits per element the uniform recipe of that format has on that model (a
partial last block of a row costs a whole scale, so mxint4 is 4.25 bits only where rows are multiples of 32). The
uniform recipes are in the sweeps already, so the comparison needs only the allocated runs. Writes
``{model: {"rtn@mxint4": {"recipe": label, ...}}}``; `quantpredict collect --recipes-file` reads the labels of a
model from ``{"recipe": ...}`` entries (see the queue job that runs them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--budget-formats", nargs="+", default=["mxint3", "mxint4", "mxint6"])
    ap.add_argument("--methods", nargs="+", default=["rtn"])
    ap.add_argument("--out", required=True, help="output .json: {model: [labels]}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from quantpredict.predict.allocate import DEFAULT_CANDIDATES, allocate
    from quantpredict.predict.rank import profile_model, recipe_row
    from quantpredict.recipe import Recipe

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    for model in args.models:
        mp = profile_model(model)
        labels = done.get(model, {})
        for method in args.methods:
            for fmt in args.budget_formats:
                key = f"{method}@{fmt}"
                if key in labels:
                    continue
                b = recipe_row(mp, Recipe(fmt, method=method))["bits_per_element"]
                res = allocate(model, b, candidates=("mxint2",) + DEFAULT_CANDIDATES, method=method,
                               predictor=None, profile=mp)
                labels[key] = {"recipe": res.recipe.label, "budget": b, "bits_per_element": res.bits_per_element,
                               "objective": res.objective, "best_uniform": res.best_uniform,
                               "seconds": res.seconds}
                print(f"{model} {key}: {res.bits_per_element:.3f} bits, objective {res.objective:.5f} vs best "
                      f"uniform {res.best_uniform}", flush=True)
                done[model] = labels
                out.write_text(json.dumps(done, indent=1) + "\n")
        del mp
    return 0


if __name__ == "__main__":
    sys.exit(main())
