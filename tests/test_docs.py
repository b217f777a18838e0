"""The generated documents match the code and the data they are generated from: the CLI and config references,
the methods table and the example chat data. Each generator's ``--check`` says which file is stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


GENERATORS = ["scripts/gen_docs.py", "docs/gen_methods_table.py", "scripts/convert_chatterbot.py"]


@pytest.mark.parametrize("script", GENERATORS)
def test_generated_file_is_up_to_date(script):
    result = subprocess.run([sys.executable, script, "--check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
