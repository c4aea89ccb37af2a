"""Write ``features_reference.json``: every feature of zoo model ``llama-s`` under mxint4 RTN and GPTQ on a fixed
calibration batch, as the code computed them before the bounded-memory paths (commit 78d6e99).

Run from a checkout of that commit, one torch thread (the reference's float32 sums follow the thread count):

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/data/make_features_reference.py tests/data/features_reference.json

``tests/test_memory.py`` recomputes them with today's code and asserts agreement within each feature's float32
rounding (the tolerances are derived there; the machine recorded here need not be the one testing).
"""

from __future__ import annotations

import json
import sys

import torch

from quantpredict import models
from quantpredict.data import load_text
from quantpredict.features import extract
from quantpredict.quantize import Recipe

MODEL = "llama-s"
RECIPES = ("mxint4-rtn", "mxint4-gptq")


def reference_windows(tokenizer) -> torch.Tensor:
    """8 windows of 256 tokens: the first 2048 tokens of WikiText-2 train (a 40k-character prefix tokenized)."""
    ids = tokenizer(load_text("wikitext2", "train")[:40_000], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: 8 * 256], dtype=torch.long).view(8, 256)


def main(out: str) -> None:
    torch.set_num_threads(1)
    model, tok = models.load(MODEL, attn_implementation="eager")
    windows = reference_windows(tok)
    result = {}
    for label in RECIPES:
        fmt, method = label.split("-")
        feats = extract(model, Recipe(weight_format=fmt, method=method), windows)
        result[label] = {k: v for k, v in feats.items() if not k.endswith("_seconds")}
    with open(out, "w") as fh:
        json.dump({"model": MODEL, "code": "78d6e99", "threads": 1, "features": result}, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
