"""Verdicts of the study where quantization hurts, on small synthetic results files with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantpredict.claims import Evidence, spearman_evidence, verdict
from quantpredict.studies.hurts import (
    claim_gain_grows_at_lower_precision,
    claim_misalignment,
    claim_qat_beats_gptq,
    claim_tokens_per_param,
    claims,
    contrast,
    group_of,
    hurts_command,
    is_long_trained,
    tokens_per_param,
)
from quantpredict.studies.study import StudySettings

N = 16  # test windows


def _noise(seed: int, scale: float = 0.01) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, N)


def _record(model: str, fmt: str, d_gptq: float, gain_gptq: float, gain_rtn: float, *, lr: float = 1e-4,
            local_ratio: float = 1.5, tpp: float | None = None, seed: int = 0, sha: str = "w") -> dict:
    """A cell whose GPTQ raises NLL by ``d_gptq`` per window and whose QAT runs sit ``gain_*`` below GPTQ (plus
    independent per-window noise of 0.01 nats, so a gain of 0.05 is ~20 se)."""
    fp = 3.0 + _noise(seed, 0.3)
    gptq = fp + d_gptq + _noise(seed + 1)
    win = {"fp": fp, "rtn": fp + 2 * d_gptq + _noise(seed + 2), "gptq": gptq,
           "qat_gptq": gptq - gain_gptq + _noise(seed + 3), "qat_rtn": gptq - gain_rtn + _noise(seed + 4)}
    methods = {m: {"nll": float(v.mean()), "ppl": math.exp(float(v.mean())), "delta_nll": float((v - fp).mean()),
                   "delta_nll_se": float((v - fp).std(ddof=1) / math.sqrt(N))} for m, v in win.items()}
    g_end = 10.0
    path = [{"step": i, "nll": 3.0 + i * d_gptq / 9, "local": g_end * i / 9, "local_rel": i / 90,
             "distance": float(i), "distance_rel": i / 90} for i in range(10)]  # 10 points: rho 1 is decided
    qpath = [{"step": i, "nll": 3.0 + d_gptq - i * 0.001, "local": g_end * local_ratio, "local_rel": 0.3,
              "distance": 5.0, "distance_rel": 0.1} for i in range(5)]
    return {
        "model": model, "family": "llama", "format": fmt, "bits": 4.25, "n_params": 1,
        "settings": {**StudySettings().to_dict(), "lr": lr, "track_windows": 4, "track_every": 8},
        "eval_windows": N, "eval_tokens": N * 255, "methods": methods, "diffs": {},
        "paths": {"rtn": path, "gptq": path, "qat_rtn": qpath, "qat_gptq": qpath}, "fp_point": path[0],
        "spearman": {"rtn": 1.0, "gptq": 1.0, "qat_rtn": math.nan, "qat_gptq": math.nan},
        "qat": {i: {"losses": [3.1, 3.05, 3.0]} for i in ("rtn", "gptq")}, "ptq": {}, "seconds": 60.0,
        "options": {"ptq_points": "block", "reference_dtype": "float32", "micro_batch_size": 1}, "max_rss_gb": 4.2,
        "window_nll": {m: [float(x) for x in v] for m, v in win.items()}, "windows_sha": sha,
        "card": {"tokens_per_param": tpp},
    }


def _verdicts(vs, claim_start):
    return {v.scope: v for v in vs if v.claim.startswith(claim_start)}


def test_generic_verdict_rule():
    sup, con, tie = Evidence("a", 1.0, 0.1), Evidence("b", -1.0, 0.1), Evidence("c", 0.05, 0.1)
    assert verdict("x", "s", [sup, sup, tie]).verdict == "holds"
    assert verdict("x", "s", [sup, sup, con]).verdict == "undecided"  # contradicted once: not "holds"
    assert verdict("x", "s", [con, con, tie]).verdict == "fails"
    assert verdict("x", "s", [tie, tie, sup]).verdict == "undecided"  # mostly within noise
    v = verdict("x", "s", [])
    assert v.verdict == "undecided" and v.cells == 0
    assert Evidence("nan", math.nan, 0.1).outcome == 0
    assert spearman_evidence("r", [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]).outcome == 1
    assert spearman_evidence("r", [1, 2, 3], [1, 2, 3]).outcome == 0  # too few points to decide


def test_names_groups_and_budgets():
    assert is_long_trained("llama-xs-d100") and not is_long_trained("smollm2-135m")
    assert group_of("llama-xs-d100") == "llama-xs" and group_of("smollm2-135m") == "smollm2-135m"
    assert tokens_per_param({"model": "opt-xs-d30", "card": {}}) == 30.0
    assert tokens_per_param({"model": "smollm2-135m", "card": {"tokens_per_param": 18831.8}}) == 18831.8


def test_contrast_pairs_windows_and_falls_back_to_independent_ses():
    a = _record("m", "int4", 0.1, 0.05, -0.02)
    mean, se = contrast([(1.0, a, "gptq"), (-1.0, a, "qat_gptq")])
    w = np.array(a["window_nll"]["gptq"]) - np.array(a["window_nll"]["qat_gptq"])
    assert mean == pytest.approx(w.mean()) and se == pytest.approx(w.std(ddof=1) / math.sqrt(N))
    b = _record("m", "int3", 0.1, 0.05, -0.02, sha="other", seed=5)  # other windows: no pairing across cells
    _, se_ind = contrast([(1.0, a, "gptq"), (-1.0, b, "gptq")])
    expect = math.hypot(a["methods"]["gptq"]["delta_nll_se"], b["methods"]["gptq"]["delta_nll_se"])
    assert se_ind == pytest.approx(expect)


def test_qat_beats_gptq_holds_fails_and_undecided_by_scope():
    recs = [_record("real-m", f, 0.3, 0.05, -0.10, seed=i) for i, f in enumerate(("int4", "int3", "mxint4"))]
    recs += [_record("real-m", f, 0.3, 0.0, -0.10, lr=1e-3, seed=10 + i) for i, f in enumerate(("int4", "int3"))]
    vs = claim_qat_beats_gptq(recs)
    g = _verdicts(vs, "QAT<-GPTQ beats")
    r = _verdicts(vs, "QAT<-RTN beats")
    assert g["real-m, lr 0.0001"].verdict == "holds" and g["real-m, lr 0.0001"].support == 3
    assert g["real-m, lr 0.001"].verdict == "undecided"  # a zero gain: within noise in every cell
    assert r["real-m, lr 0.0001"].verdict == "fails" and r["real-m, lr 0.0001"].contradict == 3


def test_gain_at_lower_precision_pairs_int4_int3_and_mxint4_mxint3():
    recs = [_record("real-m", "int4", 0.05, 0.0, 0.0, seed=1), _record("real-m", "int3", 0.3, 0.1, 0.1, seed=2),
            _record("real-m", "mxint4", 0.05, 0.0, 0.0, seed=3), _record("real-m", "mxint3", 0.3, 0.1, 0.1, seed=4)]
    (v,) = claim_gain_grows_at_lower_precision(recs)
    assert v.verdict == "holds" and v.cells == 4 and v.mean == pytest.approx(0.1, abs=0.02)


def test_tokens_per_param_contrasts_the_extreme_budgets():
    recs = []
    for i, (tpp, d, g) in enumerate(((30, 0.05, 0.0), (100, 0.1, 0.03), (300, 0.2, 0.08))):
        for j, fmt in enumerate(("int4", "mxint3")):
            recs.append(_record(f"fam-xs-d{tpp}", fmt, d, g, g, tpp=float(tpp), seed=10 * i + j))
    recs.append(_record("real-m", "int4", 0.5, 0.0, 0.0, seed=99))  # not long-trained: no budget contrast
    vs = claim_tokens_per_param(recs)
    assert {v.scope for v in vs} == {"fam-xs, lr 0.0001"}
    gain = _verdicts(vs, "QAT's gain over GPTQ grows")["fam-xs, lr 0.0001"]
    loss = _verdicts(vs, "GPTQ's NLL increase grows")["fam-xs, lr 0.0001"]
    assert gain.verdict == "holds" and gain.cells == 4 and gain.mean == pytest.approx(0.08, abs=0.02)
    assert loss.verdict == "holds" and loss.cells == 2 and loss.mean == pytest.approx(0.15, abs=0.02)


def test_misalignment_sign_follows_the_local_objective():
    # QAT ends with 1.5x GPTQ's local objective and a lower NLL: misaligned in every QAT run
    wrong = [_record("real-m", f, 0.3, 0.05, 0.05, local_ratio=1.5, seed=i) for i, f in enumerate(("int4", "int3"))]
    # QAT ends with a smaller local objective and a lower NLL: the local objective ranks them right
    right = [_record("real-m", f, 0.3, 0.05, 0.05, lr=1e-3, local_ratio=0.5, seed=5 + i)
             for i, f in enumerate(("int4", "int3"))]
    m = _verdicts(claim_misalignment(wrong + right), "The local objective ranks")
    assert m["real-m, lr 0.0001"].verdict == "holds" and m["real-m, lr 0.0001"].support == 4
    assert m["real-m, lr 0.001"].verdict == "fails"
    paths = _verdicts(claim_misalignment(wrong), "Along GPTQ's")
    assert paths["real-m, lr 0.0001"].verdict == "holds"  # 10 points, rho 1 > 2 * 1.06 / sqrt(7)
    qat_paths = _verdicts(claim_misalignment(wrong), "Along QAT<-GPTQ's")
    assert qat_paths["real-m, lr 0.0001"].verdict == "undecided"  # a flat local objective: no rank correlation


def test_sections_render_verdicts_from_a_results_file(tmp_path):
    from quantpredict.studies.qat_report import render_report
    from quantpredict.studies.study import read_results

    recs = [_record("smollm2-135m", "mxint4", 0.3, 0.05, -0.1, seed=1),
            _record("smollm2-135m", "mxint3", 0.6, 0.1, -0.1, seed=2),
            _record("fam-xs-d30", "int4", 0.05, 0.0, 0.0, tpp=30.0, seed=3),
            _record("fam-xs-d300", "int4", 0.2, 0.05, 0.05, tpp=300.0, seed=4)]
    path = tmp_path / "qat_hurts_results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    page = render_report([], tmp_path, hurts=read_results(path)).read_text()
    assert page.index("a real pre-trained model (smollm2-135m)") < page.index("long-trained checkpoints (fam-xs)")
    assert "| QAT<-GPTQ beats GPTQ at the same data | smollm2-135m, lr 0.0001 | **holds** | 2 / 0 / 2 |" in page
    assert "| QAT<-RTN beats GPTQ at the same data | smollm2-135m, lr 0.0001 | **fails** | 0 / 2 / 2 |" in page
    assert "GPTQ's NLL increase grows with training tokens per parameter | fam-xs, lr 0.0001 | **holds**" in page
    assert "--results hurts --ptq-points block --reference-dtype float32 --micro-batch-size 1" in page
    for name in ("qat_real_ppl.png", "qat_real_misalignment.png", "qat_long_tokens.png", "qat_long_loss.png"):
        assert (tmp_path / name).stat().st_size > 1000 and name in page
    assert "peak RSS 4.2 GB" in page
    assert len(claims(recs)) > 0
    assert hurts_command(recs[:2]).startswith("quantpredict study ptq-vs-qat --models smollm2-135m --formats "
                                              "mxint4,mxint3 --steps 32 --lr 0.0001")


def _control(cell: dict, adapt: float, *, seed: int = 9) -> dict:
    """The FP fine-tuning control of ``cell``'s model and settings: FP fine-tuned sits ``adapt`` nats below FP."""
    fp = np.array(cell["window_nll"]["fp"])
    win = {"fp": fp, "fp_ft": fp - adapt + _noise(seed)}
    methods = {m: {"nll": float(v.mean()), "ppl": math.exp(float(v.mean())), "delta_nll": float((v - fp).mean()),
                   "delta_nll_se": float((v - fp).std(ddof=1) / math.sqrt(N))} for m, v in win.items()}
    return {"model": cell["model"], "kind": "fp_finetune", "settings": cell["settings"], "methods": methods,
            "window_nll": {m: [float(x) for x in v] for m, v in win.items()}, "windows_sha": cell["windows_sha"],
            "losses": [3.0], "seconds": 1.0}


