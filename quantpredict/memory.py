"""Memory budgets, devices and compute dtypes: the knobs that let the same code run a 135M model on a laptop and a
7B one on a GPU.

* :func:`parse_bytes` reads a budget (``"6GiB"``, ``"500MB"``, ``2e9``, ``None`` for the default);
  :data:`DEFAULT_MAX_MEMORY` is the working-memory budget every command uses unless told otherwise. It bounds what
  grows with the data (block inputs during calibration, the features' autograd graphs, logits), not the weights.
* :func:`resolve_device` turns ``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` / ``"mps"`` into a :class:`torch.device`, or
  raises :class:`~quantpredict.errors.DeviceError` naming the flag and the devices this machine has.
* :func:`resolve_dtype` reads ``"fp32"`` / ``"bf16"`` (and their torch spellings) as the compute dtype of forward
  passes; float32 stays in charge of everything numerically delicate (see docs/workflow.md, "Memory, devices and
  bf16").
* :func:`logits_chunk_tokens`: how many token rows of a ``[tokens, vocab]`` float32 logit matrix fit in
  :data:`LOGITS_CHUNK_BYTES` (64 MiB), the most any head computation here materialises at once.
"""

from __future__ import annotations

import math
import re

from quantpredict.errors import DeviceError, ResourceError

#: Working memory that calibration, evaluation and the features aim to stay within, beyond the weights (and, for
#: the features, the quantization direction, one more copy of the linear weights): the block inputs and outputs of
#: calibration, one micro-batch's double-backward graph. 2 GiB keeps SmolLM2-135M's features under 4 GB in all.
DEFAULT_MAX_MEMORY = 2 * 2**30
DEFAULT_MAX_MEMORY_TEXT = "2GiB"
#: The largest ``[tokens, vocab]`` float32 logits block computed at once where the vocabulary is large.
LOGITS_CHUNK_BYTES = 64 * 2**20

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_DTYPES = {"fp32": "float32", "float32": "float32", "float": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "half": "float16"}


def parse_bytes(value: int | float | str | None, *, flag: str = "max_memory") -> int:
    """A byte count from ``value``: an int/float of bytes, or text such as ``"6GiB"``, ``"512MB"``, ``"1.5e9"``;
    ``None`` gives :data:`DEFAULT_MAX_MEMORY`. Anything else raises :class:`ResourceError` naming ``flag``."""
    if value is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(value, bool):
        raise ResourceError(f"{flag}={value!r} is not a memory size; pass bytes or text such as '6GiB'")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ResourceError(f"{flag}={value!r} is not a memory size; write a number with an optional unit "
                                "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 6GiB or 512MB")
        number, unit = float(m.group(1)), m.group(2).lower()
    out = number * _UNITS[unit]
    if not math.isfinite(out) or out < 2**20:
        raise ResourceError(f"{flag}={value!r} is below 1 MiB; pass a budget such as 4GiB")
    return int(out)


def release_freed_heap() -> None:
    """Hand memory that the C heap holds free back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tokenizing a whole split allocates ~1 GB of short-lived Python and Rust objects; once freed, glibc keeps that
    heap mapped, and the process's resident size stays 1 GB higher for the rest of a run."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_devices() -> list[str]:
    """The device types this process can use, CPU first (``["cpu", "cuda:0", "cuda:1"]`` on a 2-GPU machine)."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(device, *, flag: str = "device"):
    """``device`` (``None``: CPU, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a :class:`torch.device`) as a
    :class:`torch.device` this machine has; otherwise :class:`DeviceError` naming ``flag`` and what is available."""
    import torch

    if device is None:
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {device!r} is not a device name; use one of: "
                          f"{', '.join(available_devices())}") from None
    have = available_devices()
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise DeviceError(f"{flag} {device}: CUDA is not available here ({why}, torch {torch.__version__}); "
                              f"available: {', '.join(have)}. Leave {flag} unset (CPU) or run on a GPU machine")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"available: {', '.join(have)}")
        return torch.device("cuda", index)
    if dev.type == "mps" and "mps" in have:
        return dev
    raise DeviceError(f"{flag} {device}: not available on this machine; available: {', '.join(have)}")


def resolve_dtype(dtype, *, flag: str = "dtype"):
    """``dtype`` (``None``, ``"fp32"``, ``"bf16"``, ``"fp16"``, their long names, or a floating torch dtype) as a
    ``torch.dtype`` or ``None`` (keep the model's); anything else raises :class:`ResourceError` naming ``flag``."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ResourceError(f"{flag}={dtype}: a compute dtype must be floating point (fp32, bf16 or fp16)")
        return dtype
    name = _DTYPES.get(str(dtype).strip().lower().removeprefix("torch."))
    if name is None:
        raise ResourceError(f"{flag} {dtype!r} is not a compute dtype; use fp32 or bf16 (fp16 also works)")
    return getattr(torch, name)


def logits_chunk_tokens(vocab: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Token rows of a float32 ``[tokens, vocab]`` block that fit in ``budget_bytes`` (at least 1)."""
    return max(1, int(budget_bytes) // (4 * max(int(vocab), 1)))


class placed:
    """Context manager: ``models`` on ``device`` for the ``with`` (``None``: where they are), each moved back to
    where it was on exit. Values are unchanged by the round trip (a device copy is exact)."""

    def __init__(self, models, device, *, flag: str = "device"):
        self.models = [m for m in models if m is not None]
        self.device = None if device is None else resolve_device(device, flag=flag)
        self._before: list = []

    def __enter__(self):
        import torch

        for m in self.models:
            p = next(m.parameters(), None)
            before = p.device if p is not None else torch.device("cpu")
            self._before.append(before)
            if self.device is not None and before != self.device:
                m.to(self.device)
        return self.device

    def __exit__(self, *exc) -> None:
        for m, before in zip(self.models, self._before):
            if self.device is not None and before != self.device:
                m.to(before)
