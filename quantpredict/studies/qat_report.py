"""``reports/qat.md`` and its figures from the study's results file (:mod:`quantpredict.studies.study`).

Figures: ``qat_ppl.png`` (test NLL increase over FP, per format and method), ``qat_misalignment.png`` (local
objective vs global NLL along GPTQ's layer-by-layer path and QAT's steps), ``qat_basin.png`` (distance to the FP
weights vs NLL), ``qat_loss.png`` (QAT training loss curves).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the figures (and their labels, colours and format order) are shared with studies.hurts
from quantpredict.studies.qat_figures import COLORS, LABELS, _fmt_order, render_figures  # noqa: F401


def _precision(fmt: str) -> str:
    digits = "".join(ch for ch in fmt.split("_")[0] if ch.isdigit())
    return f"{digits}-bit" if digits else fmt


def _best_qat(r: dict) -> str:
    return min(("qat_rtn", "qat_gptq"), key=lambda m: r["methods"][m]["nll"])


def _best_minus_gptq(r: dict) -> dict[str, float]:
    """The paired test-NLL difference (``mean``, ``se``) of the cell's better QAT run minus GPTQ."""
    return r["diffs"]["qat_gptq_minus_gptq" if _best_qat(r) == "qat_gptq" else "qat_rtn_minus_gptq"]