def test_fp_control_separates_adaptation_from_recovery(tmp_path):
    """QAT 0.3 nats below GPTQ beats GPTQ; but when FP fine-tuned the same way gains 0.5 nats, QAT's gap to it
    (0.3 - 0.3 + 0.5 = +0.5) is larger than GPTQ's 0.3 to FP: the gain was adaptation, and the claim fails. With an
    adaptation of 0.0 the same cells support it. Paired: 0.01-nat window noise decides 0.2-nat contrasts."""
    from quantpredict.studies.hurts import claim_control, control_of, control_table
    from quantpredict.studies.qat_report import render_report

    cells = [_record("smollm2-135m", "mxint4", 0.3, 0.3, 0.3, seed=1),
             _record("smollm2-135m", "mxint3", 0.6, 0.6 - 0.2, 0.6 - 0.2, seed=1)]  # same FP windows (seed 1)
    adapted = [_control(cells[0], 0.5)]
    assert control_of(cells[1], adapted) is adapted[0]  # one control per model and settings serves every format
    assert control_of(_record("other", "int4", 0.1, 0.0, 0.0), adapted) is None
    v = {x.claim: x for x in claim_control(cells, adapted)}
    assert v["FP fine-tuned at the same data beats FP (QAT's gain is partly adaptation)"].verdict == "holds"
    gap = "QAT<-GPTQ's gap to FP fine-tuned at the same data is smaller than GPTQ's to FP"
    assert v[gap].verdict == "fails"
    # (GPTQ - FP) - (QAT - FP_ft) per cell: mxint4 0.3 - 0.5, mxint3 0.6 - 0.7
    assert v[gap].mean == pytest.approx(((0.3 - 0.5) + (0.6 - 0.7)) / 2, abs=0.02) and v[gap].cells == 2
    unadapted = {x.claim: x for x in claim_control(cells, [_control(cells[0], 0.0)])}
    assert unadapted[gap].verdict == "holds"
    assert "| smollm2-135m | 0.0001 | mxint4 |" in control_table(cells, adapted)
    assert control_table(cells, []) == "" and claim_control(cells, []) == []
    page = render_report([], tmp_path, hurts=cells, controls=adapted).read_text()
    assert "### The FP fine-tuning control" in page and f"| {gap} | smollm2-135m, lr 0.0001 | **fails** |" in page
    assert "--micro-batch-size 1 --out " in page and page.count(" --fp-control`") == 1


