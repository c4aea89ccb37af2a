"""The figure style under its old path: :mod:`quantpredict.style` (it moved below ``predict``, which draws too)."""

from __future__ import annotations

from quantpredict.style import (  # noqa: F401
    _SPARE,
    DPI,
    FAMILY_COLORS,
    FORMAT_KINDS,
    INTERVAL_KW,
    PANEL,
    POINT_KW,
    RC,
    SHIP_MAX_KLD,
    SHIP_MAX_PPL_INCREASE,
    SHIP_MIN_BITS,
    empty_panel,
    family_color,
    family_colors,
    freeze_layout,
    intervals,
    place_labels,
    pyplot,
    save,
    ship_note,
    shippable,
    style,
)
