"""DDP on CPU: two processes over gloo keep identical adapters, write adapter-only checkpoints once, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launcher_free_env
from lightning_peft.checkpoint import read_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def _run(out: Path, steps: int, ckpt: Path | None = None) -> None:
    cmd = [sys.executable, str(SCRIPT), str(out), str(steps)] + ([str(ckpt)] if ckpt else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_trains_identical_adapters_and_resumes(tmp_path):
    _run(tmp_path / "a", 8)
    ranks = [load_file(tmp_path / "a" / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 8
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert sorted(p.name for p in (tmp_path / "a" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], ranks[0][k]) for k in saved)

    ckpts = sorted((tmp_path / "a" / "ckpt").iterdir())
    assert [p.name for p in ckpts] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    state = read_checkpoint(ckpts[0])["state_dict"]
    assert len(state) == 8 and all(".lora_" in k for k in state)

    _run(tmp_path / "b", 8, ckpt=ckpts[0])  # end of epoch 0: the data order is reproducible
    resumed = load_file(tmp_path / "b" / "rank0.safetensors")
    for key in resumed:
        torch.testing.assert_close(resumed[key], ranks[0][key], rtol=1e-5, atol=1e-6)
