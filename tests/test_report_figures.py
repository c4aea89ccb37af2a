"""The figures a user looks at, on hand-built data: frontiers stay in the region a user would ship, their labels
never overlap (checked with matplotlib's own text extents), intervals are drawn, one colour per family."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from quantpredict.style import FAMILY_COLORS, family_color, family_colors, pyplot, shippable, style


def rank_frame() -> pd.DataFrame:
    """A ``rank_recipes`` frame shaped like SmolLM2-135M's: int2 far outside the bound (KLD 9-26), int3 just
    outside it, and the frontier's neighbours int8/mxint8 and int3/mxint3 a quarter bit apart."""
    rows = [("int2-rtn", 2.0, 26.0), ("int2-gptq", 2.0, 9.0), ("mxint2-rtn", 2.25, 7.0), ("mxint2-gptq", 2.25, 4.2),
            ("int3-rtn", 3.0, 3.6), ("int3-gptq", 3.0, 1.4), ("mxint3-rtn", 3.25, 1.8), ("mxint3-gptq", 3.25, 1.3),
            ("int4-rtn", 4.0, 0.9), ("int4-gptq", 4.0, 0.45), ("mxint4-rtn", 4.25, 0.55),
            ("mxint4-gptq", 4.25, 0.4), ("mxfp4_e2m1-rtn", 4.25, 0.6), ("mxfp4_e2m1-gptq", 4.25, 0.2),
            ("mxfp6_e2m3-rtn", 6.25, 0.085), ("mxfp6_e2m3-gptq", 6.25, 0.012), ("mxint6-gptq", 6.25, 0.011),
            ("int8-rtn", 8.0, 0.0029), ("int8-gptq", 8.0, 0.00135), ("mxint8-rtn", 8.25, 0.0028),
            ("mxint8-gptq", 8.25, 0.0013)]
    f = pd.DataFrame(rows, columns=["recipe", "bits_per_element", "kld"])
    f["method"] = f["recipe"].str.split("-").str[-1]
    f["kld_low"], f["kld_high"] = f["kld"] / 1.5, f["kld"] * 1.5
    f["ppl_fp"] = 20.0
    f["ppl"] = 20.0 * np.exp(1.2 * f["kld"])
    f["ppl_low"], f["ppl_high"] = 20.0 * np.exp(1.2 * f["kld_low"]), 20.0 * np.exp(4.0 * f["kld_high"])
    bits, kld = f["bits_per_element"].to_numpy(), f["kld"].to_numpy()
    f["pareto"] = [not ((bits <= b) & (kld < k)).any() for b, k in zip(bits, kld)]
    f["recommended"] = f["recipe"] == "mxfp4_e2m1-gptq"
    f.attrs["model"] = "hand-built"
    return f


def label_boxes(ax):
    renderer = ax.figure.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_gid() == "point-label"]


def assert_apart(boxes, frame=None):
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"labels {a!r} and {b!r} overlap"
    if frame is not None:
        for name, box in boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name


def test_shippable_bound():
    ok = shippable([1.1, 2.5, 1.9, np.nan], [0.2, 0.3, 1.4, 0.5], [4, 4, 4, 2.25], min_bits=3.0)
    assert ok.tolist() == [True, False, False, False]
    assert shippable(None, [0.5, np.nan]).tolist() == [True, True]  # an unknown value excludes nothing


def test_rank_frontier_leaves_the_int2_rows_out_of_frontier_and_axes(tmp_path):
    from quantpredict.report.frontier import draw_frontier, frontier_figure, ship_mask

    frame = rank_frame()
    ship = ship_mask(frame)
    assert not ship[frame["recipe"].str.match(r"(mx)?int[23]-")].any()
    assert ship[frame["recipe"].isin(["int4-gptq", "mxfp4_e2m1-gptq", "int8-gptq"])].all()
    plt = pyplot()
    with style():
        fig = draw_frontier(frame)
        kld_ax, ppl_ax = fig.axes[:2]
        assert kld_ax.get_ylim()[1] < 9.0 and kld_ax.get_ylim()[1] <= 2.0  # int2-gptq's KLD is off the axis
        assert ppl_ax.get_ylim()[1] < 2 * 20.0 * 1.2  # at most a little above the doubled perplexity
        for ax in (kld_ax, ppl_ax):
            labels = [t for t, _ in label_boxes(ax)]
            assert labels and not any(t.startswith(("int2", "mxint2", "int3", "mxint3")) for t in labels)
            # every point drawn lies inside the bound
            for coll in ax.collections:
                offsets = np.asarray(coll.get_offsets())
                if ax is kld_ax and offsets.size:
                    assert np.nanmax(offsets[:, 1]) <= 1.0
        note = [a for a in ppl_ax.artists if "Left out" in a.txt._text.get_text()]
        assert note and "int2-gptq" in note[0].txt._text.get_text()
        plt.close(fig)
    assert frontier_figure(frame, tmp_path / "f.png").stat().st_size > 0


def test_rank_frontier_labels_do_not_overlap():
    from quantpredict.report.frontier import draw_frontier, ship_mask

    frame = rank_frame()
    # crowd the frontier: every shippable row on it, int8 and mxint8 nearly on top of each other
    frame["pareto"] = True
    plt = pyplot()
    with style():
        fig = draw_frontier(frame)
        for ax in fig.axes[:2]:
            boxes = label_boxes(ax)
            assert len(boxes) >= 3
            assert_apart(boxes, ax.get_window_extent(fig.canvas.get_renderer()))
        texts = " ".join(t.get_text() for t in fig.texts)
        placed = {t for ax in fig.axes[:2] for t, _ in label_boxes(ax)}
        shown = set(frame.loc[ship_mask(frame), "recipe"])
        for name in shown - placed:  # a label with no room is listed under the figure instead
            assert name in texts
        plt.close(fig)


