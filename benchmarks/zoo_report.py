"""Write reports/zoo.md: every zoo model's size, training budget and WikiText-2 perplexity, against a unigram
baseline measured on the same tokens (add-one smoothed train unigram frequencies, scored on the test split)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from quantpredict.data import token_ids
from quantpredict.models import list_zoo, zoo_card
from quantpredict.models.tokenizer import load_or_train_tokenizer
from quantpredict.models.zoo import zoo_root

OUT = Path(__file__).resolve().parent.parent / "reports" / "zoo.md"


def unigram_ppl(tok) -> float:
    train, test = token_ids(tok, "wikitext2", "train"), token_ids(tok, "wikitext2", "test")
    counts = torch.bincount(train, minlength=len(tok)).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[test].mean().item())


def main() -> None:
    tok = load_or_train_tokenizer(zoo_root() / "tokenizer")
    base = unigram_ppl(tok)
    lines = [
        "# The model zoo",
        "",
        "Small causal LMs of four Hugging Face architectures, trained from scratch on WikiText-2 train by "
        "`quantpredict zoo build` (seeded, resumable), with one byte-level BPE tokenizer (vocab 4096) for all. "
        "Perplexity is measured on the WikiText-2 valid and test splits (non-overlapping windows of 256 tokens, "
        "the bf16-stored weights loaded in float32). `-tNN` models are snapshots at NN% of their model's token "
        "budget. `-dNN` models are the long-trained checkpoints, NN training tokens per non-embedding parameter "
        "(multi-epoch over WikiText-2 and TinyShakespeare train, WSD schedule; `reports/training_tokens.md`).",
        "",
        f"Unigram baseline (add-one smoothed train frequencies, same tokenizer): test perplexity **{base:.1f}**.",
        "",
        "| model | family | non-emb params | total params | tokens | tokens/param | valid ppl | test ppl (NLL +- SE) "
        "| vs unigram | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list_zoo():
        c = zoo_card(name)
        test = c.get("test_ppl")
        nll = f" ({c['test_nll']:.3f} +- {c['test_nll_se']:.3f})" if "test_nll" in c else ""
        ratio = f"{base / test:.1f}x lower" if test else "n/a"
        lines.append(f"| {name} | {c['family']} | {c['n_params_nonembed']:,} | {c['n_params_total']:,} | "
                     f"{c['tokens_trained']:,} | {c['tokens_trained'] / c['n_params_nonembed']:.1f} | "
                     f"{c.get('valid_ppl', 'n/a')} | {test}{nll} | {ratio} | "
                     f"{c['train_seconds']:.0f} |")
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
