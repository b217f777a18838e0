"""A long run holds its memory flat: hundreds of steps under PeftCallback (with AdaLoRA's per-step hooks and
LoRA+'s param groups too) add no resident memory per step, while a run that keeps each step's graph alive, the
leak this guards against, is caught by the same measure. Each run is measured in a fresh process
(tests/scripts/resident_growth.py): inside the test session, the heap left by earlier tests absorbs a leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import launcher_free_env

SCRIPT = Path(__file__).parent / "scripts" / "resident_growth.py"
# Bytes of resident growth per step tolerated: a clean run measures ~0.5 KB (plus the allocator's occasional jump of
# a few hundred KB), one that keeps its graphs 100+ KB.
LEAK_LIMIT = 10_000


def growth_per_step(adapter: str, module: str) -> float:
    result = subprocess.run([sys.executable, str(SCRIPT), adapter, module], capture_output=True, text=True,
                            timeout=600, env=launcher_free_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["bytes_per_step"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
@pytest.mark.parametrize("adapter", ["lora-plus", "adalora"])
def test_resident_memory_stays_flat_over_hundreds_of_steps(adapter):
    leaky = growth_per_step(adapter, "keeps-graphs")
    assert leaky > LEAK_LIMIT, f"the measure missed a known leak ({leaky:.0f} B/step)"
    flat = growth_per_step(adapter, "clean")
    assert flat < LEAK_LIMIT, f"resident memory grows {flat:.0f} bytes per step"