def test_place_labels_on_a_dense_cluster():
    from quantpredict.style import freeze_layout, place_labels

    plt = pyplot()
    with style():
        fig, ax = plt.subplots(figsize=(3, 2.5))
        xy = np.array([[1.0, 1.0], [1.02, 1.01], [1.04, 0.99], [1.0, 1.03], [2.0, 2.0], [2.01, 2.0]])
        ax.plot(xy[:, 0], xy[:, 1], "o")
        ax.set_xlim(0.5, 2.5)
        ax.set_ylim(0.5, 2.5)
        freeze_layout(fig)
        missed = place_labels(ax, xy, [f"recipe-{i}-gptq" for i in range(len(xy))])
        boxes = label_boxes(ax)
        assert len(boxes) + len(missed) == len(xy)
        assert_apart(boxes, ax.get_window_extent(fig.canvas.get_renderer()))
        plt.close(fig)


def test_one_colour_per_family_and_model_names_find_theirs():
    assert family_color("llama-xs") == family_color("llama") == FAMILY_COLORS["llama"]
    assert family_color("gpt_neox-s") == FAMILY_COLORS["gpt_neox"] != family_color("gpt2-s")
    assert family_color("smollm2-135m") == FAMILY_COLORS["smollm2"] != FAMILY_COLORS["llama"]
    colors = family_colors(["opt", "mystery", "gpt2"])
    assert colors["opt"] == FAMILY_COLORS["opt"] and colors["mystery"] not in FAMILY_COLORS.values()
    assert len(set(FAMILY_COLORS.values())) == len(FAMILY_COLORS)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])


def zoo_runs() -> pd.DataFrame:
    """Finished weight-only runs of two zoo models: 2-bit runs that the small models survive (+5% perplexity) and
    would otherwise win the frontier, and 3- to 8-bit runs."""
    rows = []
    for model, params, fp in (("llama-xs", 2e5, 150.0), ("llama-l", 2e6, 60.0)):
        for fmt, bits, kind, inc in (("int2", 2.1, "INT (per channel)", 0.05), ("mxint2", 2.25, "MXINT", 0.04),
                                     ("int3", 3.1, "INT (per channel)", 0.01), ("mxint4", 4.25, "MXINT", 0.002),
                                     ("int8", 8.1, "INT (per channel)", 0.0)):
            rows.append({"model": model, "family": "llama", "weight_format": fmt, "bits": bits, "format_kind": kind,
                         "params": params, "ppl_fp": fp, "ppl_quant": fp * (1 + inc), "kld": inc / 2,
                         "weight_only": True, "delta": np.log1p(inc), "weight_mb": params * bits / 8e6})
    return pd.DataFrame(rows)


def test_zoo_frontier_leaves_out_2_bit_runs_and_has_no_empty_cells(tmp_path):
    from quantpredict.report.figures import frontier_bound, frontier_note, plot_frontier
    from quantpredict.report.tables import best_per_bits

    best = best_per_bits(zoo_runs())
    ship = frontier_bound(best)
    assert set(best.loc[~ship, "weight_format"]) == {"int2", "mxint2"}
    assert "4 runs below 3 bits" in frontier_note(best, ship)
    plt = pyplot()
    created = []
    real_figure = plt.figure

    def spy(*a, **k):  # keep the figure the function draws, to look at its panels
        created.append(real_figure(*a, **k))
        return created[-1]

    plt.figure = spy
    try:
        plt_close = plt.close
        plt.close = lambda *a: None
        plot_frontier(zoo_runs(), tmp_path / "frontier.png")
    finally:
        plt.figure, plt.close = real_figure, plt_close
    fig = created[-1]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert all(ax.get_visible() for ax in panels) and len(panels) == 3  # two kinds + the frontier: no holes
    frontier_ax = panels[-1]
    assert frontier_ax.get_xlim()[0] > 2e5 * 2.25 / 8e6  # the 2-bit sizes are off the axis
    labels = label_boxes(frontier_ax)
    assert labels and not any("int2" in t for t, _ in labels)
    assert_apart(labels)
    plt.close(fig)


def test_validation_figure_symlog_ticks_do_not_collide(tmp_path):
    from types import SimpleNamespace

    from quantpredict.report.validation import plot_predictions

    rng = np.random.default_rng(0)
    n = 80
    delta = np.concatenate([rng.normal(0, 2e-5, n // 2), 10 ** rng.uniform(-4, 0, n // 2)])
    pred = delta * np.exp(rng.normal(0, 0.3, n))
    p = pd.DataFrame({"groups": "family", "kind": np.repeat(["ols", "rf"], n // 2)[rng.permutation(n)],
                      "family": rng.choice(["llama", "opt", "gpt2", "gpt_neox"], n), "delta": delta,
                      "delta_nll": pred, "delta_low": pred - 1e-3, "delta_high": pred * 2 + 1e-3})
    plt = pyplot()
    saved = []
    original = plt.close
    plt.close = lambda fig=None: saved.append(fig)
    try:
        plot_predictions(SimpleNamespace(predictions=p), tmp_path / "predictors_family.png")
    finally:
        plt.close = original
    fig = saved[-1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in [ax.xaxis for ax in fig.axes] + [fig.axes[0].yaxis]:  # the y axis is shared
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in axis.get_ticklabels()
                 if t.get_visible() and t.get_text()]
        assert len(boxes) >= 3
        assert_apart(boxes)
    # the families' colours are the shared ones
    from matplotlib.colors import to_hex
    for coll in fig.axes[0].collections:
        if coll.get_label() in FAMILY_COLORS:
            assert to_hex(coll.get_facecolor()[0]) == to_hex(FAMILY_COLORS[coll.get_label()])
    original(fig)
