"""A comparison's finished windows kept in a file, so that an interrupted comparison continues where it stopped.

:func:`~quantpredict.evaluate.scoring.pair_sums` scores windows in consecutive batches; with a
:class:`PartialResults` it rewrites the file after every batch (under a temporary name, then renamed: a process
killed while writing leaves the previous batch's file whole) with the per-window float64 sums of the windows done
so far. A later call on the same entry -- the caller's ``key`` (naming the model pair and setting), the same windows,
batch size and head mode -- takes those sums as they are and scores only the batches after them, so totals and
standard errors equal an uninterrupted run's exactly. A file of another entry is ignored (a warning is logged) and
overwritten by the new comparison.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quantpredict.evaluate.windows import Windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialResults:
    """Where a comparison keeps its finished windows (``path``, a file) and what it belongs to (``key``: the model
    pair and evaluation setting, e.g. a run key; a wrong key gives wrong results)."""

    path: Path
    key: str

    def entry(self, windows: Windows, batch_size: int, chunked: bool) -> str:
        """sha256 (hex) of ``key``, the windows (ids, order, scored positions), ``batch_size`` and the head mode."""
        h = hashlib.sha256(f"{self.key}|{batch_size}|{chunked}|{tuple(windows.ids.shape)}".encode())
        h.update(windows.ids.long().contiguous().numpy().tobytes())
        h.update(windows.first_scored.long().contiguous().numpy().tobytes())
        return h.hexdigest()

    def load(self, entry: str) -> tuple[int, dict[str, torch.Tensor]]:
        """``(batches done, {statistic: [windows done] float64 sums})`` of ``entry``; ``(0, {})`` when the file is
        missing, unreadable or another entry's."""
        path = Path(self.path)
        if not path.is_file():
            return 0, {}
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as exc:  # a torn or foreign file: start over, never fail a long run on it
            log.warning("partial comparison %s is unreadable (%s); scoring every window", path, exc)
            return 0, {}
        if saved.get("entry") != entry:
            log.warning("partial comparison %s belongs to another model pair, setting or windows; scoring every "
                        "window (it will be overwritten)", path)
            return 0, {}
        return int(saved["batches"]), dict(saved["sums"])

    def save(self, entry: str, batches: int, sums: dict[str, torch.Tensor]) -> None:
        """Record the first ``batches`` batches as done, with the sums of their windows (``[windows done]``)."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save({"entry": entry, "batches": batches, "sums": {k: v.clone() for k, v in sums.items()}}, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
