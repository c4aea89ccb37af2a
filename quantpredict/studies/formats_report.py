"""``reports/formats.md``: KLD and perplexity against bits per element for the layouts checkpoints ship (AutoGPTQ's
uintK, bitsandbytes' NF4, llama.cpp's types and named mixes), with and without AWQ, next to the MX/INT formats of
the shipped sweep, per model.

Rendered from whatever runs the stores hold (a partial sweep gives a partial page that says how many runs it
shows); nothing on the page is written by hand but the fixed explanations. Every point is one finished run:
weights only, the model's own evaluation setting (the number of WikiText-2 test windows most of its new runs
use; runs measured on another number of windows are left out and counted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

KINDS = ("MX / INT (shipped sweep)", "uintK (AutoGPTQ)", "NF4 (bitsandbytes)", "llama.cpp types", "llama.cpp mixes")
KIND_COLORS = dict(zip(KINDS, ("0.6", "tab:blue", "tab:green", "tab:red", "tab:purple")))
METHOD_MARKERS = {"RTN": "o", "GPTQ": "s", "AWQ+RTN": "^", "AWQ+GPTQ": "D"}
K_QUANTS = ("q4_k", "q5_k", "q6_k")

# llama.cpp's LLaMA 3 8B scoreboard (examples/perplexity/README.md, rows without an importance matrix): mean KLD
# against FP16 on WikiText-2 test and the file size; bits per weight = size / 8.03e9 weights (the whole file,
# embeddings and output head included)
LLAMA3_8B = (("q8_0", 7.96, 0.001391), ("q6_K", 6.14, 0.005669), ("q5_K_M", 5.33, 0.011093),
             ("q5_K_S", 5.21, 0.017177), ("q5_1", 5.65, 0.018485), ("q5_0", 5.21, 0.022964),
             ("q4_K_M", 4.58, 0.032032), ("q4_K_S", 4.37, 0.044040))
LLAMA3_8B_PARAMS = 8.03e9


@dataclass(frozen=True)
class Sources:
    """The stores a page is rendered from: the new sweeps, and the shipped sweeps whose MX/INT runs are drawn
    beside them (only the MX/INT runs of those are used)."""

    new: tuple[Path, ...]
    baseline: tuple[Path, ...]


def _read(path: Path) -> pd.DataFrame:
    from quantpredict.runs.store import RunStore

    with RunStore(path, create=False) as store:
        frame = store.to_frame(status="done")
    return frame.assign(store=path.name)


ROOT = Path(__file__).resolve().parents[2]


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the page names no machine's folders)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def load(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The finished runs of the stores that exist, and the names of those that do not."""
    frames, missing = [], []
    for p in map(Path, paths):
        if p.exists():
            frames.append(_read(p))
        else:
            missing.append(shown(p))
    if not frames:
        return pd.DataFrame(), missing
    return pd.concat(frames, ignore_index=True).drop_duplicates("run_key"), missing


@cache
def _skeleton(model: str):
    from quantpredict.errors import QuantpredictError
    from quantpredict.models import skeleton

    try:
        return skeleton(model)
    except (QuantpredictError, OSError, ValueError):
        return None


def _mix_and_share(model: str, label: str) -> tuple[str | None, float]:
    """(the named mix a per-layer recipe is, the share of its quantized weights in k-quant types)."""
    from quantpredict import arch
    from quantpredict.mixes import mix_of
    from quantpredict.recipe import SKIP, Recipe

    recipe = Recipe.from_label(label)
    tree = _skeleton(model)
    if tree is None or not recipe.layer_formats:
        return None, (1.0 if recipe.weight_format in K_QUANTS else 0.0)
    sizes = [r.weight.numel() for r in arch.linear_layers(tree)]
    if len(sizes) != len(recipe.layer_formats):
        return None, float("nan")
    quantized = [(n, f) for n, (f, _) in zip(sizes, recipe.layer_formats) if f != SKIP]
    share = sum(n for n, f in quantized if f in K_QUANTS) / max(sum(n for n, _ in quantized), 1)
    return mix_of(recipe, tree), share


def _method(row: pd.Series) -> str | None:
    from quantpredict.recipe import Recipe

    r = Recipe.from_label(row["recipe"])
    if r.qat or r.act_format is not None or r.smoothquant_alpha is not None:
        return None
    return ("AWQ+" if r.awq else "") + r.method.upper()


