"""The PTQ-vs-QAT study where quantization hurts: a real model (SmolLM2) and the long-trained zoo checkpoints.

Reads the records of ``reports/qat_hurts_results.jsonl`` (same format as the zoo study's, plus per-window NLLs) and
computes, per claim and scope, a verdict with :mod:`quantpredict.claims`; :func:`hurts_sections` renders them as the
sections of ``reports/qat.md`` above the zoo's. Every paired difference uses the per-window NLLs of the cells
involved when they were scored on the same windows (same ``windows_sha``), else the two cells' standard errors
combined as if independent (conservative).

The claims (positive value = as claimed):

* *QAT<-GPTQ beats GPTQ* / *QAT<-RTN beats GPTQ* at the same data: ``NLL(GPTQ) - NLL(QAT)``, per cell.
* *QAT's gain over GPTQ is larger at 3 bits than at 4*: ``gain(3-bit) - gain(4-bit)`` for the format pairs
  int4/int3 and mxint4/mxint3, ``gain = NLL(GPTQ) - NLL(QAT)``, per model and init.
* *QAT's gain over GPTQ grows with training tokens per parameter*: ``gain(most-trained) - gain(least-trained)``
  within a family of long-trained checkpoints, per format and init.
* *GPTQ's NLL increase grows with training tokens per parameter*: the same contrast of ``NLL(GPTQ) - NLL(FP)``.
* *The local objective ranks QAT's and GPTQ's end points the wrong way* (misalignment):
  ``sign(local(QAT) - local(GPTQ)) * (NLL(GPTQ) - NLL(QAT))``: positive when the model with the larger summed
  layer-output error has the lower test NLL.
* *Along a path the local objective tracks the NLL*: Spearman's rho of local objective vs tracked NLL along GPTQ's
  layer-by-layer path, and along each QAT run's steps (few points: rarely decided).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quantpredict.claims import Evidence, Verdict, paired, spearman_evidence, verdict, verdict_table

INITS = ("qat_gptq", "qat_rtn")
LABELS = {"qat_gptq": "QAT<-GPTQ", "qat_rtn": "QAT<-RTN", "gptq": "GPTQ", "rtn": "RTN", "fp": "FP"}
PRECISION_PAIRS = (("int4", "int3"), ("mxint4", "mxint3"))
_LONG = re.compile(r"^(?P<base>.+)-d(?P<tpp>\d+)$")


# ---- what a record is -------------------------------------------------------------------------------------------


def is_long_trained(model: str) -> bool:
    """A long-trained zoo checkpoint, ``<base>-d<tokens per parameter>`` (``llama-xs-d100``)."""
    return _LONG.match(model) is not None


def real_and_long(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(real-model records, long-trained checkpoint records)``, each in the order given."""
    return ([r for r in records if not is_long_trained(r["model"])],
            [r for r in records if is_long_trained(r["model"])])


def real_and_long_sections(records: Sequence[dict], real_section: Callable[[list[dict], str], str],
                           long_section: Callable[[list[dict], str], str]) -> str:
    """The markdown of a study's real-model and long-trained sections, joined (empty string for neither):
    ``real_section(real records, their model names)`` when there are real-model records, then
    ``long_section(long-trained records, their families)`` when there are long-trained ones (names comma-joined,
    sorted). The QAT study (:func:`hurts_sections`) and the SmoothQuant one both lay their reports out so."""
    real, long = real_and_long(records)
    parts = []
    if real:
        parts.append(real_section(real, ", ".join(sorted({r["model"] for r in real}))))
    if long:
        parts.append(long_section(long, ", ".join(sorted({group_of(r["model"]) for r in long}))))
    return "\n".join(parts)


def group_of(model: str) -> str:
    """The family a checkpoint belongs to: ``llama-xs`` for ``llama-xs-d100``; other models are their own group."""
    m = _LONG.match(model)
    return m.group("base") if m else model


def tokens_per_param(r: dict) -> float:
    """Training tokens per (non-embedding) parameter: the card's value, else the ``-dNN`` of the name, else NaN."""
    card = r.get("card") or {}
    if card.get("tokens_per_param"):
        return float(card["tokens_per_param"])
    m = _LONG.match(r["model"])
    return float(m.group("tpp")) if m else math.nan


def lr_of(r: dict) -> float:
    return float(r["settings"]["lr"])