def verdicts(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per format (pooled over models): GPTQ's and best QAT's NLL increase, and how often QAT wins significantly.

    A cell counts as a win when the paired difference (best QAT - GPTQ) is below ``-2 se`` on the test windows. The
    best QAT is chosen per cell on the test windows, so QAT<-GPTQ alone is reported too.
    """
    out = []
    for fmt in _fmt_order(records):
        rs = [r for r in records if r["format"] == fmt]
        wins = ties = 0
        d_best, d_g = [], []
        for r in rs:
            d = _best_minus_gptq(r)
            d_best.append(d["mean"])
            d_g.append(r["diffs"]["qat_gptq_minus_gptq"]["mean"])
            if d["mean"] < -2 * d["se"]:
                wins += 1
            elif abs(d["mean"]) <= 2 * d["se"]:
                ties += 1
        gptq = [r["methods"]["gptq"]["delta_nll"] for r in rs]
        out.append({
            "format": fmt, "precision": _precision(fmt), "cells": len(rs), "wins": wins, "ties": ties,
            "gptq_delta": sum(gptq) / len(gptq), "best_qat_minus_gptq": sum(d_best) / len(d_best),
            "qat_gptq_minus_gptq": sum(d_g) / len(d_g),
            "recovered": (sum(-d for d in d_best) / len(d_best)) / (sum(gptq) / len(gptq)) if sum(gptq) > 0
            else math.nan,
        })
    return out


def _table(records: Sequence[dict]) -> str:
    head = ("| model | format | bits/elt | FP ppl | RTN | GPTQ | QAT<-RTN | QAT<-GPTQ | best QAT - GPTQ (nats) "
            "| rho(local, NLL) GPTQ path | rho QAT<-RTN path |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: (r["model"], _fmt_order(records).index(r["format"]))):
        m = r["methods"]
        d = _best_minus_gptq(r)
        cells = [f"{m[k]['ppl']:.3f}" for k in ("fp", "rtn", "gptq", "qat_rtn", "qat_gptq")]
        lines.append(f"| {r['model']} | {r['format']} | {r['bits']:.2f} | " + " | ".join(cells)
                     + f" | {d['mean']:+.4f} ± {d['se']:.4f} | {r['spearman'].get('gptq', math.nan):+.2f} | "
                     f"{r['spearman'].get('qat_rtn', math.nan):+.2f} |")
    return "\n".join(lines)


def by_size(records: Sequence[dict]) -> str:
    """Markdown table: per model size (the zoo name's second part, e.g. ``s`` of ``llama-s``; else the name) how
    often the better QAT run beats GPTQ significantly (paired difference < -2 se), ties, or loses."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        parts = r["model"].split("-")
        groups.setdefault("-".join(parts[1:]) if len(parts) > 1 else r["model"], []).append(r)
    order = {"xs": 0, "s": 1, "m": 2, "l": 3}
    lines = ["| size | cells | QAT better | tie | GPTQ better | mean best QAT - GPTQ (nats) | mean GPTQ increase | "
             "best QAT below FP |", "|---|---|---|---|---|---|---|---|"]
    for size in sorted(groups, key=lambda g: (order.get(g.split("-")[0], 9), g)):
        rs = groups[size]
        diffs = [_best_minus_gptq(r) for r in rs]
        win = sum(d["mean"] < -2 * d["se"] for d in diffs)
        lose = sum(d["mean"] > 2 * d["se"] for d in diffs)
        lines.append(f"| {size} | {len(rs)} | {win} | {len(rs) - win - lose} | {lose} | "
                     f"{sum(d['mean'] for d in diffs) / len(rs):+.4f} | "
                     f"{sum(r['methods']['gptq']['delta_nll'] for r in rs) / len(rs):.4f} | "
                     f"{sum(r['methods'][_best_qat(r)]['delta_nll'] < 0 for r in rs)} |")
    return ("\n".join(lines) + "\n\n*best QAT below FP*: cells where fine-tuning on the calibration windows left the "
            "quantized model *better* than the FP one, i.e. QAT also continued the model's training (the -tNN "
            "snapshots are under-trained); its gain there is not quantization recovery.")


def statement(records: Sequence[dict]) -> str:
    """The plain answer: does QAT beat GPTQ at the same data budget, for which precisions, by how much."""
    vs = verdicts(records)
    lines = []
    for v in vs:
        lines.append(
            f"- **{v['format']}** ({v['precision']}): GPTQ raises test NLL by {v['gptq_delta']:.4f} nats; the better "
            f"QAT run changes that by {v['best_qat_minus_gptq']:+.4f} nats (QAT<-GPTQ alone "
            f"{v['qat_gptq_minus_gptq']:+.4f}), i.e. "
            + (f"recovers {100 * v['recovered']:.0f}% of GPTQ's loss; " if v["recovered"] >= 0 else
               f"adds {-100 * v['recovered']:.0f}% to GPTQ's loss; ")
            + f"QAT significantly better (< -2 se) in {v['wins']} of {v['cells']} model(s), indistinguishable in "
            f"{v['ties']}.")
    by_prec: dict[str, list[dict]] = {}
    for v in vs:
        by_prec.setdefault(v["precision"], []).append(v)
    reproduced = [p for p, v in by_prec.items() if all(x["wins"] == x["cells"] for x in v)]
    partial = [p for p, v in by_prec.items() if p not in reproduced and any(x["wins"] for x in v)]
    not_rep = [p for p in by_prec if p not in reproduced and p not in partial]
    gains = {p: sum(-x["best_qat_minus_gptq"] for x in v) / len(v) for p, v in by_prec.items()}
    order = sorted(gains, key=lambda p: gains[p], reverse=True)
    summary = ("The seed's finding (QAT beats GPTQ at the same data budget) "
               + (f"**reproduces** at {', '.join(reproduced)} (QAT better in every cell)" if reproduced else
                  "**does not reproduce in every cell at any precision**")
               + (f"; partly at {', '.join(partial)}" if partial else "")
               + (f"; not at {', '.join(not_rep)}" if not_rep else "") + ". "
               + "Mean gain of the better QAT over GPTQ by precision (nats/token; negative: QAT worse): "
               + ", ".join(f"{p} {gains[p]:+.4f}" for p in order) + ". "
               + ("On average QAT is worse than GPTQ at every precision." if all(g <= 0 for g in gains.values())
                  else "The gain is largest at the lowest precision, as the seed found." if order and
                  order[0] == min(by_prec, key=lambda p: int(p.split('-')[0]) if p[0].isdigit() else 99)
                  else "The gain is not largest at the lowest precision."))
    return summary + "\n\n" + "\n".join(lines)


def misalignment_text(records: Sequence[dict]) -> str:
    """Rank correlations of local objective vs NLL, along each path and across methods' end points."""
    from scipy.stats import spearmanr

    summary = ["| format | path | models | median spearman(local, NLL) along the path | paths with rho > 0 |",
               "|---|---|---|---|---|"]
    for fmt in _fmt_order(records):
        for meth in ("rtn", "gptq", "qat_rtn", "qat_gptq"):
            rhos = [r["spearman"][meth] for r in records if r["format"] == fmt and r["paths"].get(meth)
                    and not math.isnan(r["spearman"][meth])]
            if rhos:
                summary.append(f"| {fmt} | {LABELS[meth]} | {len(rhos)} | {statistics.median(rhos):+.2f} | "
                               f"{sum(x > 0 for x in rhos)} of {len(rhos)} |")
    lines = ["| format | path | spearman(local, NLL) along the path | local: start -> end | NLL: start -> end |",
             "|---|---|---|---|---|"]
    for fmt in _fmt_order(records):
        for r in (r for r in records if r["format"] == fmt):
            for meth in ("rtn", "gptq", "qat_rtn", "qat_gptq"):
                path = r["paths"].get(meth)
                if not path:
                    continue
                lines.append(f"| {fmt} ({r['model']}) | {LABELS[meth]} | {r['spearman'][meth]:+.2f} | "
                             f"{path[0]['local']:.3g} -> {path[-1]['local']:.3g} | "
                             f"{path[0]['nll']:.4f} -> {path[-1]['nll']:.4f} |")
    ends_local, ends_nll = [], []
    for r in records:
        for meth in ("rtn", "gptq", "qat_rtn", "qat_gptq"):
            ends_local.append(r["paths"][meth][-1]["local_rel"])
            ends_nll.append(r["methods"][meth]["delta_nll"])
    rho = float(spearmanr(ends_local, ends_nll).statistic) if len(ends_local) > 2 else math.nan
    qat_up = sum(1 for r in records for m in ("qat_rtn", "qat_gptq")
                 if r["paths"][m][-1]["local"] > r["paths"]["gptq"][-1]["local"]
                 and r["methods"][m]["nll"] < r["methods"]["gptq"]["nll"])
    n_qat = 2 * len(records)
    far = sum(1 for r in records for m in ("qat_rtn", "qat_gptq")
              if r["paths"][m][-1]["distance"] > r["paths"]["gptq"][-1]["distance"]
              and r["methods"][m]["nll"] < r["methods"]["gptq"]["nll"])
    text = (f"Across all end points (every model, format and method: {len(ends_local)} quantized models), the "
            f"rank correlation between the relative local objective and the test NLL increase is "
            f"**{rho:+.2f}** (Spearman). In {qat_up} of {n_qat} QAT runs the QAT model ends with a *larger* summed "
            f"layer-output error than GPTQ and yet a lower test NLL; in {far} of {n_qat} it ends *farther* from the "
            f"FP weights than GPTQ and yet lower.")
    return (text + "\n\n" + "\n".join(summary) + "\n\n<details><summary>Every path (model, format, method)"
            "</summary>\n\n" + "\n".join(lines) + "\n\n</details>")


def _settings_key(r: dict) -> str:
    return json.dumps(r["settings"], sort_keys=True)


def split_settings(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(main, other): the records of the most common study settings (the study proper), and the rest (runs with
    other settings, e.g. another QAT learning rate, reported as a sensitivity check)."""
    counts = Counter(_settings_key(r) for r in records)
    main_key = counts.most_common(1)[0][0] if counts else ""
    return ([r for r in records if _settings_key(r) == main_key], [r for r in records if _settings_key(r) != main_key])


def sensitivity_text(main: Sequence[dict], other: Sequence[dict]) -> str:
    """Per alternative settings (what differs from the main study's), per precision: the better QAT minus GPTQ in
    the main study and under those settings on the same model x format cells, and the significant wins of each."""
    if not other:
        return ""
    base = json.loads(_settings_key(main[0])) if main else {}
    by_key: dict[str, list[dict]] = {}
    for r in other:
        by_key.setdefault(_settings_key(r), []).append(r)
    main_cell = {(r["model"], r["format"]): r for r in main}
    blocks = []
    for key, rs in by_key.items():
        st = json.loads(key)
        changed = ", ".join(f"{k} {base.get(k)} -> {v}" for k, v in st.items() if base.get(k) != v) or "none"
        lines = [f"**{changed}** ({len(rs)} cells: {', '.join(sorted({r['model'] for r in rs}))}):", "",
                 "| precision | cells | GPTQ increase (nats) | best QAT - GPTQ, main | QAT wins, main | "
                 "best QAT - GPTQ, these settings | QAT wins, these settings |", "|---|---|---|---|---|---|---|"]
        pairs = [(main_cell[(r["model"], r["format"])], r) for r in rs if (r["model"], r["format"]) in main_cell]
        by_prec: dict[str, list[tuple[dict, dict]]] = {}
        for m, r in pairs:
            by_prec.setdefault(_precision(r["format"]), []).append((m, r))
        for prec in sorted(by_prec, key=lambda x: (not x[0].isdigit(), x)):
            ps = by_prec[prec]
            cols = []
            for side in (0, 1):
                ds = [_best_minus_gptq(x[side]) for x in ps]
                cols += [f"{sum(d['mean'] for d in ds) / len(ds):+.4f}", str(sum(d["mean"] < -2 * d["se"] for d in ds))]
            gptq = sum(m["methods"]["gptq"]["delta_nll"] for m, _ in ps) / len(ps)
            lines.append(f"| {prec} | {len(ps)} | {gptq:.4f} | " + " | ".join(cols) + " |")
        lines += ["", f"Reproduce: `{reproduce_command(rs)}`"]
        blocks.append("\n".join(lines))
    return ("## Sensitivity: the same cells under other settings\n\nThe study above uses one QAT recipe. Cells "
            "re-run with other settings (same results file, told apart by their settings) are compared here with "
            "the main study on exactly those cells.\n\n" + "\n\n".join(blocks) + "\n")


def reproduce_command(records: Sequence[dict], out: str = "reports") -> str:
    """The ``quantpredict study ptq-vs-qat`` command line that computes ``records`` (one settings), resumable."""
    st = records[0]["settings"]
    models = list(dict.fromkeys(r["model"] for r in records))
    flags = {"steps": st["steps"], "lr": st["lr"], "batch-size": st["batch_size"],
             "calib-samples": st["calib_samples"], "calib-seq-len": st["calib_seq_len"],
             "max-windows": st["max_windows"] or 0, "track-windows": st["track_windows"],
             "track-every": st["track_every"], "seed": st["seed"]}
    return (f"quantpredict study ptq-vs-qat --models {' '.join(models)} --formats {','.join(_fmt_order(records))} "
            + " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in flags.items())
            + f" --out {out}")


def is_snapshot(model: str) -> bool:
    """A zoo training snapshot (``llama-s-t25``: the model at 25% of its token budget), i.e. under-trained."""
    return re.search(r"-t\d+$", model) is not None


def _headline(records: Sequence[dict]) -> str:
    """:func:`statement` on the fully trained models (the seed's claim is about trained models; fine-tuning an
    under-trained snapshot also continues its training), on every model if there are only snapshots."""
    trained = [r for r in records if not is_snapshot(r["model"])]
    if not trained or len(trained) == len(records):
        return statement(records)
    return (f"On the {len({r['model'] for r in trained})} fully trained models ({len(trained)} cells; the -tNN "
            "training snapshots are left out here because fine-tuning them also continues their training, see the "
            "size table): " + statement(trained))


def _settings_line(records: Sequence[dict], other: Sequence[dict]) -> str:
    if not other:
        return ""
    st = records[0]["settings"]
    return (f"\nThese results are for QAT peak lr {st['lr']:g}, {st['steps']} steps of {st['batch_size']} windows. "
            "Cells re-run under other settings are compared with them in the sensitivity section at the end.\n")


def render_report(records: Sequence[dict], out_dir: str | Path, *, command: str = "", pending: str = "",
                  hurts: Sequence[dict] = (), controls: Sequence[dict] = ()) -> Path:
    """Write the figures and ``qat.md`` into ``out_dir``; returns the markdown's path.

    ``records``: the zoo study (``qat_results.jsonl``); records of settings other than the most common one go to its
    sensitivity section only. ``hurts``: the study where quantization hurts (``qat_hurts_results.jsonl``: a real
    model and long-trained checkpoints), rendered above the zoo's sections by :func:`quantpredict.studies.hurts.
    hurts_sections`, with verdicts computed from the records. ``controls``: the FP fine-tuning controls
    (``qat_fp_control.jsonl``), paired there with the cells of the same model and settings.
    """
    from quantpredict.studies.hurts import hurts_sections

    out = Path(out_dir)
    if not records and not hurts:
        raise ValueError("no study results to report; run `quantpredict study ptq-vs-qat` first")
    out.mkdir(parents=True, exist_ok=True)
    top = hurts_sections(hurts, out, controls=controls) if hurts else ""
    zoo = _zoo_markdown(records, out, command=command, pending=pending) if records else ""
    md = (f"""# PTQ vs QAT at the same data budget, and the local-vs-global misalignment

Generated by `quantpredict study ptq-vs-qat` (`quantpredict.studies.study` / `quantpredict.studies.qat_report` /
`quantpredict.studies.hurts`) from `{HURTS_NAME}` (where quantization hurts: a real model and long-trained checkpoints)
and `{RESULTS_NAME}` (the zoo, where it barely does).

""" + top + ("\n## The zoo (the shipped study)\n\n" + zoo if zoo else ""))
    path = out / "qat.md"
    path.write_text(md)
    return path


def _demote(md: str) -> str:
    """Every markdown heading one level down (the zoo's sections sit under their own heading)."""
    return "\n".join("#" + line if line.startswith("##") else line for line in md.split("\n"))


def _zoo_markdown(records: Sequence[dict], out: Path, *, command: str, pending: str) -> str:
    """The zoo study's sections (figures written to ``out``)."""
    records, other = split_settings(records)
    trained = [r for r in records if not is_snapshot(r["model"])]
    render_figures(trained or records, out)  # the snapshots would only blur the picture (see the size table)
    s = records[0]["settings"]
    models = sorted({r["model"] for r in records})
    total_s = sum(r["seconds"] for r in records)
    md = f"""Results: `{RESULTS_NAME}`.

## What was run

- Models: {', '.join(models)}; formats: {', '.join(_fmt_order(records))}.
- Calibration (the data budget, identical for every method): {s['calib_samples']} windows of {s['calib_seq_len']}
  tokens of WikiText-2 *train* at seeded offsets (seed {s['seed']}), exactly the windows GPTQ calibrates on.
- QAT: {s['steps']} AdamW steps of {s['batch_size']} windows ({s['steps'] * s['batch_size'] / s['calib_samples']:.2f}
  passes over the calibration windows), peak lr {s['lr']:g} cosine-decayed to 0, straight-through fake quantization of
  every linear layer PTQ quantizes, latent weights from the FP weights (from RTN) or GPTQ's output (from GPTQ).
- Test: WikiText-2 *test*, the first {records[0]['eval_windows']} windows of {s['seq_len']} tokens
  ({records[0]['eval_tokens']} scored tokens), every method on the same windows; ± is the paired standard error over
  windows. Trajectory NLLs: the first {s['track_windows']} of those windows (a fixed test prefix), every
  {s['track_every']} QAT steps and after every layer of PTQ.
- Single-threaded CPU, shared with other jobs: {total_s / 60:.1f} minutes for the cells above.
- Reproduce (resumes from the results file; cells already there are skipped):
  `{reproduce_command(records, str(out))}`
{('- Command of this rendering: `' + command + '`') if command else ''}

{('**Pending:** ' + pending) if pending else ''}

## Result

{_headline(records)}
{_settings_line(records, other)}

By model size (all formats pooled):

{by_size(records)}

| | |
|---|---|
| ![NLL increase](qat_ppl.png) | ![loss curves](qat_loss.png) |

{_table(records)}

(Perplexities on the test windows above; "best QAT - GPTQ" is the paired test-NLL difference of the better QAT run;
rho: Spearman correlation of the summed local objective with the NLL along the GPTQ path (layers added one by one) and
along the QAT-from-RTN steps.)

## Misalignment: local objective vs global NLL

The local objective is GPTQ's, summed over layers: `sum_l tr(dW_l H_l dW_l^T)` with `dW = W - W_fp` and `H_l` the FP
model's layer-input Hessian on the calibration windows (= `2/N sum_l ||dW_l X_l||^2`). GPTQ minimises it layer by
layer; QAT minimises the training NLL on the calibration windows and leaves the local objective free to move either way.
The rank correlations below say how closely the test NLL followed the local objective along each path (QAT paths have
only a few tracked points, so their correlations are coarse).

{misalignment_text(records)}

![local objective vs NLL](qat_misalignment.png)

The basin picture: distance to the FP weights against NLL.

![distance vs NLL](qat_basin.png)

{sensitivity_text(records, other)}"""
    return _demote(md)


RESULTS_NAME = "qat_results.jsonl"
HURTS_NAME = "qat_hurts_results.jsonl"
