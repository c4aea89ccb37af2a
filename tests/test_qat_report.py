"""The study's report: verdict arithmetic on hand-made records, and that the page and figures are written."""

from __future__ import annotations

import math

import pytest

from quantpredict.studies.qat_report import render_report, statement, verdicts
from quantpredict.studies.study import StudySettings, _paired, _spearman


def _record(fmt, d_gptq, d_qat, se=0.001, model="m-xs"):
    """A study cell whose GPTQ raises NLL by d_gptq and whose QAT<-GPTQ sits d_qat from GPTQ (QAT<-RTN worse)."""
    fp = 3.0
    nll = {"fp": fp, "rtn": fp + 2 * d_gptq, "gptq": fp + d_gptq, "qat_rtn": fp + d_gptq + abs(d_qat) + 0.01,
           "qat_gptq": fp + d_gptq + d_qat}
    methods = {m: {"nll": v, "ppl": math.exp(v), "delta_nll": v - fp, "delta_nll_se": se} for m, v in nll.items()}
    path = [{"step": i, "nll": fp + d_gptq * i / 2, "local": float(i), "local_rel": i / 10, "distance": float(i),
             "distance_rel": i / 10} for i in range(3)]
    qpath = [{"step": i, "nll": fp + d_gptq - i * 0.001, "local": 2.0 + i, "local_rel": 0.2 + i / 10,
              "distance": 2.0 + i, "distance_rel": 0.2} for i in range(3)]
    return {
        "model": model, "family": "llama", "format": fmt, "bits": 4.25, "n_params": 1, "eval_windows": 4,
        "eval_tokens": 1020, "settings": StudySettings().to_dict(), "methods": methods,
        "diffs": {"qat_gptq_minus_gptq": {"mean": d_qat, "se": se}, "qat_rtn_minus_gptq": {"mean": 0.5, "se": se},
                  "gptq_minus_rtn": {"mean": -d_gptq, "se": se}, "qat_rtn_minus_rtn": {"mean": 0.0, "se": se}},
        "paths": {"rtn": path, "gptq": path, "qat_rtn": qpath, "qat_gptq": qpath},
        "fp_point": path[0], "spearman": {"rtn": 1.0, "gptq": 1.0, "qat_rtn": -1.0, "qat_gptq": -1.0},
        "qat": {i: {"losses": [3.1, 3.05, 3.0]} for i in ("rtn", "gptq")}, "ptq": {}, "seconds": 60.0,
    }


def test_verdicts_count_significant_wins_and_recovered_share():
    recs = [_record("int2", 0.5, -0.2), _record("int4", 0.01, 0.0005)]
    v = {x["format"]: x for x in verdicts(recs)}
    assert v["int2"]["wins"] == 1 and v["int2"]["best_qat_minus_gptq"] == pytest.approx(-0.2)
    assert v["int2"]["recovered"] == pytest.approx(0.2 / 0.5)
    assert v["int4"]["wins"] == 0 and v["int4"]["ties"] == 1
    text = statement(recs)
    assert "**reproduces** at 2-bit" in text and "not at 4-bit" in text
    assert "largest at the lowest precision" in text


def test_paired_difference_and_spearman_by_hand():
    import torch

    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.0, 1.0])
    d = _paired(a, b)  # differences 0.5, 1, 3: mean 1.5, sample sd sqrt(1.75)
    assert d["mean"] == pytest.approx(1.5) and d["se"] == pytest.approx(math.sqrt(1.75) / math.sqrt(3))
    assert _spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    assert math.isnan(_spearman([1, 2], [3, 4]))


def test_render_report_writes_page_and_figures(tmp_path):
    recs = [_record("int2", 0.5, -0.2), _record("int3", 0.1, -0.01), _record("mxint4", 0.01, 0.0)]
    path = render_report(recs, tmp_path, command="quantpredict study ptq-vs-qat --models m-xs", pending="more")
    text = path.read_text()
    for name in ("qat_ppl.png", "qat_misalignment.png", "qat_basin.png", "qat_loss.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert name in text
    assert "| m-xs | int2 |" in text and "**Pending:** more" in text and "Spearman" in text
    with pytest.raises(ValueError, match="no study results"):
        render_report([], tmp_path)


def test_records_of_other_settings_go_to_a_sensitivity_section(tmp_path):
    main = [_record("int2", 0.5, 0.01, model="a-xs"), _record("int2", 0.5, 0.02, model="b-xs"),
            _record("int4", 0.01, 0.003, model="a-xs")]
    low_lr = [_record("int2", 0.5, -0.1, model="a-xs")]
    low_lr[0]["settings"] = {**low_lr[0]["settings"], "lr": 1e-4}
    from quantpredict.studies.qat_report import sensitivity_text, split_settings

    kept, other = split_settings(main + low_lr)
    assert kept == main and other == low_lr
    text = sensitivity_text(kept, other)
    assert "lr 0.001 -> 0.0001" in text and "(1 cells: a-xs)" in text
    # the same cell (a-xs, int2): main study +0.0100 nats, no win; the low-lr run -0.1000, a win
    assert "| 2-bit | 1 | 0.5000 | +0.0100 | 0 | -0.1000 | 1 |" in text
    page = render_report(main + low_lr, tmp_path).read_text()
    assert "## Sensitivity" in page and "a-xs, b-xs" in page
    # each settings' own reproduction command, with its learning rate
    assert "study ptq-vs-qat --models a-xs b-xs --formats int4,int2 --steps 32 --lr 0.001" in page
    assert "--models a-xs --formats int2 --steps 32 --lr 0.0001" in page


def test_headline_leaves_out_training_snapshots():
    from quantpredict.studies.qat_report import _headline, is_snapshot

    assert is_snapshot("llama-s-t25") and not is_snapshot("llama-s") and not is_snapshot("gpt_neox-l")
    trained = [_record("int2", 0.5, 0.05, model="a-s")]
    snaps = [_record("int2", 0.5, -0.3, model="a-s-t25")]
    text = _headline(trained + snaps)
    assert text.startswith("On the 1 fully trained models (1 cells")
    assert "does not reproduce" in text  # the snapshot's QAT win is not counted
    assert "**reproduces**" in _headline(snaps)  # snapshots only: reported as they are