def _scope(group: str, lr: float) -> str:
    return f"{group}, lr {lr:g}"


# ---- paired differences -----------------------------------------------------------------------------------------


def _windows(r: dict, method: str) -> list[float] | None:
    w = r.get("window_nll") or {}
    return w.get(method)


def contrast(terms: Sequence[tuple[float, dict, str]]) -> tuple[float, float]:
    """``sum_i c_i * NLL_i`` over ``(c_i, record, method)`` terms, with its standard error.

    Per window when every record has per-window NLLs on the same windows (one ``windows_sha``), so the se is the
    paired one; otherwise each term's own se over windows (``delta_nll_se`` of the method, or of FP's mean) is
    combined as if independent, a conservative bound for positively correlated cells.
    """
    shas = {r.get("windows_sha") for _, r, _ in terms}
    arrays = [_windows(r, m) for _, r, m in terms]
    if None not in shas and len(shas) == 1 and all(a is not None for a in arrays):
        n = len(arrays[0])
        per_window = [sum(c * a[i] for (c, _, _), a in zip(terms, arrays)) for i in range(n)]
        return paired(per_window)
    mean = sum(c * r["methods"][m]["nll"] for c, r, m in terms)
    var = 0.0
    for c, r, m in terms:
        se = r["methods"][m].get("delta_nll_se", math.nan) if m != "fp" else 0.0
        var += (c * se) ** 2
    return mean, math.sqrt(var)


def gain(r: dict, init: str) -> tuple[float, float]:
    """``NLL(GPTQ) - NLL(init)`` on the cell's test windows and its paired se (positive: QAT better)."""
    return contrast([(1.0, r, "gptq"), (-1.0, r, init)])


# ---- claims -----------------------------------------------------------------------------------------------------


def _by(records: Sequence[dict], key) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return out


def _cell(r: dict, extra: str = "") -> str:
    return f"{r['model']} {r['format']} lr {lr_of(r):g}" + (f" {extra}" if extra else "")


def claim_qat_beats_gptq(records: Sequence[dict]) -> list[Verdict]:
    out = []
    for init in INITS:
        for (group, lr), rs in sorted(_by(records, lambda r: (group_of(r["model"]), lr_of(r))).items()):
            ev = [Evidence(_cell(r), *gain(r, init)) for r in rs]
            out.append(verdict(f"{LABELS[init]} beats GPTQ at the same data", _scope(group, lr), ev))
    return out


def claim_gain_grows_at_lower_precision(records: Sequence[dict]) -> list[Verdict]:
    out = []
    for (group, lr), rs in sorted(_by(records, lambda r: (group_of(r["model"]), lr_of(r))).items()):
        cells = {(r["model"], r["format"]): r for r in rs}
        ev = []
        for init in INITS:
            for hi, lo in PRECISION_PAIRS:
                for model in sorted({r["model"] for r in rs}):
                    a, b = cells.get((model, lo)), cells.get((model, hi))
                    if a and b:
                        v = contrast([(1.0, a, "gptq"), (-1.0, a, init), (-1.0, b, "gptq"), (1.0, b, init)])
                        ev.append(Evidence(f"{model} {lo} vs {hi} {LABELS[init]}", *v))
        if ev:
            out.append(verdict("QAT's gain over GPTQ is larger at 3 bits than at 4", _scope(group, lr), ev))
    return out


def _extremes(rs: Sequence[dict]) -> tuple[dict, dict] | None:
    """(least-trained, most-trained) of a family's cells of one format, or None with fewer than two budgets."""
    ranked = sorted((r for r in rs if math.isfinite(tokens_per_param(r))), key=tokens_per_param)
    if len(ranked) < 2 or tokens_per_param(ranked[0]) == tokens_per_param(ranked[-1]):
        return None
    return ranked[0], ranked[-1]


