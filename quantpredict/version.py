"""The package's versions, in one place (torch-free, base layer).

Two different things were both called a "code version"; each now has one name:

- :data:`MEASUREMENT_VERSION` (``0.1.0+m1``): what a stored run *measures*. It is part of every run key
  (``quantpredict.runs.run_key``; still exported as ``CODE_VERSION`` there and in :mod:`quantpredict.recipe`, the
  historical name). Bump the suffix when the meaning of a measurement changes (a new evaluation protocol, a fixed
  quantizer bug) so that old rows stop counting as done; plain refactors keep it, so commits do not void a sweep.
- :func:`build_version` (``0.1.0+g1a2b3c4``): which build of the code *wrote* a file (the package version plus the
  git commit of a checkout); saved as ``code_version`` in a quantized model's ``quantization.json`` (a stored key,
  kept) and never part of a run key.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"

MEASUREMENT_VERSION = f"{__version__}+m1"


def build_version() -> str:
    """``__version__``, plus ``+g<short commit>`` when this package runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__