def test_run_study_writes_cells_and_the_fp_control_and_resumes(tiny_hf_dir, tmp_path):
    """End to end on a tiny model: one cell and its FP fine-tuning control are appended to their files, the
    control is scored on the cell's test windows (same sha) and moved the model, and a rerun does nothing."""
    from quantpredict.studies.study import CONTROL_FILE, HURTS_FILE, read_results, run_study

    st = StudySettings(steps=2, lr=1e-3, batch_size=2, calib_samples=4, calib_seq_len=32, seq_len=32, max_windows=3,
                       track_windows=2, track_every=1, eval_windows=2)
    results = tmp_path / HURTS_FILE
    run_study([str(tiny_hf_dir)], ["int4"], settings=st, results=results, progress=False, fp_control=True)
    cells, controls = read_results(results), read_results(tmp_path / CONTROL_FILE)
    assert len(cells) == 1 and len(controls) == 1
    c = controls[0]
    assert c["kind"] == "fp_finetune" and c["model"] == cells[0]["model"] == "tiny-llama"
    assert c["windows_sha"] == cells[0]["windows_sha"] and len(c["window_nll"]["fp_ft"]) == 3
    assert c["window_nll"]["fp"] == cells[0]["window_nll"]["fp"]  # the same FP scores the cells pair with
    assert c["window_nll"]["fp_ft"] != c["window_nll"]["fp"] and len(c["losses"]) == 2
    before = (results.read_text(), (tmp_path / CONTROL_FILE).read_text())
    run_study([str(tiny_hf_dir)], ["int4"], settings=st, results=results, progress=False, fp_control=True)
    assert (results.read_text(), (tmp_path / CONTROL_FILE).read_text()) == before
