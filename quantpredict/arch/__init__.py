"""The one place that knows model architectures (moved here from ``quantpredict/arch.py``; split next)."""

from __future__ import annotations

from quantpredict.arch.table import *  # noqa: F403
from quantpredict.arch.table import _ADAPTERS, _get  # noqa: F401 - private names the tests use