def claim_tokens_per_param(records: Sequence[dict]) -> list[Verdict]:
    """QAT's gain and GPTQ's loss against training tokens per parameter, per family of long-trained checkpoints."""
    long = [r for r in records if is_long_trained(r["model"])]
    out = []
    for (group, lr), rs in sorted(_by(long, lambda r: (group_of(r["model"]), lr_of(r))).items()):
        ev_gain, ev_loss = [], []
        for fmt, frs in sorted(_by(rs, lambda r: r["format"]).items()):
            ends = _extremes(frs)
            if ends is None:
                continue
            lo, hi = ends
            name = f"{fmt} d{tokens_per_param(lo):g} -> d{tokens_per_param(hi):g}"
            for init in INITS:
                v = contrast([(1.0, hi, "gptq"), (-1.0, hi, init), (-1.0, lo, "gptq"), (1.0, lo, init)])
                ev_gain.append(Evidence(f"{name} {LABELS[init]}", *v))
            ev_loss.append(Evidence(name, *contrast([(1.0, hi, "gptq"), (-1.0, hi, "fp"), (-1.0, lo, "gptq"),
                                                     (1.0, lo, "fp")])))
        if ev_gain:
            out.append(verdict("QAT's gain over GPTQ grows with training tokens per parameter", _scope(group, lr),
                               ev_gain))
            out.append(verdict("GPTQ's NLL increase grows with training tokens per parameter", _scope(group, lr),
                               ev_loss))
    return out


def misaligned(r: dict, init: str) -> Evidence:
    """``sign(local(QAT) - local(GPTQ)) * (NLL(GPTQ) - NLL(QAT))`` of one cell (end points of the two paths)."""
    d_local = r["paths"][init][-1]["local"] - r["paths"]["gptq"][-1]["local"]
    g, se = gain(r, init)
    sign = 1.0 if d_local > 0 else -1.0 if d_local < 0 else math.nan
    return Evidence(_cell(r, LABELS[init]), sign * g, se)


def claim_misalignment(records: Sequence[dict]) -> list[Verdict]:
    out = []
    for (group, lr), rs in sorted(_by(records, lambda r: (group_of(r["model"]), lr_of(r))).items()):
        ev = [misaligned(r, init) for r in rs for init in INITS]
        out.append(verdict("The local objective ranks QAT's and GPTQ's end points the wrong way", _scope(group, lr),
                           ev))
        for path in ("gptq", *INITS):
            ev = [spearman_evidence(_cell(r), [p["local"] for p in r["paths"][path]],
                                    [p["nll"] for p in r["paths"][path]]) for r in rs if r["paths"].get(path)]
            what = "GPTQ's layer-by-layer path" if path == "gptq" else f"{LABELS[path]}'s steps"
            out.append(verdict(f"Along {what} the local objective tracks the NLL (Spearman)", _scope(group, lr), ev))
    return out


def _settings_key(r: dict) -> tuple[str, str]:
    from quantpredict.studies.study import settings_key

    return r["model"], settings_key(r.get("settings"))


def control_of(r: dict, controls: Sequence[dict]) -> dict | None:
    """The FP fine-tuning control of a cell's model and settings (``qat_fp_control.jsonl``), or None."""
    key = _settings_key(r)
    return next((c for c in controls if _settings_key(c) == key), None)


def claim_control(records: Sequence[dict], controls: Sequence[dict]) -> list[Verdict]:
    """With the FP fine-tuning controls: does fine-tuning alone beat FP (then part of QAT's gain is adaptation to
    the calibration text, not recovery), and is QAT's gap to the fine-tuned FP model smaller than GPTQ's gap to FP:
    ``(NLL(GPTQ) - NLL(FP)) - (NLL(QAT) - NLL(FP fine-tuned))`` per cell, positive as claimed."""
    out = []
    with_control = [(r, c) for r in records if (c := control_of(r, controls)) is not None]
    for (group, lr), pairs in sorted(_by(with_control, lambda rc: (group_of(rc[0]["model"]), lr_of(rc[0]))).items()):
        seen = {}
        for _, c in pairs:
            seen.setdefault(id(c), c)
        ev = [Evidence(f"{c['model']} lr {lr_of(c):g}", *contrast([(1.0, c, "fp"), (-1.0, c, "fp_ft")]))
              for c in seen.values()]
        out.append(verdict("FP fine-tuned at the same data beats FP (QAT's gain is partly adaptation)",
                           _scope(group, lr), ev))
        for init in INITS:
            ev = [Evidence(_cell(r), *contrast([(1.0, r, "gptq"), (-1.0, r, "fp"), (-1.0, r, init), (1.0, c, "fp_ft")]))
                  for r, c in pairs]
            out.append(verdict(f"{LABELS[init]}'s gap to FP fine-tuned at the same data is smaller than GPTQ's to FP",
                               _scope(group, lr), ev))
    return out


