"""Resuming :func:`~quantpredict.quantize.quantize_model`'s block-by-block calibration after an interruption.

A :class:`BlockCheckpoint` is a directory that holds, once blocks ``0 .. d-1`` of ``n`` are quantized:

- ``block-<j>.pt`` for every finished block ``j < d``: the block's state dict (its quantized linears, and the norms
  or linears SmoothQuant / AWQ folded scales into; every fold stays inside its block), in the model's dtype;
- ``acts-<d>/batch-<b>.pt``: block ``d``'s calibration inputs ``[b, seq, hidden]``, batch by batch, in the compute
  dtype: the outputs of the blocks *as quantized*, which the sequential algorithm feeds on (absent when ``d = n``);
- ``manifest.json``: ``{"key", "recipe", "done": d, "blocks": n, "reports"}``; ``reports`` is whatever JSON the
  caller passes (the finished blocks' layer reports), so that a resumed run's report is whole.

Every file is written under a temporary name and renamed into place, the manifest last, so a process killed while
saving resumes from the block before. ``key`` (:func:`checkpoint_key`) hashes the model's weights as they were
before quantization, the recipe, the calibration windows and what else changes the numbers (batch size, compute
dtype): a checkpoint whose key differs is *stale* and is discarded -- its files are deleted, a warning is logged
and quantization restarts from block 0 (a sweep left unattended must not stop on it, nor use it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def tensor_digest(tensors: Iterable[torch.Tensor], h: Any = None) -> Any:
    """A sha256 object updated with each tensor's dtype, shape and stored bytes (read in 64 MiB pieces, so a tensor
    on an accelerator is never copied whole to the host)."""
    h = hashlib.sha256() if h is None else h
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        for piece in flat.split(64 * 2**20):
            h.update(piece.cpu().numpy().tobytes())
    return h


def checkpoint_key(model: nn.Module, recipe: dict[str, Any], windows: torch.Tensor, **settings: Any) -> str:
    """sha256 (hex) naming one quantization: ``model``'s state (each stored tensor once, before quantizing), the
    recipe (``Recipe.to_dict()``), the calibration windows ``[n, seq_len]`` and ``settings`` (batch size, compute
    dtype: what changes the numbers)."""
    seen: set[int] = set()
    tensors = []
    for t in model.state_dict(keep_vars=False).values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors.append(t)
    h = hashlib.sha256(json.dumps({"recipe": recipe, "settings": {k: str(v) for k, v in settings.items()}},
                                  sort_keys=True).encode())
    return tensor_digest([*tensors, windows], h).hexdigest()


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class BlockCheckpoint:
    """A checkpoint directory of one quantization (see the module docstring); :meth:`open` reads or starts it.

    ``done``: the blocks finished when it was opened (0: a fresh start); ``reports``: their reports as saved."""

    directory: Path
    key: str
    label: str
    blocks: int
    done: int = 0
    reports: Any = None

    @classmethod
    def open(cls, directory: str | Path, key: str, label: str, blocks: int) -> BlockCheckpoint:
        """The checkpoint in ``directory`` (created if missing) for ``key``: resumed where its manifest says, or
        fresh when there is none, or when it is stale (another key or block count: its files are deleted)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        fresh = cls(d, key, label, blocks)
        try:
            meta = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:
            fresh.clear()
            return fresh
        except (OSError, ValueError) as exc:
            log.warning("quantization checkpoint %s is unreadable (%s); starting from block 0", d, exc)
            fresh.clear()
            return fresh
        if meta.get("key") != key or meta.get("blocks") != blocks:
            log.warning("quantization checkpoint %s belongs to another model, recipe or calibration (%s); discarding "
                        "it and starting from block 0", d, meta.get("recipe"))
            fresh.clear()
            return fresh
        return cls(d, key, label, blocks, int(meta["done"]), meta.get("reports"))

    def block_path(self, index: int) -> Path:
        return self.directory / f"block-{index}.pt"

    def acts_dir(self, index: int) -> Path:
        return self.directory / f"acts-{index}"

    def save(self, index: int, block: nn.Module, next_inputs: Iterable[torch.Tensor] | None, reports: Any) -> None:
        """Record block ``index`` as finished: its state dict, block ``index + 1``'s inputs (``None`` after the
        last block), then the manifest (``done = index + 1``, ``reports``); block ``index``'s inputs go after."""
        _save_atomic({k: v.detach().cpu() for k, v in block.state_dict().items()}, self.block_path(index))
        if next_inputs is not None:
            acts = self.acts_dir(index + 1)
            stage = acts.with_name(acts.name + ".tmp")
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            for b, h in enumerate(next_inputs):
                torch.save(h.detach().cpu().contiguous(), stage / f"batch-{b}.pt")
            shutil.rmtree(acts, ignore_errors=True)
            stage.rename(acts)
        meta = {"key": self.key, "recipe": self.label, "done": index + 1, "blocks": self.blocks, "reports": reports}
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True) + "\n")
        tmp.replace(self.directory / MANIFEST)
        shutil.rmtree(self.acts_dir(index), ignore_errors=True)

    def load_block(self, index: int, block: nn.Module) -> None:
        """Put finished block ``index``'s saved weights into ``block`` (copied into its parameters, in place)."""
        state = torch.load(self.block_path(index), weights_only=True, map_location="cpu")
        block.load_state_dict(state, strict=True)

    def inputs(self, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Block ``done``'s saved inputs, batch by batch in order, on ``device``."""
        acts = self.acts_dir(self.done)
        for b in range(len(list(acts.glob("batch-*.pt")))):
            yield torch.load(acts / f"batch-{b}.pt", weights_only=True, map_location=device)

    def clear(self) -> None:
        """Delete the files a checkpoint writes (the manifest, blocks, activations, temporaries); others stay."""
        for p in self.directory.iterdir():
            if p.name.startswith((MANIFEST, "block-")):
                p.unlink(missing_ok=True)
            elif p.name.startswith("acts-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