def _kind(weight_format: str, mix: str | None, mixed: bool) -> str | None:
    from quantpredict.formats import get_format

    if mixed:
        return "llama.cpp mixes" if mix else None
    family = get_format(weight_format).family
    return {"mx": KINDS[0], "int": KINDS[0], "fp8": KINDS[0], "asym": KINDS[1], "nf4": KINDS[2],
            "ggml": KINDS[3]}.get(family)


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def classify(runs: pd.DataFrame, *, baseline: bool) -> pd.DataFrame:
    """One row per drawable run: model, display name, kind, method, bits, KLD, perplexities, k-quant share."""
    rows = []
    for _, r in runs.iterrows():
        method = _method(r)
        kld, bits = _number(r.get("kld")), _number(r.get("bits_per_element"))
        if not math.isfinite(bits):  # a run without the format features: the quantizer's own count
            bits = _number(r.get("quant_effective_bits_per_param"))
        if method is None or not (math.isfinite(kld) and math.isfinite(bits)):
            continue
        mixed = "-L=" in r["recipe"]
        mix, share = _mix_and_share(r["model"], r["recipe"]) if mixed else (None, float(r["weight_format"] in
                                                                                         K_QUANTS))
        kind = _kind(r["weight_format"], mix, mixed)
        if kind is None or (baseline and kind != KINDS[0]) or (not baseline and kind == KINDS[0]):
            continue
        rows.append({"model": r["model"], "name": mix or r["recipe"], "kind": kind, "method": method,
                     "bits": bits, "kld": kld, "ppl_fp": float(r["ppl_fp"]),
                     "ppl": float(r["ppl_quant"]), "top1": float(r.get("top1_agree", np.nan)),
                     "windows": r["eval_max_windows"], "kquant_share": share, "store": r["store"]})
    return pd.DataFrame(rows, columns=["model", "name", "kind", "method", "bits", "kld", "ppl_fp", "ppl", "top1",
                                       "windows", "kquant_share", "store"])


