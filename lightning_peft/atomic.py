"""Atomic writes: a file or directory appears complete under its final name, or not at all; and where the
callbacks that write at the end of ``fit`` put their output (``output_directory``).

Everything is written under a hidden temporary name in the same directory (same file system, so the rename is
atomic), flushed to disk, then renamed into place. A process killed at any instant leaves either the previous
complete version or the new one.

What is written gets the permissions ``open`` and ``os.makedirs`` give (``0666``/``0777`` less the process
umask), as ``save_pretrained`` intends, not ``tempfile``'s private ``0600``/``0700`` nor the ``0600`` safetensors
0.8 gives its files: a model server running as another user must be able to read what training wrote. The
temporary name is created with ``0666``/``0777`` and the kernel applies the umask; its resulting mode is the
one given to everything written, so the umask is never read or changed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl

from lightning_peft.errors import ConfigError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    """A hidden, unused name next to ``path``, created exclusively by the caller."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask
    try:
        yield tmp
        os.chmod(tmp, mode)  # in case the writer replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it takes the place of ``path``.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is first renamed aside and
    removed after the swap: at every instant one complete version exists under one of the two names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir(0o777)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0777 less the umask
    old = None
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_dir():
                os.chmod(item, mode)
            elif item.is_file():
                os.chmod(item, mode & 0o666)
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def output_directory(trainer: pl.Trainer, dirpath: str | os.PathLike | None, name: str, overwrite: bool,
                     what: str) -> Path:
    """Where a callback writes at the end of ``fit``: ``dirpath``, or ``<trainer.log_dir>/<name>`` (the run's own
    directory, so runs never share one). Refuses, on every rank, a non-empty directory already there unless
    ``overwrite``: the output of an earlier run is never replaced by accident. Call it on every rank (``setup``):
    ``trainer.log_dir`` and the decision are broadcast from rank 0, which does the writing."""
    path = Path(dirpath) if dirpath is not None else Path(trainer.log_dir or ".") / name
    taken = trainer.strategy.broadcast(path.is_dir() and any(path.iterdir()))
    if taken and not overwrite:
        raise ConfigError(
            f"{path} already holds files (an earlier run's {what}?) and would be replaced at the end of this run. "
            f"Pass another dirpath, leave dirpath unset to write into the run's log directory, or set "
            f"overwrite=True to replace it."
        )
    return path
