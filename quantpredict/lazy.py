"""Packages that import each public name from its module on first use (PEP 562), so that importing one light
module of a package does not import the package's heavy ones (``quantpredict.arch.table`` without transformers).

    __getattr__, __dir__ = lazy_exports(__name__, {"Recipe": "quantpredict.recipe", "_get": ("...table", "module_at")})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str | tuple[str, str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``exports`` maps to the module that defines it, or to
    ``(module, attribute)`` where the package's name differs from the module's. The first lookup imports the module
    and keeps the value as a plain attribute of the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = (target, name) if isinstance(target, str) else target
        value = getattr(importlib.import_module(module), attr)
        namespace[name] = value  # the next lookup is a plain module attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
