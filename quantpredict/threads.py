"""Torch's intra-op thread count for the length of one call, set and put back (base layer; torch loaded on use).

Library functions take a thread count (``num_threads``, ``threads``, ``torch_threads``) instead of changing torch's
process-wide setting for good: :func:`torch_threads` sets it for the ``with`` block and restores what it found.
The setting is process-wide, so the blocks hold one lock: two threads that each ask for a count run one after the
other (each under its own count, each restoring what it found) instead of undoing each other's setting. Torch work
in *other* threads that do not use this context still sees the temporary count while a block runs. Only the CLI's
``--threads`` flags set the count for the whole process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()  # re-entrant: a with-block may call a function that opens its own


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the count after; ``None`` or 0 changes nothing."""
    if not n:
        yield
        return
    import torch

    with _LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)


def default_threads() -> int:
    """The thread count of work that runs without importing torch (the C kernels of
    :mod:`quantpredict.checkpoint_rtn`'s one-pass path): ``OMP_NUM_THREADS`` where it is a positive integer, as torch
    reads it, else the CPUs this process may run on. Torch's own default is its count of physical cores, which
    differs from the second on machines with SMT."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1
