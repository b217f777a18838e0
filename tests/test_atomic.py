"""Atomic writes give what they write the permissions ``open``/``os.makedirs`` give (0666/0777 less the umask),
as ``save_pretrained`` intends, so a model server running as another user can read adapters, merged exports and
checkpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import make_model
from lightning_peft import LoraConfig, export_merged, save_adapter
from lightning_peft.atomic import atomic_directory, atomic_file
from lightning_peft.surgery import attach


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything below it, by kind."""
    found = {"dir": {stat.S_IMODE(root.stat().st_mode)}, "file": set()}
    for path in root.rglob("*"):
        found["dir" if path.is_dir() else "file"].add(stat.S_IMODE(path.stat().st_mode))
    return found


def test_adapter_and_merged_export_are_readable_as_the_umask_allows(tmp_path, umask):
    # save_pretrained's own directory and JSON files get 0777/0666 less the umask; safetensors 0.8 writes its
    # weights 0600 whatever the umask, which a server running as another user cannot read.
    expected = {"dir": {0o777 & ~umask}, "file": {0o666 & ~umask}}
    model = make_model("llama")
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "adapter")
    export_merged(model, tmp_path / "merged")
    assert modes(tmp_path / "adapter") == expected
    assert modes(tmp_path / "merged") == expected
    save_adapter(model, tmp_path / "adapter")  # replacing an existing directory keeps them too
    assert modes(tmp_path / "adapter") == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_file_and_directory_follow_the_umask(tmp_path, umask):
    with atomic_file(tmp_path / "last.ckpt") as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_a_failed_write_leaves_neither_a_temporary_nor_a_partial_result(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
