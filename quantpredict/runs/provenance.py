"""Where and with what a run was measured: package versions, git commit, host."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from quantpredict.version import __version__

PACKAGES = ("quantpredict", "torch", "transformers", "tokenizers", "numpy", "pandas", "scikit-learn")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


@lru_cache(maxsize=1)
def provenance() -> dict:
    """Package versions, python, platform, git commit and host of this process (cached per process)."""
    versions = {p: _version(p) for p in PACKAGES}
    versions["quantpredict"] = __version__  # this source's, not an installed distribution's metadata
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
    }
