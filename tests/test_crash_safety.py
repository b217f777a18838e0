"""A run killed with SIGKILL at random instants while it checkpoints every step loses nothing but the step in
flight: every checkpoint under its final name is complete, and the run resumes to the expected step."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import launcher_free_env

SCRIPT = Path(__file__).parent / "scripts" / "crash_fit.py"
MAX_STEPS = 120  # far more than three kills take, so no run finishes before its kill


def _complete_checkpoints(out: Path, running: bool = False) -> list[int]:
    steps = []
    for path in out.glob("*.ckpt"):
        try:
            checkpoint = torch.load(path, weights_only=True)  # raises on a partial file
        except FileNotFoundError:
            if running:  # the run removed its previous best between our listing and our read
                continue
            raise
        assert len(checkpoint["state_dict"]) == 2 * 7 * 2
        steps.append(checkpoint["global_step"])
    return steps


@pytest.mark.slow
def test_sigkill_during_checkpointing_then_resume(tmp_path):
    rng = random.Random(0)
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), str(MAX_STEPS)]
    last_step = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=launcher_free_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _complete_checkpoints(tmp_path, running=True) if (tmp_path / "last.ckpt").exists() else []
            if steps and max(steps) > last_step + 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps = _complete_checkpoints(tmp_path)
        assert steps and max(steps) >= last_step
        last_step = max(steps)
        assert not (tmp_path / "done.json").exists()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "done.json").read_text())["global_step"] == MAX_STEPS
    assert max(_complete_checkpoints(tmp_path)) == MAX_STEPS
