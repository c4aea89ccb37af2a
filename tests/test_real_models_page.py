"""reports/real_models.md's renderer on hand-built runs: the measured table's numbers, and a model whose runs no
predictor could read is told why, not left under an empty heading."""

from __future__ import annotations

import pandas as pd

from quantpredict.studies.real_models import render


def _runs() -> pd.DataFrame:
    base = {"model": "tiny-real", "method": "rtn", "eval_windows": 32, "seq_len": 256, "eval_tokens": 8160,
            "ppl_fp": 20.0, "nll_quant_se": 0.05, "kld_se": 0.001, "top1_agreement_pct_se": 0.2}
    return pd.DataFrame([
        {**base, "recipe": "mxint8-rtn", "weight_format": "mxint8", "bits_per_element": 8.25, "ppl_quant": 20.1,
         "kld": 0.0004, "top1_agree": 0.99},
        {**base, "recipe": "mxint4-rtn", "weight_format": "mxint4", "bits_per_element": 4.25, "ppl_quant": 22.0,
         "kld": 0.1148, "top1_agree": 0.82},
    ])


def test_measured_rows_and_the_reason_no_prediction_is_shown(tmp_path):
    out = render(_runs(), [("`physics` fitted on the zoo alone", pd.DataFrame())], tmp_path / "p.md",
                 cards={}, commands=["python benchmarks/real_models_report.py"])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mxint4-rtn"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4.25"
    assert cells[2] == f"22.00 ± {22.0 * 0.05:.2f}"  # ppl SE by the delta method: ppl x SE(NLL)
    assert cells[3] == f"{100 * (22.0 / 20.0 - 1):+.1f}%" == "+10.0%"
    assert cells[4] == "0.1148 ± 0.0010"
    # the higher-bit recipe is listed first
    assert text.index("| mxint8-rtn") < text.index("| mxint4-rtn")
    heading = text.index("### What the predictors said before seeing this model")
    assert "No run of this model has the features" in text[heading:] and "quantpredict backfill" in text[heading:]


def test_method_classes_and_their_error_rows():
    from quantpredict.studies.real_models import class_table, method_class

    runs = pd.DataFrame([
        {"recipe": "mxint4-rtn", "method": "rtn", "act_format": None, "kld": 0.10},
        {"recipe": "mxint4-gptq", "method": "gptq", "act_format": None, "kld": 0.08},
        {"recipe": "mxint4-rtn-awq", "method": "rtn", "act_format": None, "kld": 0.09},
        {"recipe": "q4_k-rtn-L=q4_k*2,q6_k", "method": "rtn", "act_format": None, "kld": 0.01},
        {"recipe": "mxint4-rtn-sq0.5-a_mxint8", "method": "rtn", "act_format": "mxint8", "kld": 0.20},
    ])
    assert list(runs.apply(method_class, axis=1)) == ["RTN", "GPTQ", "AWQ", "named mix", "weight+activation"]
    pred = pd.DataFrame({"kld": [0.11, 0.06, 0.09, 0.01, 0.30], "kld_low": [0.05, 0.07, 0.0, 0.0, 0.25],
                         "kld_high": [0.2, 0.1, 1.0, 1.0, 0.35]})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in class_table(runs, pred).splitlines()[2:]}
    assert rows["RTN"][1:] == ["1", "10.0%", "–", "100%"]  # |0.11/0.10 - 1| = 10%, inside [0.05, 0.2]
    assert rows["GPTQ"][1:] == ["1", "25.0%", "–", "100%"]  # 0.06 vs 0.08
    assert rows["weight+activation"][1:] == ["1", "50.0%", "–", "0%"]  # 0.30 vs 0.20, outside [0.25, 0.35]


def test_runs_on_two_window_counts_show_each_count_and_fp_side(tmp_path):
    """A recipe measured on more windows (for its standard error) gets a windows column, and the heading gives the
    FP perplexity of each window count: each row's delta is against the FP model on its own windows."""
    runs = _runs()
    extra = runs.iloc[1].to_dict() | {"recipe": "int4-gptq", "method": "gptq", "eval_windows": 64,
                                      "eval_tokens": 16320, "ppl_fp": 21.0, "ppl_quant": 23.1}
    runs = pd.concat([runs, pd.DataFrame([extra])], ignore_index=True)
    text = render(runs, [], tmp_path / "p.md", cards={}, commands=[]).read_text()
    assert "FP perplexity 20.00 on 32 windows of 256 tokens (8,160 predicted tokens) (2 runs); 21.00 on 64 windows" \
        in text
    header = next(line for line in text.splitlines() if line.startswith("| recipe | bits"))
    assert "| windows |" in header
    row = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| int4-gptq"))
           .strip("|").split("|")]
    assert row[2] == "64" and row[4] == "+10.0%"  # 23.1 against its own FP side, 21.0