def claims(records: Sequence[dict], controls: Sequence[dict] = ()) -> list[Verdict]:
    """Every claim's verdict on ``records`` (see the module docstring), scoped by model group and learning rate;
    ``controls`` (FP fine-tuned at the cells' settings) add the claims of :func:`claim_control`."""
    return (claim_qat_beats_gptq(records) + claim_gain_grows_at_lower_precision(records)
            + claim_tokens_per_param(records) + claim_misalignment(records) + claim_control(records, controls))


def control_table(records: Sequence[dict], controls: Sequence[dict]) -> str:
    """Per cell with a control: FP and FP fine-tuned perplexity, and each method's NLL gap to its own reference
    (GPTQ to FP; QAT to FP fine-tuned the same way), paired, in nats."""
    rows = [(r, c) for r in _order(records) if (c := control_of(r, controls)) is not None]
    if not rows:
        return ""
    head = ("| model | lr | format | FP ppl | FP fine-tuned ppl | FP fine-tuned - FP | GPTQ - FP | QAT<-RTN - FP "
            "fine-tuned | QAT<-GPTQ - FP fine-tuned |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r, c in rows:
        cells = [contrast([(1.0, c, "fp_ft"), (-1.0, c, "fp")]), contrast([(1.0, r, "gptq"), (-1.0, r, "fp")]),
                 *(contrast([(1.0, r, init), (-1.0, c, "fp_ft")]) for init in ("qat_rtn", "qat_gptq"))]
        lines.append(f"| {r['model']} | {lr_of(r):g} | {r['format']} | {c['methods']['fp']['ppl']:.3f} | "
                     f"{c['methods']['fp_ft']['ppl']:.3f} | " + " | ".join(f"{v:+.4f} ± {se:.4f}" for v, se in cells)
                     + " |")
    return "\n".join(lines)


# ---- tables, figures, sections ------------------------------------------------------------------------------------


def _fmt_key(fmt: str) -> tuple[int, str]:
    from quantpredict.studies.study import STUDY_FORMATS

    return (STUDY_FORMATS.index(fmt) if fmt in STUDY_FORMATS else 99, fmt)


def _order(records: Sequence[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (group_of(r["model"]), tokens_per_param(r), lr_of(r), _fmt_key(r["format"])))


def cell_table(records: Sequence[dict]) -> str:
    """One row per cell: perplexities, the two QAT-minus-GPTQ differences (paired), the end points' local ratio."""
    head = ("| model | tokens/param | lr | format | FP ppl | RTN | GPTQ | QAT<-RTN | QAT<-GPTQ | QAT<-GPTQ - GPTQ "
            "(nats) | QAT<-RTN - GPTQ (nats) | local QAT<-GPTQ / GPTQ | rho GPTQ path |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in _order(records):
        m = r["methods"]
        diffs = []
        for init in INITS:
            g, se = gain(r, init)
            diffs.append(f"{-g:+.4f} ± {se:.4f}")
        ratio = r["paths"]["qat_gptq"][-1]["local"] / r["paths"]["gptq"][-1]["local"] if r["paths"]["gptq"][-1][
            "local"] > 0 else math.nan
        rho = r.get("spearman", {}).get("gptq", math.nan)
        lines.append(f"| {r['model']} | {tokens_per_param(r):g} | {lr_of(r):g} | {r['format']} | "
                     + " | ".join(f"{m[k]['ppl']:.3f}" for k in ("fp", "rtn", "gptq", "qat_rtn", "qat_gptq"))
                     + f" | {' | '.join(diffs)} | {ratio:.3f} | {rho:+.2f} |")
    return "\n".join(lines)


def tokens_table(records: Sequence[dict]) -> str:
    """Per family, format and learning rate: GPTQ's NLL increase and QAT<-GPTQ's gain at each training budget."""
    long = [r for r in records if is_long_trained(r["model"])]
    if not long:
        return ""
    budgets = sorted({tokens_per_param(r) for r in long})
    head = ("| family | lr | format | " + " | ".join(f"d{b:g}: GPTQ dNLL / gain" for b in budgets) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (group, lr, fmt), rs in sorted(_by(long, lambda r: (group_of(r["model"]), lr_of(r), r["format"])).items(),
                                       key=lambda kv: (kv[0][0], kv[0][1], _fmt_key(kv[0][2]))):
        at = {tokens_per_param(r): r for r in rs}
        cells = []
        for b in budgets:
            r = at.get(b)
            cells.append("" if r is None else
                         f"{r['methods']['gptq']['delta_nll']:.4f} / {gain(r, 'qat_gptq')[0]:+.4f}")
        lines.append(f"| {group} | {lr:g} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokens_figure(records: Sequence[dict], path: Path) -> Path | None:
    """GPTQ's NLL increase and QAT<-GPTQ's gain vs tokens per parameter, one panel per family (lines: format, lr)."""
    long = [r for r in records if is_long_trained(r["model"])]
    if not long:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({group_of(r["model"]) for r in long})
    budgets = sorted({tokens_per_param(r) for r in long})
    fig, axes = plt.subplots(2, len(groups), figsize=(max(6.0, 4.2 * len(groups)), 6.4), squeeze=False)
    for j, group in enumerate(groups):
        rs = [r for r in long if group_of(r["model"]) == group]
        for (lr, fmt), frs in sorted(_by(rs, lambda r: (lr_of(r), r["format"])).items()):
            frs = sorted(frs, key=tokens_per_param)
            xs = [tokens_per_param(r) for r in frs]
            g = [gain(r, "qat_gptq") for r in frs]
            ls = "-" if lr == min(lr_of(r) for r in rs) else ":"
            if ls == "-":
                axes[0, j].plot(xs, [r["methods"]["gptq"]["delta_nll"] for r in frs], marker="o", label=fmt)
            axes[1, j].errorbar(xs, [v for v, _ in g], yerr=[2 * s for _, s in g], ls=ls, marker="o", capsize=2,
                                label=f"{fmt} lr {lr:g}")
        for i, ylabel in enumerate(("GPTQ: test NLL - FP (nats)", "NLL(GPTQ) - NLL(QAT<-GPTQ) (nats)")):
            ax = axes[i, j]
            ax.set_xscale("log")
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
            ax.set_xlabel("training tokens per parameter")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(group, fontsize=9)
            ax.legend(fontsize=6)
    fig.suptitle("Long-trained checkpoints: PTQ loss (top) and QAT's gain over GPTQ\n(bottom; solid: lowest lr, "
                 "dotted: higher; bars: 2 paired se)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def hurts_command(records: Sequence[dict], out: str = "reports") -> str:
    """The command line that computes ``records`` (one model set, settings equal but for the lr), resumable."""
    st = records[0]["settings"]
    opts = records[0].get("options") or {}
    models = list(dict.fromkeys(r["model"] for r in records))
    lrs = sorted({lr_of(r) for r in records})
    formats = sorted({r["format"] for r in records}, key=_fmt_key)
    flags = [f"--steps {st['steps']}", "--lr " + " ".join(f"{x:g}" for x in lrs), f"--batch-size {st['batch_size']}",
             f"--calib-samples {st['calib_samples']}", f"--calib-seq-len {st['calib_seq_len']}",
             f"--max-windows {st['max_windows'] or 0}", f"--track-windows {st['track_windows']}",
             f"--track-every {st['track_every']}", f"--seed {st['seed']}", "--results hurts"]
    if opts.get("ptq_points", "layer") != "layer":
        flags.append(f"--ptq-points {opts['ptq_points']}")
    if opts.get("reference_dtype", "float64") != "float64":
        flags.append(f"--reference-dtype {opts['reference_dtype']}")
    if opts.get("micro_batch_size"):
        flags.append(f"--micro-batch-size {opts['micro_batch_size']}")
    return (f"quantpredict study ptq-vs-qat --models {' '.join(models)} --formats {','.join(formats)} "
            + " ".join(flags) + f" --out {out}")


def _cost_line(records: Sequence[dict]) -> str:
    secs = [r["seconds"] for r in records]
    cpu = [r["cpu_seconds"] for r in records if r.get("cpu_seconds") is not None]
    rss = [r.get("max_rss_gb") for r in records if r.get("max_rss_gb")]
    opts = records[0].get("options") or {}
    median = sorted(secs)[len(secs) // 2] / 60
    return (f"{len(records)} cells, {sum(secs) / 60:.0f} minutes wall in all (median {median:.1f} per cell"
            + (f"; {sum(cpu) / 60:.1f} CPU minutes" if cpu else "")
            + ", single-threaded on a shared 2-core machine; a model's FP reference is not counted, a format's PTQ "
            "baselines count in its first cell only)" + (f", peak RSS {max(rss):.1f} GB" if rss else "")
            + f"; trajectory points: PTQ after every {opts.get('ptq_points', 'layer')}, QAT every "
            f"{records[0]['settings']['track_every']} steps; local-objective reference in "
            f"{opts.get('reference_dtype', 'float64')}" + (f"; QAT micro-batches of {opts['micro_batch_size']} "
                                                          "window(s)" if opts.get("micro_batch_size") else ""))


def _section(title: str, intro: str, records: Sequence[dict], out_dir: Path, prefix: str,
             controls: Sequence[dict] = ()) -> str:
    from quantpredict.studies.qat_figures import render_figures

    by_lr = _by(records, lr_of)
    main_lr = max(sorted(by_lr), key=lambda lr: len(by_lr[lr]))
    figs = render_figures(by_lr[main_lr], out_dir, prefix=prefix)
    vs = claims(records, controls)
    text = [f"## {title}", "", intro, "",
            f"- Cost: {_cost_line(records)}.",
            f"- Reproduce (resumable): `{hurts_command(records, str(out_dir))}"
            f"{' --fp-control' if any(control_of(r, controls) for r in records) else ''}`", "",
            "### Verdicts (computed from the results file)", "",
            "A cell supports a claim when its paired difference is beyond 2 se in the claimed direction, "
            "contradicts it beyond 2 se the other way; **holds**: supported in most cells, contradicted in none; "
            "**fails**: the reverse; **undecided**: otherwise. Values in nats/token (rank correlations: rho).", "",
            verdict_table(vs), "", "### Cells", "", cell_table(records), ""]
    ct = control_table(records, controls)
    if ct:
        text += ["### The FP fine-tuning control", "",
                 "QAT trains on the calibration windows (WikiText-2 train), so it also adapts the model to the text "
                 "it is tested on. The control fine-tunes the *unquantized* model exactly as QAT trains (same layers, "
                 "windows, steps, lr and order; `--fp-control`). Each method is measured against its own reference: "
                 "GPTQ against FP, QAT against the FP model fine-tuned the same way (nats/token, paired se). Where the "
                 "control ends *above* FP (a learning rate too high for the model), a smaller QAT gap says the "
                 "training harmed both models, not that QAT recovered more than GPTQ.", "",
                 ct, ""]
    tt = tokens_table(records)
    if tt:
        fig = tokens_figure(records, out_dir / f"{prefix}_tokens.png")
        text += ["### Against training tokens per parameter", "",
                 "GPTQ's test-NLL increase over FP, and the gain of QAT<-GPTQ over GPTQ (positive: QAT better):", "",
                 tt, ""] + ([f"![tokens per parameter]({fig.name})", ""] if fig else [])
    text += [f"Figures at lr {main_lr:g}: NLL increase per method, training loss, and the local objective against "
             "the NLL along each path (PTQ dashed, QAT solid).", "",
             "| | |", "|---|---|", f"| ![NLL increase]({figs[0].name}) | ![loss curves]({figs[3].name}) |",
             f"| ![local vs NLL]({figs[1].name}) | ![distance vs NLL]({figs[2].name}) |", ""]
    return "\n".join(text)


def hurts_sections(records: Sequence[dict], out_dir: str | Path, *, controls: Sequence[dict] = ()) -> str:
    """The markdown of the real-model and long-trained sections (empty string for no records); writes figures.
    ``controls``: FP fine-tuning controls (:func:`quantpredict.studies.study.fp_control_cell`), paired with their
    cells."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return real_and_long_sections(
        records,
        lambda real, names: _section(
            f"Where quantization hurts: a real pre-trained model ({names})",
            "The same study (FP, RTN, GPTQ, QAT from RTN and from GPTQ, all at the same calibration windows) on a "
            "real pre-trained model. SmolLM2-135M was trained on ~2T tokens (~19k per non-embedding parameter) and "
            "its weights arrived as llama.cpp Q4_1 (see its zoo card): its 'FP' model is that dequantized model, "
            "so these numbers measure re-quantizing an already 4-bit network.", real, out, "qat_real", controls),
        lambda long, fams: _section(
            f"Where quantization hurts: long-trained checkpoints ({fams})",
            "Zoo architectures trained to 30-300 tokens per parameter (`<family>-d<tokens per parameter>`): the "
            "longer a model trains, the more its weights carry, and the more PTQ is expected to cost. Same study "
            "settings as the zoo's.", long, out, "qat_long", controls))
