"""The figure style under its old path: :mod:`quantpredict.style` (it moved below ``predict``, which draws too)."""

from __future__ import annotations

from quantpredict.style import (  # noqa: F401
    _SPARE,
    DPI,
    FAMILY_COLORS,
    FORMAT_KINDS,
    PANEL,
    RC,
    empty_panel,
    family_colors,
    pyplot,
    save,
    style,
)
