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
# Fixed colours for the families the zoo has, so that llama is the same blue in every figure; other names get the
# remaining tab10 colours in sorted order.
FAMILY_COLORS = {"llama": "tab:blue", "opt": "tab:orange", "gpt2": "tab:green", "gpt_neox": "tab:red"}
_SPARE = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
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


def family_colors(families: Iterable[str]) -> dict[str, str]:
    """``{family: colour}``: the fixed colour of a known family, spare tab10 colours for the others (sorted)."""
    out, spare = {}, iter(_SPARE)
    for fam in sorted({str(f) for f in families}):
        out[fam] = FAMILY_COLORS.get(fam) or next(spare, "black")
    return out


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
