"""Output paths and the files quantpredict writes: checked before any work, written with the user's permissions.

Torch-free and import-light (floor 1): the CLI checks every ``--out``/``--plot``/``--store`` with
:func:`check_output` before it loads a model, and every package that writes weights calls :func:`honour_umask` on
them (safetensors writes through a private temporary file, mode 0600; every other file quantpredict writes is
``0666 & ~umask``, 0644 under the usual umask).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantpredict.errors import OutputError


def umask() -> int:
    """This process's umask (read without changing it where ``/proc`` says it; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(*paths: str | os.PathLike) -> None:
    """Give each existing file in ``paths`` the mode an ordinary ``open(path, "w")`` would: ``0666 & ~umask``."""
    mode = 0o666 & ~umask()
    for p in paths:
        if Path(p).is_file():
            os.chmod(p, mode)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_output(path: str | os.PathLike, flag: str, *, kind: str = "file") -> Path:
    """``path`` as a :class:`Path` if this process can write it, else :class:`~quantpredict.errors.OutputError`
    naming ``flag`` and the path; nothing is created (the nearest existing ancestor is checked instead).

    ``kind="file"``: a file to write (it may exist, but not as a directory); ``kind="dir"``: a directory to write
    into (it may exist as a directory; its files are replaced)."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path).expanduser()
    what = "folder" if kind == "dir" else "file"
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise OutputError(f"{flag} {path}: a file of that name exists where the output {what} should be; pass "
                              "another folder or remove the file")
        if kind == "file" and p.is_dir():
            raise OutputError(f"{flag} {path} is a directory; give a file name")
        if not os.access(p, os.W_OK | (os.X_OK if kind == "dir" else 0)):
            raise OutputError(f"{flag} {path}: the {what} exists but is not writable by this user; pass a "
                              f"writable {what} or change its permissions")
        if kind == "file" and not os.access(p.resolve().parent, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: the folder {p.resolve().parent} is not writable by this user; pass "
                              "a path in a writable folder")
        return p
    base = _nearest_existing(p.parent if kind == "file" else p)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, so the output {what} cannot be created under it; pass "
                          "a path in a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the folder {base} is not writable by this user, so the output {what} "
                          "cannot be created there; pass a path in a writable folder")
    return p


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write ``out``'s files into: ``out`` itself when it exists (its files are replaced), else a
    sibling ``<name>.partial-<pid>`` renamed to ``out`` when the block ends without an error, so that an interrupted
    or failed write leaves nothing behind."""
    out = Path(out)
    stage = out if out.is_dir() else out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        stage.mkdir(parents=True, exist_ok=True)
        yield stage
        if stage != out:
            stage.rename(out)
    finally:
        if stage != out and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
