"""One look for every report figure: matplotlib's Agg backend, one rc style, one colour per model family.

A base-layer module (matplotlib only, loaded on first use) so that the predictors' own reports (``predict``) and
the full report (``report``) draw alike without predict importing report; ``quantpredict.report.style``
re-exports its names under the old path."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

DPI = 120
PANEL = (3.8, 3.2)  # inches per panel (width, height)
RC = {
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "savefig.bbox": "tight",
    "figure.dpi": DPI,
}
# One colour per family in every figure that colours by family (the zoo's four families, and each real model as its
# own series: SmolLM2 is a llama architecture, but a reader must tell it from the zoo's llamas); other names get the
# remaining tab10 colours in sorted order. Look a name up with :func:`family_color` (a model name such as
# "llama-xs" or "smollm2-135m" finds its family by prefix).
FAMILY_COLORS = {"llama": "tab:blue", "opt": "tab:orange", "gpt2": "tab:green", "gpt_neox": "tab:red",
                 "smollm2": "tab:purple", "qwen2": "tab:brown"}
_SPARE = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# Interval bars: thick enough to see at 120 dpi, capped, light, and drawn behind the points they belong to.
INTERVAL_KW = {"fmt": "none", "elinewidth": 1.0, "capsize": 2.0, "capthick": 0.8, "alpha": 0.45, "zorder": 1}
POINT_KW = {"s": 14, "linewidths": 0.3, "edgecolors": "white", "zorder": 3}

# The region a user would ship: frontiers (and the axes they are drawn on) leave out the recipes whose perplexity
# more than doubles or whose KLD exceeds 1 nat/token (predicted where a figure draws predictions, measured where it
# draws measurements), and the zoo frontier also leaves out formats below 3 bits per element, which the zoo's
# small models survive (perplexity +1% to +29%) but no real model does (SmolLM2-135M mxint2-gptq, measured: KLD 6.0
# nats/token, perplexity 1.3e4; reports/real_models.md).
SHIP_MAX_PPL_INCREASE = 1.0  # perplexity / FP perplexity - 1
SHIP_MAX_KLD = 1.0  # nats/token
SHIP_MIN_BITS = 3.0  # bits per element, scales included
# Format kinds (``quantpredict.formats`` family + element type) in the order panels are drawn.
FORMAT_KINDS = {("mx", "int"): "MXINT", ("mx", "fp"): "MXFP", ("int", "int"): "INT (per channel)",
                ("fp8", "fp"): "FP8 (per channel)", ("float", "fp"): "16-bit float"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed, same output everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style() -> Iterator[object]:
    """The report's rc style for the figures drawn (and saved) inside; yields ``pyplot``."""
    plt = pyplot()
    with plt.rc_context(RC):
        yield plt


def _known(name: str) -> str | None:
    """The :data:`FAMILY_COLORS` key of a family or model name (longest matching prefix), or None."""
    name = str(name).lower()
    if name in FAMILY_COLORS:
        return name
    hits = [k for k in FAMILY_COLORS if name.startswith(k + "-") or name.startswith(k + "_")]
    return max(hits, key=len) if hits else None


def family_color(name: str) -> str | None:
    """The fixed colour of a family or model name ("llama", "llama-xs", "smollm2-135m"), or None if unknown."""
    key = _known(name)
    return FAMILY_COLORS[key] if key else None


def family_colors(families: Iterable[str]) -> dict[str, str]:
    """``{name: colour}``: the fixed colour of a known family (or of a model of one), spare tab10 colours for the
    others (sorted)."""
    out, spare = {}, iter(_SPARE)
    for fam in sorted({str(f) for f in families}):
        out[fam] = family_color(fam) or next(spare, "black")
    return out