def select_setting(points: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Each model's points at its evaluation setting (the window count most of its new runs use), and how many
    points another setting left out."""
    if points.empty:
        return points, 0
    keep = []
    for _model, group in points.groupby("model", sort=False):
        new = group[group["kind"] != KINDS[0]]
        windows = (new if not new.empty else group)["windows"].mode().iloc[0]
        keep.append(group[group["windows"] == windows])
    kept = pd.concat(keep)
    return kept, len(points) - len(kept)


# ---- figures --------------------------------------------------------------------------------------------------------


def _panels(models: Sequence[str]):
    from quantpredict.report.style import PANEL, pyplot

    n = max(len(models), 1)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), squeeze=False)
    return fig, axes.ravel()


def _legend(fig) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=KIND_COLORS[k], label=k) for k in KINDS]
    handles += [Line2D([], [], ls="", marker=m, color="k", mfc="none", label=name)
                for name, m in METHOD_MARKERS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=5, frameon=False, bbox_to_anchor=(0.5, 0.0))


def plot(points: pd.DataFrame, path: Path, y: str) -> Path:
    """One panel per model: ``y`` (``kld``, log axis, or ``ppl``) against bits per element."""
    from quantpredict.report.style import empty_panel, save, style

    models = list(dict.fromkeys(points["model"])) if not points.empty else []
    with style():
        fig, axes = _panels(models)
        if not models:
            empty_panel(axes[0], "no finished runs yet")
        for ax, model in zip(axes, models):
            g = points[points["model"] == model]
            for (kind, method), h in g.groupby(["kind", "method"]):
                face = KIND_COLORS[kind] if method in ("RTN", "GPTQ") else "none"
                ax.scatter(h["bits"], h[y], marker=METHOD_MARKERS[method], s=18, edgecolors=KIND_COLORS[kind],
                           facecolors=face, linewidths=0.9, zorder=3 if kind != KINDS[0] else 2)
            if y == "kld":
                ax.set_yscale("log")
                ax.set_ylabel("KLD vs FP (nats/token)")
            else:
                ax.axhline(g["ppl_fp"].iloc[0], color="k", lw=0.8, ls="--")
                ax.set_ylabel("perplexity (dashed: FP)")
            ax.set_xlabel("weight bits per element (scales included)")
            ax.set_title(f"{model} ({int(g['windows'].iloc[0])} test windows)")
        for ax in axes[len(models):]:
            if models:
                ax.set_visible(False)
        _legend(fig)
        fig.tight_layout()
        return save(fig, path)


# ---- tables ---------------------------------------------------------------------------------------------------------


def model_table(points: pd.DataFrame) -> str:
    lines = ["| recipe | kind | method | bits | KLD | ppl | Δppl | k-quant share |",
             "|---|---|---|---|---|---|---|---|"]
    for _, p in points.sort_values(["bits", "kld"]).iterrows():
        share = "" if p["kind"] not in (KINDS[3], KINDS[4]) else f"{100 * p['kquant_share']:.0f}%"
        lines.append(f"| {p['name']} | {p['kind']} | {p['method']} | {p['bits']:.3f} | {p['kld']:.5f} | "
                     f"{p['ppl']:.3f} | {100 * (p['ppl'] / p['ppl_fp'] - 1):+.2f}% | {share} |")
    return "\n".join(lines)


def awq_table(points: pd.DataFrame) -> str:
    """KLD of RTN, AWQ+RTN, GPTQ and AWQ+GPTQ per model and format (formats with at least one AWQ run)."""
    new = points[points["kind"] != KINDS[0]].copy()
    new["base"] = new["name"].str.split("-").str[0]
    awq_formats = sorted(set(new.loc[new["method"].str.startswith("AWQ"), "base"]))
    if not awq_formats:
        return "No AWQ runs yet."
    order = ("RTN", "AWQ+RTN", "GPTQ", "AWQ+GPTQ")
    lines = ["| model | format | " + " | ".join(f"KLD {m}" for m in order) + " |", "|---|---|" + "---|" * len(order)]
    for model in dict.fromkeys(new["model"]):
        for fmt in awq_formats:
            g = new[(new["model"] == model) & (new["base"] == fmt) & (new["kind"] != KINDS[4])]
            if g.empty:
                continue
            cells = [f"{g.loc[g['method'] == m, 'kld'].iloc[0]:.5f}" if (g["method"] == m).any() else ""
                     for m in order]
            lines.append(f"| {model} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchors_table() -> str:
    lines = ["| llama.cpp type | file size (GiB) | bits per weight (whole file) | mean KLD vs FP16 |",
             "|---|---|---|---|"]
    for name, gib, kld in LLAMA3_8B:
        lines.append(f"| {name} | {gib:.2f} | {gib * 8 * 2**30 / LLAMA3_8B_PARAMS:.2f} | {kld:.4f} |")
    return "\n".join(lines)


# ---- the page -------------------------------------------------------------------------------------------------------

INTRO = """\
# Shipped quantization layouts, AWQ and llama.cpp's mixes

KLD against the full-precision model and WikiText-2 test perplexity against weight bits per element (scales, zero
points and sub-block scales included; layers a recipe leaves in 16 bits count 16) for the layouts checkpoints ship:
AutoGPTQ's asymmetric `uint4`/`uint3` per group of 128 and `uint4_pc` per channel, bitsandbytes' `nf4`/`nf4_dq`,
llama.cpp's `q8_0`, `q5_0`, `q5_1` and its named k-quant mixes, with RTN, GPTQ, and AWQ before either, next to the
MX/INT formats of the shipped sweep (grey). Filled markers: RTN/GPTQ; open: AWQ. Generated by
`benchmarks/formats_report.py` from the run stores; rerun it as the sweeps fill them.
"""

KQUANT_NOTE = """\
## k-quants on these models

llama.cpp's k-quants store super-blocks of 256 weights along a row, and llama.cpp refuses them for a tensor whose
rows are not a multiple of 256, storing it as Q5_0 (for Q4_K), Q5_1 (Q5_K) or Q8_0 (Q6_K) instead, or as F16 when
not even 32 divides the row. The zoo's hidden sizes (64-192) are not multiples of 256, and SmolLM2's 576 is not
either; only MLP down projections whose inputs are 512, 768 or 1536 wide can hold k-quants. So plain `q4_k-rtn` is
a clear error on these models (quantpredict refuses it, naming the fallback) and is not swept; the `*_pure` mixes
are `llama-quantize --pure` on these shapes (one type everywhere, llama.cpp's fallback where rows do not allow it)
and the `q4_k_s/m`, `q5_k_s/m` mixes follow `llama_tensor_get_type` (more bits for `attn_v` and `ffn_down` by layer
index), each with the same fallback; the *k-quant share* column says how much of the weights really are in k-quant
types. On the zoo the mixes therefore mostly measure Q5_0/Q5_1/Q8_0 with k-quant down projections. `q5_k_s` and
`q5_k_pure` are the same recipe on these layers. Embeddings and the LM head are not quantized by quantpredict
(llama.cpp also quantizes them: the output head to Q6_K), so the bits here are those of the block linears only.
"""

ANCHORS = """\
## For context: llama.cpp's Llama-3-8B numbers

llama.cpp's LLaMA 3 8B scoreboard (`examples/perplexity/README.md`, rows without an importance matrix) measures, on
WikiText-2 test against FP16 logits:

{table}

The same README's LLaMA 2 vs 3 table (another run) reads q4_K_M 0.0310, q6_K 0.0047, q8_0 0.00075. These anchors are
not comparable in absolute terms with the KLDs above: an 8B model trained on 15T tokens is not a zoo model of
0.8-1.8M non-embedding parameters trained on 2-2.4M tokens, nor SmolLM2-135M (the same README shows Llama 3 losing
about 2.5x more KLD than Llama 2 at the same type: how a model was trained changes its sensitivity); llama.cpp
quantizes the embeddings and the output head too and counts bits over the whole file, where only the block linears
are quantized and counted here; its k-quants are real k-quants, where on these models they mostly fall back to
Q5_0/Q5_1/Q8_0 (above); and it scores the second half of 512-token chunks of the whole test split with its own
tokenizer against FP16 logits stored as 16-bit integers, where these runs score every token of the first 256 (zoo)
or 128 (SmolLM2) windows of 256 tokens against FP32 logits. What carries over is the ordering of types and the rough
factor between neighbouring ones.
"""


def render(sources: Sources, out: Path, fig_dir: Path | None = None) -> str:
    """Write the page to ``out`` (figures next to it, ``formats_kld.png`` and ``formats_ppl.png``); returns it."""
    fig_dir = fig_dir or out.parent
    new_runs, missing_new = load(sources.new)
    base_runs, missing_base = load(sources.baseline)
    new = classify(new_runs, baseline=False) if not new_runs.empty else classify(pd.DataFrame(), baseline=False)
    models = list(dict.fromkeys(new["model"]))
    base = pd.DataFrame(columns=new.columns)
    if not base_runs.empty and models:
        base = classify(base_runs[base_runs["model"].isin(models)], baseline=True)
    points, left_out = select_setting(pd.concat([new, base], ignore_index=True) if not base.empty else new)
    plot(points, fig_dir / "formats_kld.png", "kld")
    plot(points, fig_dir / "formats_ppl.png", "ppl")
    n_new = int((points["kind"] != KINDS[0]).sum()) if not points.empty else 0
    n_base = int((points["kind"] == KINDS[0]).sum()) if not points.empty else 0
    parts = [INTRO,
             f"Based on **{n_new} runs** of the new layouts ({', '.join(map(shown, sources.new))}) and "
             f"{n_base} MX/INT runs of the same models from the shipped sweeps "
             f"({', '.join(map(shown, sources.baseline))}), {len(models)} models"
             + (f"; {left_out} runs at another evaluation setting are left out" if left_out else "")
             + (f"; stores not found (yet): {', '.join(missing_new + missing_base)}" if missing_new + missing_base
                else "")
             + ".",
             "## KLD against bits per element\n\n![KLD against bits per element](formats_kld.png)",
             "## Perplexity against bits per element\n\n![perplexity against bits per element](formats_ppl.png)",
             "## AWQ\n\nKLD of each format without and with AWQ's scales (and, before RTN, its clipping search; see "
             "`quantpredict/quantize/awq.py`):\n\n" + awq_table(points) if not points.empty else "## AWQ\n\nNo runs.",
             KQUANT_NOTE, ANCHORS.format(table=anchors_table()), "## Every run, per model"]
    for model in dict.fromkeys(points["model"]) if not points.empty else []:
        g = points[points["model"] == model]
        parts.append(f"### {model}\n\nFP perplexity {g['ppl_fp'].iloc[0]:.3f}, {int(g['windows'].iloc[0])} test "
                     f"windows of 256 tokens.\n\n{model_table(g)}")
    if points.empty:
        parts.append("No finished runs of the new layouts yet.")
    text = "\n\n".join(parts) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
