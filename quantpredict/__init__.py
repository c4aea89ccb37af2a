"""quantpredict: predict the quality a quantized LLM loses, before you ship it."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
