"""GPTQ's input moments ``A = E[x x^T]`` of every linear layer, measured block by block and kept on disk.

The lean sensitivity profile (``fisher.measure_profile(kfac=False)``) prices RTN recipes from its token-wise terms
alone; only GPTQ recipes need each layer's input moment (GPTQ's Hessian is ``2A``). Holding every ``A`` of a 1.5B
Qwen2 takes 9.8 GB, so :func:`measure_input_moments` runs the model one transformer block at a time (forward only,
the block-by-block execution GPTQ's calibration uses: :func:`quantpredict.arch.capture_block_inputs`), keeps one
block's moments in memory, and writes each block's to a safetensors file as soon as it is done. Peak memory is the
model, the windows' hidden states and one block's ``A``.

:class:`InputMoments` is the result: a read-only mapping ``layer name -> A`` that reads each from its (memory-mapped)
file on access, so ``profile.input_moment[name]`` and ``profile.hessian(name)`` work as with an in-memory profile.
:class:`LazyInputMoments` defers the measurement until the first ``A`` is read.

The moments equal ``measure_profile``'s to float32 rounding (same windows, same micro-batches, float32 accumulation of
``x^T x``, here in place by ``addmm_``; the same owner sharing: layers that read one input tensor, like q/k/v,
share one ``A``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantpredict import arch

INDEX = "index.json"
FORMAT = 1


class CorruptMomentsError(ValueError):
    """A moments directory that is missing, partial or unreadable (the caller measures again)."""


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` (CPU) as a safetensors file, streaming each tensor's bytes from its own storage
    (:func:`quantpredict.safetensors_stream.write_streamed`): ``safetensors.torch.save_file`` first copies every
    tensor into a bytes object, doubling the peak (a 1.5B Qwen2 block's moments are 349 MB). Returns the file's
    size."""
    from quantpredict.safetensors_stream import SAFETENSORS_DTYPES, TensorSpec, file_order, write_streamed

    items = {k: v.detach().contiguous() for k, v in tensors.items()}
    specs = {k: TensorSpec(SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for k, t in items.items()}
    write_streamed(path, specs, ((k, items[k]) for k in file_order(specs)), metadata)
    return os.path.getsize(path)


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    return z if z.dtype == torch.float64 else z.float()


@torch.no_grad()
def measure_input_moments(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
                          directory: str | os.PathLike | None = None) -> InputMoments:
    """Every linear layer's ``A = E[x x^T]`` (``[in, in]``, float32; float64 for a float64 model) on ``windows``
    (``[n, seq_len]``), measured block by block with forward passes only and written to ``directory`` (one
    safetensors file per block and an ``index.json``; written under a temporary name and renamed into place, so a
    crash leaves no partial directory). ``directory=None``: a temporary directory removed with the returned object.

    ``batch_size`` is the micro-batch of :func:`~quantpredict.features.fisher.measure_profile` to match (the
    moments are the same sums in the same order)."""
    t0 = time.perf_counter()
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    keep = None
    if directory is None:
        keep = tempfile.TemporaryDirectory(prefix="quantpredict-moments-")
        final = Path(keep.name) / "moments"
    else:
        final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    was_training = model.training
    try:
        model.eval()
        inputs = arch.capture_block_inputs(model, windows, batch_size=batch_size)
        hidden = inputs.hidden
        n = hidden.shape[0]
        captured = min(batch_size, n)
        owners: dict[str, str] = {}
        files: dict[str, str] = {}
        shapes: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        tokens = 0
        for index, block, refs in arch.iter_block_linears(model):
            moments, counts, hidden = _block_moments(block, refs, hidden, arch.block_kwargs(inputs.kwargs, index),
                                                     batch_size, captured, dtype, owners)
            fname = f"block_{index:04d}.safetensors"
            sizes[fname] = write_safetensors(work / fname, moments, {"format": "quantpredict-input-moments"})
            for name, a in moments.items():
                files[name] = fname
                shapes[name] = list(a.shape)
                tokens = max(tokens, counts[name])
            del moments
        index_doc = {"format": FORMAT, "owners": owners, "files": files, "shapes": shapes, "sizes": sizes,
                     "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "windows": int(windows.shape[0]),
                     "seq_len": int(windows.shape[1]), "batch_size": batch_size,
                     "seconds": time.perf_counter() - t0}
        (work / INDEX).write_text(json.dumps(index_doc, indent=1) + "\n")
        if final.exists():
            try:  # written meanwhile by another process: as good as ours
                existing = InputMoments(final, keep=keep)
            except CorruptMomentsError:  # stale or corrupt: replaced
                shutil.rmtree(final, ignore_errors=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
                return existing
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return InputMoments(final, keep=keep)


def _block_moments(block: nn.Module, refs: Sequence[arch.LinearRef], hidden: torch.Tensor, kwargs: dict[str, Any],
                   batch_size: int, captured: int, dtype: torch.dtype, owners: dict[str, str]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, int], torch.Tensor]:
    """One block's ``{owner: A}`` and token counts on ``hidden`` ``[n, seq, hidden]``, and the block's output;
    ``owners`` gets each linear's owner (the first linear that read the same input tensor)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor is held so that its id is not reused

    def hook(_module, args, _output, name):
        x = args[0]
        if name not in owners:  # first micro-batch: the layers fed by one tensor (q/k/v, gate/up)
            owners[name] = seen.setdefault(id(x), (x, name))[1]
        if owners[name] == name:
            x = _at_least_float32(x.detach().reshape(-1, x.shape[-1])).to(dtype)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype)
                counts[name] = 0
            sums[name].addmm_(x.T, x)  # accumulated in place: no [in, in] temporary (321 MB for a 1.5B down_proj)
            counts[name] += x.shape[0]

    handles = [r.module.register_forward_hook(lambda m, a, o, name=r.name: hook(m, a, o, name)) for r in refs]
    outs = []
    try:
        for lo in range(0, hidden.shape[0], batch_size):
            seen.clear()
            h = hidden[lo: lo + batch_size]
            out = block(h, **arch.batch_kwargs(kwargs, h.shape[0], captured))
            outs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        for handle in handles:
            handle.remove()
    for name, s in sums.items():
        s.div_(max(counts[name], 1))  # in place: one block's moments in memory, not two
    return sums, counts, torch.cat(outs)


class InputMoments(Mapping[str, torch.Tensor]):
    """``layer name -> A`` read from a directory written by :func:`measure_input_moments`, one tensor at a time
    (memory-mapped safetensors; the last one read is kept, so q, k and v reading one shared ``A`` load it once).
    Opening checks the index, every file's size and header: a partial or corrupt directory raises
    :class:`CorruptMomentsError`."""

    def __init__(self, directory: str | os.PathLike, *, keep: Any = None):
        from safetensors import safe_open

        self.directory = Path(directory)
        self._keep = keep  # a TemporaryDirectory removed with this object
        try:
            doc = json.loads((self.directory / INDEX).read_text())
            if doc.get("format") != FORMAT:
                raise CorruptMomentsError(f"format {doc.get('format')!r}, expected {FORMAT}")
            self.owners: dict[str, str] = dict(doc["owners"])
            self.files: dict[str, str] = dict(doc["files"])
            self.shapes: dict[str, list[int]] = dict(doc["shapes"])
            self.sizes: dict[str, int] = {k: int(v) for k, v in doc["sizes"].items()}
            self.tokens = int(doc["tokens"])
            self.seconds = float(doc.get("seconds", float("nan")))
            for fname, size in self.sizes.items():
                path = self.directory / fname
                if path.stat().st_size != size:
                    raise CorruptMomentsError(f"{path} has {path.stat().st_size} bytes, the index says {size}")
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                want = {o for o, fn in self.files.items() if fn == fname}
                if keys != want:
                    raise CorruptMomentsError(f"{path} holds {sorted(keys)}, the index says {sorted(want)}")
            missing = set(self.owners.values()) - set(self.files)
            if missing:
                raise CorruptMomentsError(f"no file for {sorted(missing)}")
        except CorruptMomentsError as exc:
            raise CorruptMomentsError(f"input moments at {self.directory}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptMomentsError(f"input moments at {self.directory} are unreadable: "
                                      f"{type(exc).__name__}: {exc}") from exc
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(self.sizes.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        owner = self.owners[name]
        if self._last[0] != owner:
            with safe_open(str(self.directory / self.files[owner]), framework="pt") as f:
                self._last = (owner, f.get_tensor(owner))
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.owners)

    def __len__(self) -> int:
        return len(self.owners)

    def __contains__(self, name: object) -> bool:
        return name in self.owners

    def __repr__(self) -> str:
        return f"InputMoments({str(self.directory)!r}, {len(self)} layers)"


class MomentHessians(Mapping[str, torch.Tensor]):
    """``layer name -> 2A`` (float64, ``[in, in]``): GPTQ's Hessian of each layer from a mapping of input moments
    ``A`` (such as :class:`InputMoments`), computed on access, nothing held."""

    def __init__(self, moments: Mapping[str, torch.Tensor]):
        self.moments = moments

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.moments[name].to(torch.float64, copy=True).mul_(2.0)  # one [in, in] made, not two

    def __iter__(self) -> Iterator[str]:
        return iter(self.moments)

    def __len__(self) -> int:
        return len(self.moments)

    def __contains__(self, name: object) -> bool:
        return name in self.moments

    def __repr__(self) -> str:
        return f"MomentHessians({self.moments!r})"


class LazyInputMoments(Mapping[str, torch.Tensor]):
    """``layer name -> A`` measured by ``measure()`` (returning a mapping, such as :class:`InputMoments`) the first
    time one is read; names, length and membership do not measure. ``measured`` tells whether it has run."""

    def __init__(self, names: Sequence[str], measure: Callable[[], Mapping[str, torch.Tensor]]):
        self.names = list(names)
        self._names = set(self.names)
        self._measure: Callable[[], Mapping[str, torch.Tensor]] | None = measure
        self._moments: Mapping[str, torch.Tensor] | None = None

    @property
    def measured(self) -> bool:
        return self._moments is not None

    def load(self) -> Mapping[str, torch.Tensor]:
        """The moments, measured now if they were not yet."""
        if self._moments is None:
            assert self._measure is not None
            self._moments = self._measure()
            self._measure = None  # drop the closure (and the model and windows it holds)
        return self._moments

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return f"LazyInputMoments({len(self)} layers, {'measured' if self.measured else 'not measured yet'})"
