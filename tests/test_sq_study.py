"""The SmoothQuant+GPTQ study: outlier measurement on tiny models, and its verdicts on synthetic results files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model

from quantpredict import arch
from quantpredict.quantize.outliers import outlier_profile, smoothing_local_errors
from quantpredict.studies.sq_study import SQSettings, claims, layer_gains, sq_command, sq_gain, sq_sections

N = 16


def _windows(n=6, seq=24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


def _outlier_model(family: str, boost: float = 30.0):
    """A tiny model whose first block's norms carry 3 outlier channels (the second block's are left flat)."""
    model = tiny_model(family)
    with torch.no_grad():
        for pair in arch.smooth_pairs(model, 0):
            pair.norm.weight[:3] *= boost
    return model


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_outlier_ratio_finds_the_boosted_channels(family):
    model = _outlier_model(family)
    pairs, absmax = outlier_profile(model, _windows())
    assert len(pairs) == 2 * len(arch.blocks(model))
    by_block = {(p.block, p.norm): p for p in pairs}
    first = [p for (b, _), p in by_block.items() if b == 0]
    rest = [p for (b, _), p in by_block.items() if b == 1]
    assert all(p.ratio > 10 and p.top_channel < 3 for p in first)
    assert all(p.ratio < min(q.ratio for q in first) for p in rest)
    p = pairs[0]
    a = absmax[p.norm].double()
    assert p.ratio == pytest.approx(float(a.max() / a.median())) and p.channels == a.numel()


def test_smoothing_lowers_the_local_error_where_the_outliers_are():
    model = _outlier_model("llama", boost=50.0)
    windows = _windows()
    pairs, absmax = outlier_profile(model, windows)
    errs = smoothing_local_errors(model, windows[:2], absmax, ["mxint8"], [None, 0.5], act_format="mxint4")
    assert len(errs) == len(pairs) * 2
    e = {(x.norm, x.alpha): x.error for x in errs}
    outlier_pair = pairs[0].norm
    assert e[(outlier_pair, 0.5)] < e[(outlier_pair, None)]  # mxint4 activations with 50x outliers: smoothing helps
    # no smoothing (s = 1) and FP-exact formats: the error is that of the formats alone, never negative
    assert all(x.error >= 0 for x in errs)


# ---- verdicts on synthetic records ------------------------------------------------------------------------------


def _run(model, fmt, alpha, act, d, kld, seed):
    rng = np.random.default_rng(seed)
    win = d + rng.normal(0, 0.01, N)
    wk = kld + rng.normal(0, 0.001, N)
    return {"kind": "run", "model": model, "card": {}, "settings": SQSettings().to_dict(), "format": fmt,
            "alpha": alpha, "act_format": act, "method": "gptq", "label": f"{fmt}-{alpha}-{act}", "ppl_fp": 20.0,
            "ppl": 20.0 * math.exp(d), "delta_nll": float(win.mean()), "delta_nll_se": 0.0025, "kld": float(wk.mean()),
            "kld_se": 0.0003, "top1": 90.0, "top1_se": 0.5, "eval_tokens": N * 255, "windows": N,
            "window_delta_nll": [float(x) for x in win], "window_kld": [float(x) for x in wk],
            "window_tokens": [255] * N,
            "size": {"effective_bits_per_param": 4.25, "model_bits_per_param": 5.0, "size_bytes": 1e6,
                     "bf16_size_bytes": 3.2e6, "compression_ratio": 3.2, "quantized_params": 10, "total_params": 12},
            "quantize_seconds": 1.0, "seconds": 2.0, "cpu_seconds": 1.5, "max_rss_gb": 1.0}


def _outliers(model, ratios, gains, formats=("mxint4",), alphas=(0.5,)):
    pairs = [{"block": i // 2, "norm": f"n{i}", "linears": [f"b{i}.self_attn.q" if i % 2 == 0 else f"b{i}.mlp.up"],
              "channels": 64, "max": r, "median": 1.0, "ratio": r, "top_channel": 0, "p99_ratio": 1.5}
             for i, r in enumerate(ratios)]
    local = []
    for p, g in zip(pairs, gains):
        for f in formats:
            local.append({"norm": p["norm"], "weight_format": f, "alpha": None, "error": 1.0})
            for a in alphas:
                local.append({"norm": p["norm"], "weight_format": f, "alpha": a, "error": 1.0 - g})
    return {"kind": "outliers", "model": model, "card": {}, "settings": SQSettings().to_dict(), "pairs": pairs,
            "local": local, "seconds": 3.0, "cpu_seconds": 2.0}


def _study(sq_effect_by_model):
    """Per model: base W+A8 delta NLL 0.2, SQ(0.5) at 0.2 - effect; outliers whose local gain rises with the ratio."""
    recs = []
    for k, (model, effect) in enumerate(sq_effect_by_model.items()):
        ratios = [1.5 + j + 3 * k for j in range(10)]
        recs.append(_outliers(model, ratios, [0.01 * r for r in ratios]))
        for j, fmt in enumerate(("mxint4", "int4")):
            recs.append(_run(model, fmt, None, "mxint8", 0.2, 0.05, seed=100 * k + 10 * j))
            recs.append(_run(model, fmt, 0.5, "mxint8", 0.2 - effect, 0.05 - effect / 4, seed=100 * k + 10 * j + 1))
            recs.append(_run(model, fmt, None, None, 0.15, 0.04, seed=100 * k + 10 * j + 2))
    return recs


def test_sq_verdicts_per_model_and_across_models():
    recs = _study({"a-m": 0.05, "b-m": 0.0, "c-m": 0.1, "d-m": 0.15, "e-m": 0.2})
    vs = {(v.claim.split(" before")[0] + (" KLD" if "KLD" in v.claim else ""), v.scope): v for v in claims(recs)}
    assert vs[("SmoothQuant (alpha 0.5)", "a-m")].verdict == "holds"
    assert vs[("SmoothQuant (alpha 0.5)", "b-m")].verdict == "undecided"  # no effect: within noise
    assert vs[("SmoothQuant (alpha 0.5) KLD", "c-m")].verdict == "holds"
    assert vs[("MXINT8 activations raise the NLL on top of GPTQ's weights", "a-m")].verdict == "holds"  # +0.05
    layers = [v for v in claims(recs) if "across layers" in v.claim]
    assert {v.verdict for v in layers} == {"holds"}  # the local gain rises with the ratio in every model
    (across,) = [v for v in claims(recs) if "across models" in v.scope]
    # effects ordered b < a < c < d < e and median ratios a < b < c < d < e: rho 0.9 on 5 models, se 0.75
    assert across.verdict == "undecided" and across.mean == pytest.approx(0.9)


def test_the_seed_claim_of_a_small_perplexity_cost_is_judged_against_3_percent():
    """log(1.03) = 0.0296 nats: a delta of 0.01 (se 0.0025) is within the budget, 0.2 is far over it; int4 cells
    and the cells without SmoothQuant do not count."""
    recs = _study({"a-m": 0.19, "b-m": 0.0})  # SQ(0.5) deltas: a-m 0.01, b-m 0.2
    cost = [v for v in claims(recs) if v.claim.startswith("SmoothQuant+GPTQ in MX formats")]
    (a,), (b,) = ([v for v in cost if v.scope.startswith(m)] for m in ("a-m", "b-m"))
    assert a.scope == "a-m mxint4 (3.20x smaller)"  # one verdict per MX format, int4 left out
    assert a.claim.endswith("costs at most 3% perplexity") and (a.verdict, a.cells) == ("holds", 1)
    assert b.verdict == "fails" and b.mean == pytest.approx(math.log(1.03) - 0.2, abs=0.01)


def test_sq_gain_is_paired_and_layer_gains_match_pairs():
    base = _run("a", "mxint4", None, "mxint8", 0.2, 0.05, 1)
    sq = _run("a", "mxint4", 0.5, "mxint8", 0.1, 0.05, 2)
    mean, se = sq_gain(base, sq)
    d = np.array(base["window_delta_nll"]) - np.array(sq["window_delta_nll"])
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / math.sqrt(N))
    o = _outliers("a", [2.0, 5.0], [0.1, 0.3])
    assert layer_gains(o, "mxint4", 0.5) == ([2.0, 5.0], pytest.approx([0.1, 0.3]))


def test_sq_sections_render_from_a_results_file(tmp_path):
    from quantpredict.studies.sq_study import read_records

    recs = _study({"smollm2-135m": 0.05}) + _study({"fam-xs-d30": 0.0})
    path = tmp_path / "sq_results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = sq_sections(read_records(path))
    assert text.index("a real model (smollm2-135m)") < text.index("long-trained checkpoints (fam-xs)")
    assert ("| SmoothQuant (alpha 0.5) before GPTQ lowers the NLL with MXINT8 activations | smollm2-135m | "
            "**holds** | 2 / 0 / 2 |") in text
    assert "| smollm2-135m | mxint4 | 20.000 |" in text and "| 3.20 |" in text
    assert "ratio, attention inputs" in text
    assert sq_command(recs[:5]).startswith("quantpredict study smoothquant --models smollm2-135m --formats "
                                           "mxint4,int4 --alphas 0.5 --max-windows 64")


# ---- the run store's copies of the study's models --------------------------------------------------------------


def _store_row(model, fmt, alpha, act, delta, recipe=None):
    """A run store row as ``read_runs`` gives it: NaN (not None) where a number or string is missing."""
    nan = float("nan")
    label = recipe or "-".join([fmt, "gptq"] + ([f"sq{alpha:g}"] if alpha else []) + ([f"a_{act}"] if act else []))
    return {"model": model, "recipe": label, "weight_format": fmt, "method": "gptq", "status": "done",
            "block_size": 32, "smoothquant_alpha": nan if alpha is None else alpha, "act_format": act or nan,
            "ppl_fp": 20.0, "ppl_quant": 20.0 * math.exp(delta), "delta_nll": delta, "delta_nll_se": 0.004,
            "kld": delta / 2, "eval_windows": 128}


def test_store_rows_reproduce_the_results_files_resolved_gains_and_render():
    from quantpredict.studies.sq_study import store_agreement, store_cells, store_section

    recs = _study({"a-m": 0.05, "b-m": 0.0})  # a-m: SQ gain 0.05 (resolved at se ~0.003); b-m: within noise
    rows = [_store_row("a-m", "mxint4", None, None, 0.15), _store_row("a-m", "mxint4", None, "mxint8", 0.20),
            _store_row("a-m", "mxint4", 0.5, "mxint8", 0.16),  # same sign as the results file
            _store_row("a-m", "int4", None, "mxint8", 0.20), _store_row("a-m", "int4", 0.5, "mxint8", 0.21),  # reverse
            _store_row("b-m", "mxint4", None, "mxint8", 0.2), _store_row("b-m", "mxint4", 0.5, "mxint8", 0.1),
            _store_row("a-m", "mxint4", None, None, 9.0, recipe="mxint4_b128-gptq")]  # another block size: ignored
    cells = store_cells(rows)
    assert cells[("a-m", "mxint4", None, None)]["delta_nll"] == 0.15  # the b128 run did not replace it
    assert ("a-m", "mxint4", 0.5, "mxint8") in cells and len(cells) == 7
    # results-file cells in the store: a-m mxint4, a-m int4 (both resolved), b-m mxint4 (not resolved)
    assert store_agreement(recs, rows) == (1, 2, 3)
    text = store_section(recs, rows, "data/runs/x.sqlite", ["a-m"], command="quantpredict collect --models <models>")
    assert "**1 of the 2** cells" in text and "(cells in both: 2)" in text  # only a-m's cells
    assert "- Reproduce (resumable): `quantpredict collect --models a-m`" in text
    assert ("| a-m | mxint4 | 128 | 20.000 | 23.237 (+0.1500 ± 0.0040; KLD 0.0750) | 24.428 (+0.2000 ± 0.0040; "
            "KLD 0.1000) | 23.470 (+0.1600 ± 0.0040; KLD 0.0800) |") in text
    assert "| a-m | int4 | 128 | 20.000 | n/a |" in text
    assert store_section(recs, rows, "x", ["zz-m"]) == ""  # a model the store does not hold
