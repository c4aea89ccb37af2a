"""The SmoothQuant+GPTQ study where quantization hurts: MXINT8 activations, weights at several formats, alpha 0.5/0.75.

For each model, :func:`run_sq_study` writes to a results file (JSON lines, appended as runs finish, resumable):

* one ``outliers`` record: the activation-outlier profile of every smooth pair on the FP model over the calibration
  windows (:func:`quantpredict.quantize.outliers.outlier_profile`) and each pair's local W+A output error with and
  without smoothing (:func:`~quantpredict.quantize.outliers.smoothing_local_errors`);
* one ``run`` record per (weight format, alpha, activation format): GPTQ (after SmoothQuant at ``alpha``, none for
  ``alpha=None``) with MXINT8 activations (and, as a reference, GPTQ with FP activations), compared with the FP model
  on WikiText-2 *test* (:func:`quantpredict.evaluate.compare`: perplexity, delta NLL, KLD and top-1 with standard
  errors, per-window values for paired contrasts) and the model size after quantization.

:func:`claims` turns the records into per-claim verdicts (:mod:`quantpredict.claims`) and :func:`sq_sections`
renders them as the sections of ``reports/ptq.md`` above the zoo's (``benchmarks/ptq_report.py``).
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from quantpredict.claims import Evidence, Verdict, paired, spearman_evidence, verdict, verdict_table
from quantpredict.studies.hurts import (  # noqa: F401 (is_long_trained, real_and_long: kept here too)
    is_long_trained,
    real_and_long,
    real_and_long_sections,
)

SQ_FORMATS: tuple[str, ...] = ("mxint4", "mxfp4_e2m1", "int4", "mxint8")
ALPHAS: tuple[float, ...] = (0.5, 0.75)
RESULTS_FILE = "sq_results.jsonl"
_LONG = re.compile(r"^(?P<base>.+)-d(?P<tpp>\d+)$")


@dataclass(frozen=True)
class SQSettings:
    """What every run of the study depends on besides model, format and alpha (recorded with every record)."""

    calib_samples: int = 128
    calib_seq_len: int = 256
    seq_len: int = 256
    max_windows: int | None = 64
    local_windows: int = 4
    act_format: str = "mxint8"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (one JSON object per line); a missing file: no records."""
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _append(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _outlier_record(model_fp, label: str, card: dict, windows: torch.Tensor, formats: Sequence[str],
                    alphas: Sequence[float], s: SQSettings) -> dict[str, Any]:
    from quantpredict import arch
    from quantpredict.quantize.outliers import outlier_profile, smoothing_local_errors

    t0, c0 = time.perf_counter(), time.process_time()
    pairs, absmax = outlier_profile(model_fp, windows)
    local = smoothing_local_errors(model_fp, windows[: s.local_windows], absmax, formats, (None, *alphas),
                                   act_format=s.act_format)
    return {"kind": "outliers", "model": label, "family": arch.family(model_fp), "card": card,
            "settings": s.to_dict(), "pairs": [p.to_dict() for p in pairs], "local": [e.to_dict() for e in local],
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def _run_record(model_fp, tokenizer, label: str, card: dict, recipe, windows: torch.Tensor, s: SQSettings,
                fp_cache, alpha: float | None) -> dict[str, Any]:
    from quantpredict.evaluate import compare
    from quantpredict.quantize import quantize_model
    from quantpredict.studies.study import _max_rss_gb

    t0, c0 = time.perf_counter(), time.process_time()
    q = copy.deepcopy(model_fp)
    report = quantize_model(q, recipe, windows, progress=False)
    quant_s = time.perf_counter() - t0
    c = compare(model_fp, q, tokenizer, max_windows=s.max_windows, seq_len=s.seq_len, fp_cache=fp_cache,
                fp_key=label, progress=False)
    del q
    size = report.summary()
    return {"kind": "run", "model": label, "card": card, "settings": s.to_dict(), "format": recipe.weight_format,
            "alpha": alpha, "act_format": recipe.act_format, "method": recipe.method, "label": recipe.label,
            "ppl_fp": c.ppl_fp, "ppl": c.ppl_quant, "delta_nll": c.delta_nll, "delta_nll_se": c.delta_nll_se,
            "kld": c.kld, "kld_se": c.kld_se, "top1": c.top1_agreement_pct, "top1_se": c.top1_agreement_pct_se,
            "eval_tokens": c.eval_tokens, "windows": c.windows,
            "window_delta_nll": list(c.window_delta_nll), "window_kld": list(c.window_kld),
            "window_tokens": list(c.window_tokens),
            "size": {k: size[k] for k in ("effective_bits_per_param", "model_bits_per_param", "size_bytes",
                                          "bf16_size_bytes", "compression_ratio", "quantized_params",
                                          "total_params")},
            "quantize_seconds": quant_s, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "max_rss_gb": _max_rss_gb()}


def run_sq_study(models: Sequence[str], formats: Sequence[str] = SQ_FORMATS, alphas: Sequence[float] = ALPHAS, *,
                 settings: SQSettings | None = None, results: str | Path = Path("reports") / RESULTS_FILE,
                 weights_only: bool = True, fp_cache_dir: str | Path | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Run the study for ``models`` (zoo or registry names, or model directories filed under their last part),
    appending each finished record to ``results``; records already there with the same settings are skipped.

    Per model: the outlier record, then per format GPTQ with ``settings.act_format`` activations (alpha ``None``)
    and SmoothQuant at each alpha before GPTQ with those activations, then (``weights_only``) GPTQ with FP
    activations at every format. ``fp_cache_dir``: where the FP logits are kept between the comparisons of one
    model when they do not fit in 2 GiB of memory (SmolLM2's 64 windows: 3.2 GB on disk); ``None``: the FP model
    runs every time.
    Returns every record in the file afterwards.
    """
    from quantpredict import arch, data
    from quantpredict.evaluate import FPLogitsCache
    from quantpredict.formats import get_format
    from quantpredict.models import load
    from quantpredict.quantize import Recipe
    from quantpredict.studies.study import model_card, model_label

    s = settings or SQSettings()
    for f in (*formats, s.act_format):
        get_format(f)
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {a}")
    out = Path(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["model"], r["kind"], r.get("label")) for r in read_records(out) if _key(r["settings"]) == _key(
        s.to_dict())}
    for name in models:
        label = model_label(name)
        configs = [(f, a, s.act_format) for f in formats for a in (None, *alphas)]
        configs += [(f, None, None) for f in formats if weights_only]  # the reference, least informative: last
        recipes = [(Recipe(f, method="gptq", smoothquant_alpha=a, act_format=act, calib_samples=s.calib_samples,
                           calib_seq_len=s.calib_seq_len, seed=s.seed), a) for f, a, act in configs]
        todo = [(r, a) for r, a in recipes if (label, "run", r.label) not in done]
        need_outliers = (label, "outliers", None) not in done
        if not todo and not need_outliers:
            continue
        card = model_card(name)
        model_fp, tok = load(name, dtype="float32")
        arch.require_smoothquant(model_fp)
        calib = data.calibration_windows(data.token_stream(tok, "wikitext2", "train"), s.calib_samples,
                                         s.calib_seq_len, seed=s.seed)
        if need_outliers:
            rec = _outlier_record(model_fp, label, card, calib, formats, alphas, s)
            _append(out, rec)
            print(f"{label}: outlier profile ({len(rec['pairs'])} pairs, median ratio "
                  f"{_median([p['ratio'] for p in rec['pairs']]):.1f}; {rec['seconds']:.0f} s)", flush=True)
        cache = FPLogitsCache(directory=fp_cache_dir)
        try:
            for recipe, alpha in todo:
                rec = _run_record(model_fp, tok, label, card, recipe, calib, s, cache, alpha)
                _append(out, rec)
                print(f"{label} {recipe.label}: ppl {rec['ppl']:.3f} (FP {rec['ppl_fp']:.3f}), KLD {rec['kld']:.4f}, "
                      f"{rec['size']['compression_ratio']:.2f}x smaller ({rec['seconds']:.0f} s)", flush=True)
        finally:
            cache.close()
        del model_fp
    return read_records(out)


# ---- claims -------------------------------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    ys = sorted(x for x in xs if math.isfinite(x))
    if not ys:
        return math.nan
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def _runs(records: Sequence[dict]) -> dict[tuple[str, str, float | None, str | None], dict]:
    """``{(model, format, alpha, act_format): run record}`` (the last record of a cell wins)."""
    return {(r["model"], r["format"], r["alpha"], r["act_format"]): r for r in records if r["kind"] == "run"}


def _outliers(records: Sequence[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in records if r["kind"] == "outliers"}


def sq_gain(base: dict, sq: dict, key: str = "window_delta_nll") -> tuple[float, float]:
    """``base - sq`` of a per-window quantity (delta NLL or KLD) averaged over windows, with its paired se
    (positive: SmoothQuant better). The window mean weights every window alike (they score equally many tokens but
    the first under a BOS protocol)."""
    return paired(base[key], sq[key])


def layer_gains(outliers: dict, fmt: str, alpha: float) -> tuple[list[float], list[float]]:
    """(outlier ratio, local gain ``1 - err(alpha) / err(none)``) per smooth pair, for one format and alpha."""
    err = {(e["norm"], e["weight_format"], e["alpha"]): e["error"] for e in outliers["local"]}
    ratios, gains = [], []
    for p in outliers["pairs"]:
        base, sq = err.get((p["norm"], fmt, None)), err.get((p["norm"], fmt, alpha))
        if base is None or sq is None or base <= 0:
            continue
        ratios.append(p["ratio"])
        gains.append(1.0 - sq / base)
    return ratios, gains


def _groups(models: Sequence[str]) -> dict[str, list[str]]:
    """Long-trained checkpoints by family (``llama-xs`` for ``llama-xs-d30``: a 2-block model has 4 smooth pairs,
    too few for a rank correlation alone); any other model on its own."""
    out: dict[str, list[str]] = {}
    for m in models:
        match = _LONG.match(m)
        out.setdefault(match.group("base") if match else m, []).append(m)
    return out


def _alphas(records: Sequence[dict]) -> list[float]:
    return sorted({r["alpha"] for r in records if r["kind"] == "run" and r["alpha"] is not None})


def _formats(records: Sequence[dict]) -> list[str]:
    seen = {r["format"] for r in records if r["kind"] == "run"}
    return [f for f in SQ_FORMATS if f in seen] + sorted(seen - set(SQ_FORMATS))


PPL_BUDGET = 0.03  # the seed claim (arXiv 2405.07135): SmoothQuant+GPTQ in MX formats costs only +1-3% perplexity


def claim_small_cost(records: Sequence[dict], model: str, act: str) -> list[Verdict]:
    """The seed claim on one model, per MX weight format: SmoothQuant+GPTQ with ``act`` activations costs at most
    :data:`PPL_BUDGET` perplexity against FP. Cells: the alphas; value ``log(1.03) - delta NLL`` with the delta's
    paired se (positive: within the budget); the size reduction is in the scope."""
    budget = math.log1p(PPL_BUDGET)
    runs = [r for r in _runs(records).values() if r["model"] == model and r["alpha"] is not None
            and r["act_format"] == act and r["format"].startswith("mx")]
    out = []
    for fmt in [f for f in _formats(records) if any(r["format"] == f for r in runs)]:
        cells = sorted((r for r in runs if r["format"] == fmt), key=lambda r: r["alpha"])
        ev = [Evidence(f"{model} {fmt} alpha {r['alpha']:g}", budget - r["delta_nll"], r["delta_nll_se"])
              for r in cells]
        out.append(verdict(f"SmoothQuant+GPTQ in MX formats with {act.upper()} activations costs at most "
                           f"{PPL_BUDGET:.0%} perplexity",
                           f"{model} {fmt} ({cells[0]['size']['compression_ratio']:.2f}x smaller)", ev))
    return out


def claims(records: Sequence[dict]) -> list[Verdict]:
    """Per model: the activation format costs NLL on top of GPTQ (cells: formats; what SmoothQuant could win back),
    SmoothQuant lowers NLL / KLD at each alpha (cells: formats), its local gain follows the outliers across layers
    (cells: format x alpha); across models: its NLL gain follows the models' median outlier ratio."""
    runs, outl = _runs(records), _outliers(records)
    models = sorted({r["model"] for r in records})
    act = next((r["act_format"] for r in records if r["kind"] == "run" and r["act_format"]), "mxint8")
    out: list[Verdict] = []
    for model in models:
        ev = []
        for fmt in _formats(records):
            w_only, w_a = runs.get((model, fmt, None, None)), runs.get((model, fmt, None, act))
            if w_only and w_a:
                ev.append(Evidence(f"{model} {fmt}", *sq_gain(w_a, w_only)))  # W+A minus W only: the activations' cost
        if ev:
            out.append(verdict(f"{act.upper()} activations raise the NLL on top of GPTQ's weights", model, ev))
        for alpha in _alphas(records):
            for key, what in (("window_delta_nll", "NLL"), ("window_kld", "KLD to FP")):
                ev = []
                for fmt in _formats(records):
                    base, sq = runs.get((model, fmt, None, act)), runs.get((model, fmt, alpha, act))
                    if base and sq:
                        ev.append(Evidence(f"{model} {fmt}", *sq_gain(base, sq, key)))
                if ev:
                    out.append(verdict(f"SmoothQuant (alpha {alpha:g}) before GPTQ lowers the {what} with "
                                       f"{act.upper()} activations", model, ev))
        out += claim_small_cost(records, model, act)
    for group, members in sorted(_groups([m for m in models if m in outl]).items()):
        ev = []
        for fmt in _formats(records):
            for alpha in _alphas(records):
                xs: list[float] = []
                ys: list[float] = []
                for m in members:
                    x, y = layer_gains(outl[m], fmt, alpha)
                    xs, ys = xs + x, ys + y
                if xs:  # a format the local pass did not measure is no cell
                    ev.append(spearman_evidence(f"{group} {fmt} alpha {alpha:g} ({len(xs)} pairs)", xs, ys))
        out.append(verdict("SmoothQuant's local gain follows the activation outliers across layers (Spearman)",
                           group if members == [group] else f"{group} ({len(members)} checkpoints pooled)", ev))
    ev = []
    for fmt in _formats(records):
        for alpha in _alphas(records):
            xs, ys = [], []
            for model in models:
                base, sq = runs.get((model, fmt, None, act)), runs.get((model, fmt, alpha, act))
                if base and sq and model in outl:
                    xs.append(_median([p["ratio"] for p in outl[model]["pairs"]]))
                    ys.append(sq_gain(base, sq)[0])
            if len(xs) >= 3:
                ev.append(spearman_evidence(f"{fmt} alpha {alpha:g} ({len(xs)} models)", xs, ys))
    if ev:
        out.append(verdict("SmoothQuant's NLL gain follows the models' median outlier ratio (Spearman)",
                           "across models: " + ", ".join(models), ev))
    return out


# ---- rendering ----------------------------------------------------------------------------------------------------


def outlier_table(records: Sequence[dict]) -> str:
    """Per model: tokens per parameter and the outlier ratio at attention inputs and MLP inputs (median, max)."""
    lines = ["| model | tokens/param | smooth pairs | ratio, attention inputs: median / max | ratio, MLP inputs: "
             "median / max | 99th-percentile channel / median (median over pairs) |", "|---|---|---|---|---|---|"]
    for model, r in sorted(_outliers(records).items()):
        kinds: dict[str, list[float]] = {"attn": [], "mlp": []}
        for p in r["pairs"]:
            kinds["attn" if "attn" in p["linears"][0] else "mlp"].append(p["ratio"])
        tpp = (r.get("card") or {}).get("tokens_per_param")
        cells = [f"{_median(v):.1f} / {max(v):.1f}" if v else "" for v in kinds.values()]
        lines.append(f"| {model} | {tpp if tpp else ''} | {len(r['pairs'])} | {cells[0]} | {cells[1]} | "
                     f"{_median([p['p99_ratio'] for p in r['pairs']]):.2f} |")
    return "\n".join(lines)


def _cell(values: tuple[float, float, float, float] | None) -> str:
    """A table cell of one quantized model: ``(ppl, delta NLL, its se, KLD)``, or n/a."""
    if values is None:
        return "n/a"
    ppl, delta, se, kld = values
    return f"{ppl:.3f} ({delta:+.4f} ± {se:.4f}; KLD {kld:.4f})"


def run_table(records: Sequence[dict]) -> str:
    """Per model and format: FP-activation GPTQ, then W+A8 GPTQ and SQ+GPTQ at each alpha (ppl, delta NLL, KLD),
    and the size (bits per parameter over the whole model, compression against bf16)."""
    runs = _runs(records)
    act = next((r["act_format"] for r in records if r["kind"] == "run" and r["act_format"]), "mxint8")
    alphas = _alphas(records)
    cols = ["GPTQ (W only)", f"GPTQ W+A{act[-1]}"] + [f"SQ{a:g}+GPTQ W+A{act[-1]}" for a in alphas]
    lines = ["| model | format | FP ppl | " + " | ".join(cols) + " | bits/weight (quantized layers) | bits/param "
             "(model) | x smaller than bf16 |", "|" + "---|" * (len(cols) + 6)]
    for model in sorted({k[0] for k in runs}):
        for fmt in _formats(records):
            row = [runs.get((model, fmt, None, None)), runs.get((model, fmt, None, act))]
            row += [runs.get((model, fmt, a, act)) for a in alphas]
            have = [r for r in row if r]
            if not have:
                continue
            cells = [_cell(r and (r["ppl"], r["delta_nll"], r["delta_nll_se"], r["kld"])) for r in row]
            size = have[0]["size"]
            lines.append(f"| {model} | {fmt} | {have[0]['ppl_fp']:.3f} | " + " | ".join(cells)
                         + f" | {size['effective_bits_per_param']:.2f} | {size['model_bits_per_param']:.2f} | "
                         f"{size['compression_ratio']:.2f} |")
    return "\n".join(lines)


def sq_command(records: Sequence[dict], out: str = "reports") -> str:
    """The command line that computes ``records`` (resumable), then renders ``ptq.md``."""
    s = records[0]["settings"]
    models = list(dict.fromkeys(r["model"] for r in records))
    alphas = " ".join(f"{a:g}" for a in _alphas(records))
    return (f"quantpredict study smoothquant --models {' '.join(models)} --formats {','.join(_formats(records))} "
            f"--alphas {alphas} --max-windows {s['max_windows'] or 0} --calib-samples {s['calib_samples']} "
            f"--calib-seq-len {s['calib_seq_len']} --out {out} && python benchmarks/ptq_report.py --render-only")


def _cost(records: Sequence[dict]) -> str:
    runs = [r for r in records if r["kind"] == "run"]
    secs = sum(r["seconds"] for r in records)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in records)
    rss = max((r.get("max_rss_gb") or 0.0 for r in runs), default=0.0)
    return (f"{len(runs)} quantized models and {len(_outliers(records))} outlier profiles, {secs / 60:.0f} minutes "
            f"wall ({cpu / 60:.0f} CPU minutes) single-threaded on a shared 2-core machine"
            + (f", peak RSS {rss:.1f} GB" if rss else ""))


def _section(title: str, intro: str, records: Sequence[dict], out: str) -> str:
    s = records[0]["settings"]
    return "\n".join([
        f"## {title}", "", intro, "",
        f"- Calibration: {s['calib_samples']} windows of {s['calib_seq_len']} tokens of WikiText-2 *train* (seed "
        f"{s['seed']}); test: the first {s['max_windows']} windows of {s['seq_len']} tokens of *test*. Weights by GPTQ "
        f"(MX formats in blocks of 32, int4 per output row); activations of every quantized linear fake-quantized to "
        f"{s['act_format'].upper()} (blocks of 32 along the hidden dimension). ± is the standard error over windows; "
        "KLD is KL(P_fp || P_q) per token.",
        f"- Cost: {_cost(records)}.", f"- Reproduce (resumable): `{sq_command(records, out)}`", "",
        "### Verdicts (computed from the results file)", "",
        "Per cell, the paired difference (GPTQ W+A8 minus SQ+GPTQ W+A8 over the same test windows; positive: "
        "SmoothQuant better) or a rank correlation; **holds**: beyond 2 se in the claimed direction in most cells and "
        "against it in none; **fails**: the reverse; **undecided**: otherwise.", "",
        verdict_table(claims(records)), "",
        "### Activation outliers at SmoothQuant's pairs", "",
        "Per-channel max|x| of each smoothed linear's input (the norm's output) over the calibration windows, FP "
        "model; ratio = largest channel over the median channel (1: flat; SmoothQuant targets large ratios).", "",
        outlier_table(records), "",
        "### Perplexity, KLD and size", "", run_table(records), ""])


StoreRef = tuple[str, Sequence[dict], str | None]  # (store path, its rows, the command that filled it)


def sq_sections(records: Sequence[dict], out: str = "reports", *, real_store: StoreRef | None = None,
                long_store: StoreRef | None = None) -> str:
    """The markdown of the real-model and long-trained sections of ``ptq.md`` (empty string for no records); each
    ends with :func:`store_section` of its ``(store path, store rows, command)``, if given."""
    def in_store(group: list[dict], store: StoreRef | None, with_table: bool) -> str:
        if store is None:
            return ""
        models = list(dict.fromkeys(r["model"] for r in group))
        return store_section(group, store[1], store[0], models, with_table=with_table, command=store[2])

    return real_and_long_sections(
        records,
        lambda real, names: _section(
            f"SmoothQuant+GPTQ where quantization hurts: a real model ({names})",
            "SmolLM2-135M, trained on ~2T tokens; its 'FP' weights are the dequantized Q4_1 weights it was shipped "
            "in (see its zoo card), so re-quantizing them is quantizing an already 4-bit network.", real, out)
        + in_store(real, real_store, True),
        lambda long, fams: _section(
            f"SmoothQuant+GPTQ where quantization hurts: long-trained checkpoints ({fams})",
            "Zoo architectures trained to 30-300 tokens per parameter (`<family>-d<tokens per parameter>`).",
            long, out) + in_store(long, long_store, False))


def _missing(x: Any) -> bool:
    """A store cell that holds no value (None, or pandas' NaN for a missing number or string)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def store_cells(rows: Sequence[dict]) -> dict[tuple[str, str, float | None, str | None], dict]:
    """The run store's finished GPTQ runs at the format's own block size (the recipe label names the bare format),
    keyed like :func:`_runs`:
    ``{(model, weight_format, smoothquant_alpha, act_format): row}``; ``rows`` are the store's rows as dicts (its
    column names)."""
    out = {}
    for r in rows:
        if r.get("method") != "gptq" or r.get("status", "done") != "done":
            continue
        if str(r.get("recipe", r["weight_format"])).split("-")[0] != r["weight_format"]:
            continue  # a block-size override (``mxint4_b128-...``): another format than the study's
        alpha = None if _missing(r.get("smoothquant_alpha")) else float(r["smoothquant_alpha"])
        act = None if _missing(r.get("act_format")) else str(r["act_format"])
        out[(r["model"], r["weight_format"], alpha, act)] = r
    return out


def store_agreement(records: Sequence[dict], rows: Sequence[dict]) -> tuple[int, int, int]:
    """Whether the run store reproduces the results file's SmoothQuant effects: over the (model, format, alpha)
    cells in both whose paired gain in the results file (:func:`sq_gain`, W+A8 GPTQ minus SQ+GPTQ delta NLL) is
    beyond 2 se, ``(cells whose store gain has the same sign, such cells, cells in both)``. The store's gain is the
    difference of its two runs' delta NLL (its own test windows; no per-window values, so no paired se)."""
    runs, store = _runs(records), store_cells(rows)
    same = resolved = both = 0
    for (model, fmt, alpha, act), sq in runs.items():
        base = runs.get((model, fmt, None, act))
        s_sq, s_base = store.get((model, fmt, alpha, act)), store.get((model, fmt, None, act))
        if alpha is None or act is None or base is None or s_sq is None or s_base is None:
            continue
        both += 1
        gain, se = sq_gain(base, sq)
        if abs(gain) > 2 * se:
            resolved += 1
            same += (s_base["delta_nll"] - s_sq["delta_nll"]) * gain > 0
    return same, resolved, both


def store_table(rows: Sequence[dict], models: Sequence[str], act: str = "mxint8") -> str:
    """Per model and format, the run store's GPTQ runs in the layout of :func:`run_table`: weight-only, W+A8, and
    SQ+GPTQ W+A8 at each alpha the store holds (ppl, delta NLL ± se, KLD), with the store's test-window count; empty
    string when the store holds no W+A8 run of ``models``."""
    store = {k: r for k, r in store_cells(rows).items() if k[0] in models}
    alphas = sorted({k[2] for k in store if k[2] is not None and k[3] == act})
    cols = ["GPTQ (W only)", f"GPTQ W+A{act[-1]}"] + [f"SQ{a:g}+GPTQ W+A{act[-1]}" for a in alphas]
    lines = ["| model | format | test windows | FP ppl | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 4)]
    fmts = [f for f in SQ_FORMATS if any(k[1] == f for k in store)]
    for model in models:
        for fmt in fmts:
            row = [store.get((model, fmt, None, None)), store.get((model, fmt, None, act))]
            row += [store.get((model, fmt, a, act)) for a in alphas]
            have = [r for r in row if r]
            if not any(r is not None for r in row[1:]):
                continue  # a weight-only run alone is not a SmoothQuant row
            cells = [_cell(r and (r["ppl_quant"], r["delta_nll"], r["delta_nll_se"], r["kld"])) for r in row]
            windows = sorted({int(r["eval_windows"]) for r in have})
            lines.append(f"| {model} | {fmt} | {'/'.join(map(str, windows))} | {have[0]['ppl_fp']:.3f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def store_section(records: Sequence[dict], rows: Sequence[dict], store: str, models: Sequence[str], *,
                  with_table: bool = True, command: str | None = None) -> str:
    """The markdown subsection that shows ``models``' SmoothQuant runs in the run store ``store`` (its ``rows``) and
    whether they reproduce the results file's resolved SmoothQuant effects, with the ``command`` that filled it
    (``<models>`` in it stands for ``models``); empty when the store holds none."""
    table = store_table(rows, models)
    if not table:
        return ""
    same, resolved, both = store_agreement([r for r in records if r["model"] in models], rows)
    return "\n".join([
        "", "### The same models as PTQ runs in the run store", "",
        f"`{store}` holds them as sweep runs (`quantpredict collect`: its own calibration draw and test windows, the "
        "predictors' protocol). The store's SmoothQuant gain (W+A8 delta NLL minus SQ+GPTQ's) has the sign of the "
        f"results file's paired gain in **{same} of the {resolved}** cells where that gain is beyond 2 se "
        f"(cells in both: {both}).", *([f"- Reproduce (resumable): `{command.replace('<models>', ' '.join(models))}`"]
          if command else []), "",
        table if with_table else f"(The table: `{store}`.)", ""])
