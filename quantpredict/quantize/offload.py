"""Block-by-block calibration within a memory budget: where the hidden states between blocks live, and the copy of
one block that computes.

GPTQ and SmoothQuant calibrate block ``i`` on the outputs of blocks ``0 .. i-1``: every calibration window's hidden
states, ``[n, seq, hidden]`` (128 x 256 x 4096 float32 = 512 MB for an 8B model; inputs and outputs of a block both
exist while it runs). :class:`ActivationStore` keeps them batch by batch in memory, or, when they would take more
than their share of the budget, in files under a temporary directory (one file per batch, read back one at a time),
so only one batch is resident.

:func:`compute_copy` gives the module that runs a block's forward passes: the block itself when its dtype and
device are the compute ones (the model is then calibrated exactly as before), otherwise a copy of that one block in
the compute dtype on the compute device. The model's weights stay where and as they are (a bf16 model stays bf16 in
CPU memory; a GPU holds one block at a time) and only the quantized weights are written back.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ActivationStore:
    """Hidden states ``[b, seq, hidden]`` batch by batch: in memory, or one file per batch under ``directory``.

    ``append`` adds the next batch; iterating yields them in order (from disk, one at a time, on the device the
    batches came from). ``close`` deletes the files this store wrote (and its directory if it made it)."""

    def __init__(self, on_disk: bool = False, directory: str | Path | None = None):
        self.on_disk = on_disk
        self._made_dir = on_disk and directory is None
        self.directory = (Path(tempfile.mkdtemp(prefix="quantpredict-acts-")) if self._made_dir
                          else None if directory is None else Path(directory))
        if self.on_disk:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._batches: list[torch.Tensor] = []
        self._files: list[Path] = []
        self.device: torch.device | None = None  # where batches are handed back (that of the first one appended)
        self.n = 0  # windows held
        self.nbytes = 0

    def append(self, hidden: torch.Tensor) -> None:
        hidden = hidden.detach()
        self.device = hidden.device if self.device is None else self.device
        self.n += hidden.shape[0]
        self.nbytes += hidden.numel() * hidden.element_size()
        if not self.on_disk:
            self._batches.append(hidden)
            return
        path = self.directory / f"batch-{id(self)}-{len(self._files)}.pt"
        torch.save(hidden.cpu().contiguous(), path)
        self._files.append(path)

    def __len__(self) -> int:
        return len(self._files) if self.on_disk else len(self._batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.on_disk:
            yield from self._batches
            return
        for path in self._files:
            yield torch.load(path, weights_only=True, map_location=self.device)

    def close(self) -> None:
        self._batches = []
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files = []
        if self._made_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def spill_to_disk(n_windows: int, seq_len: int, hidden: int, dtype: torch.dtype, max_memory: int) -> bool:
    """True when a block's inputs and outputs (``2 x n x seq x hidden`` elements of ``dtype``) would take more than
    half of ``max_memory``: the other half is for the block's own activations and Hessians."""
    nbytes = 2 * n_windows * seq_len * hidden * torch.empty((), dtype=dtype).element_size()
    return nbytes > max_memory // 2


def compute_copy(block: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``block`` itself when its parameters are on ``device`` in ``dtype``; else a deep copy moved there (one
    block's worth of memory on ``device``). Forward hooks on the block's modules come along with the copy."""
    p = next(block.parameters(), None)
    if p is None or (p.device == device and p.dtype == dtype):
        return block
    return copy.deepcopy(block).to(device=device, dtype=dtype)


def to_compute(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A block keyword argument (a tensor, or a tuple of them such as rotary ``(cos, sin)``) on ``device``, its
    floating tensors in ``dtype``; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(to_compute(v, device, dtype) for v in value)
    return value