def shippable(ppl_ratio=None, kld=None, bits=None, *, min_bits: float | None = None):
    """Boolean mask of the rows inside the region a user would ship (see :data:`SHIP_MAX_KLD`).

    ``ppl_ratio``: quantized / FP perplexity; ``kld``: nats/token; ``bits``: bits per element, checked against
    ``min_bits`` when both are given. A missing (NaN) value does not exclude a row; any argument may be None."""
    import numpy as np

    arrays = [np.asarray(a, float) for a in (ppl_ratio, kld, bits) if a is not None]
    n = len(arrays[0]) if arrays else 0
    ok = np.ones(n, bool)
    if ppl_ratio is not None:
        ok &= ~(np.asarray(ppl_ratio, float) - 1 > SHIP_MAX_PPL_INCREASE)
    if kld is not None:
        ok &= ~(np.asarray(kld, float) > SHIP_MAX_KLD)
    if bits is not None and min_bits is not None:
        ok &= ~(np.asarray(bits, float) < min_bits)
    return ok


def ship_note(ax, text: str, *, loc: str = "lower left", width: int = 58) -> None:
    """A small boxed note inside ``ax`` that states the bound a figure applies (which recipes it leaves out),
    wrapped at ``width`` characters."""
    import textwrap

    from matplotlib.offsetbox import AnchoredText

    box = AnchoredText(textwrap.fill(text, width), loc=loc, prop={"fontsize": 6, "color": "0.25"}, frameon=True,
                       borderpad=0.4, pad=0.3)
    box.patch.set(alpha=0.85, edgecolor="0.8", boxstyle="round,pad=0.2")
    box.set_zorder(5)
    ax.add_artist(box)


def intervals(ax, x, y, low, high, *, color, label: str | None = None, marker: str = "o", **point_kw) -> None:
    """Points at (``x``, ``y``) with their intervals [``low``, ``high``] on y, the bars capped and behind the
    points (:data:`INTERVAL_KW`), the points white-edged on top (:data:`POINT_KW`); one legend entry."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    lo = np.clip(y - np.asarray(low, float), 0, None)
    hi = np.clip(np.asarray(high, float) - y, 0, None)
    ax.errorbar(x, y, yerr=np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), ecolor=color, **INTERVAL_KW)
    ax.scatter(x, y, color=color, marker=marker, label=label, **{**POINT_KW, **point_kw})


def place_labels(ax, xy, texts, *, fontsize: float = 6, avoid_points: bool = True, **text_kw) -> list:
    """Label the data points ``xy`` with ``texts`` so that no two labels overlap each other (or a labelled
    point's marker), and none leaves the axes: each label tries offsets around its point, nearest first, and takes
    the first whose rendered extent (matplotlib's own text bbox) is free. Returns the labels that found no free
    place (as ``(index, text)``), which the caller lists elsewhere (a note or the caption); the placed annotations
    carry ``gid="point-label"``. The axes' legend and boxed notes (artists such as :func:`ship_note`'s) are
    obstacles too: add them first.

    Call it after the figure's layout is final (the extents are in display coordinates): :func:`freeze_layout`."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.asarray(xy, float).reshape(-1, 2)) if len(texts) else np.zeros((0, 2))
    r = 3.0 * fig.dpi / 72  # a marker's half size in pixels
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts] if avoid_points else []
    taken += [a.get_window_extent(renderer) for a in [*ax.artists, ax.get_legend()] if a is not None]
    offsets = []
    for radius in (3, 8, 14, 22):
        for dx, dy, ha, va in ((1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"),
                               (-1, -1, "right", "top"), (0, 1.3, "center", "bottom"), (0, -1.3, "center", "top"),
                               (1.3, 0, "left", "center"), (-1.3, 0, "right", "center")):
            offsets.append((dx * radius, dy * radius, ha, va))
    unplaced = []
    for i, ((x, y), text) in enumerate(zip(np.asarray(xy, float).reshape(-1, 2), texts)):
        for dx, dy, ha, va in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=fontsize, gid="point-label", annotation_clip=False, **text_kw)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            if inside and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                break
            ann.remove()
        else:
            unplaced.append((i, text))
    return unplaced


def freeze_layout(fig) -> None:
    """Run the figure's layout engine once and switch it off, so that text placed afterwards in display
    coordinates (:func:`place_labels`) stays where it was checked."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


def save(fig, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at :data:`DPI` (parent folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    pyplot().close(fig)
    return path


def empty_panel(ax, text: str) -> None:
    """A panel that says why it has no data (a figure is still written, so the page never has a hole)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
