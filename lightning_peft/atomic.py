"""Atomic writes: a file or directory appears complete under its final name, or not at all; and where the
callbacks that write at the end of ``fit`` put their output (``output_directory``).

Everything is written under a hidden temporary name in the same directory (same file system, so the rename is
atomic), flushed to disk, then renamed into place. A process killed at any instant leaves either the previous
complete version or the new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as f:
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
