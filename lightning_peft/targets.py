"""Which modules of a model an adapter or the quantizer acts on: module path matching, the shared rule for picking
targets (family defaults, ``"all-linear"``, ``exclude_modules``, output head skip) and setting a module at a path.

A leaf module (it imports nothing from the package but ``errors``): methods, surgery and quantization all use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lightning_peft.errors import ConfigError, TargetModulesError

Patterns = list[str] | str


def match_module_name(name: str, patterns: str | list[str] | None) -> bool:
    """HF PEFT's rule: a string is a regex that must match the whole path; a list matches a path or its suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == key or name.endswith("." + key) for key in patterns)

def trained_in_full(path: str, modules_to_save: list[str] | None) -> bool:
    """Whether ``path`` is a module trained in full or inside one: its path, or a parent's, ends with a
    ``modules_to_save`` name (the rule that selects them, ``surgery.modules_to_save_paths``). As in HF PEFT, no
    adapter goes there, so a classification head that holds linear layers (RoBERTa's ``classifier.dense``) is saved
    whole, never adapted."""
    parts = path.split(".")
    return any(".".join(parts[:i]).endswith(name) for name in modules_to_save or [] for i in range(1, len(parts) + 1))


def is_linear(module: nn.Module) -> bool:
    """A layer a single-layer adapter can wrap: ``nn.Linear`` (bitsandbytes' 4-bit and 8-bit layers are
    subclasses) or GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def family_default(model: nn.Module, defaults: Mapping[str, Patterns], fix: str) -> Patterns:
    """``defaults[model_type]``, or a ConfigError naming the family and ``fix`` (what to set instead)."""
    family = model_type(model)
    if family not in defaults:
        raise ConfigError(f"there is no default for model_type={family!r}; {fix}")
    return defaults[family]


def find_targets(
    model: nn.Module,
    target_modules: Patterns | None,
    exclude_modules: Patterns | None,
    defaults: Mapping[str, Patterns],
    method: str,
    supported: Callable[[nn.Module], bool] = is_linear,
    modules_to_save: list[str] | None = None,
) -> dict[str, nn.Module]:
    """The modules a method adapts, by path: every method resolves ``target_modules`` with this one rule.

    ``None`` takes ``defaults`` for the model's family (HF PEFT's defaults), ``"all-linear"`` every supported
    layer but the output head, anything else matches as in HF PEFT; ``exclude_modules`` removes paths, and so does
    ``modules_to_save`` (``trained_in_full``).
    """
    if target_modules is None:
        try:
            target_modules = family_default(model, defaults, "set target_modules (e.g. ['q_proj', 'v_proj'] or "
                                                             "'all-linear').")
        except ConfigError as err:
            raise ConfigError(f"{method} has no target_modules and {err}") from None
    skip = {path for path, _ in model.named_modules() if trained_in_full(path, modules_to_save)}
    if target_modules == "all-linear":
        target_modules, skip = r".*", skip | output_head_paths(model)
    return select_targets(model, target_modules, exclude_modules, supported, skip)


def select_targets(
    model: nn.Module,
    target_modules: str | list[str],
    exclude_modules: str | list[str] | None,
    supported: Callable[[nn.Module], bool],
    skip: set[str] = frozenset(),
    what: str = "target_modules",
) -> dict[str, nn.Module]:
    """The modules whose path matches ``target_modules`` and not ``exclude_modules``; refuse when none fit.

    ``skip`` holds paths never adapted (the output head under ``"all-linear"``). The error lists the names of
    the modules that could have been targeted, so the fix is one read away.
    """
    found: dict[str, nn.Module] = {}
    wrong_type: list[str] = []
    for path, module in model.named_modules():
        if not path or path in skip:
            continue
        if not match_module_name(path, target_modules) or match_module_name(path, exclude_modules):
            continue
        if supported(module):
            found[path] = module
        else:
            wrong_type.append(f"{path} ({type(module).__name__})")
    if found:
        return found
    candidates = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and supported(m)})
    hint = f" Matching modules of a type that cannot be adapted: {', '.join(wrong_type[:5])}." if wrong_type else ""
    raise TargetModulesError(
        f"{what}={target_modules!r} matched no adaptable module of {type(model).__name__}.{hint} "
        f"Adaptable module names: {', '.join(candidates)}. A list entry matches a module path or its last "
        f"components (e.g. 'q_proj'); a string is a regex that must match the whole path."
    )

def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output embedding (``lm_head``), which ``"all-linear"`` never adapts."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return {p for p, m in model.named_modules() if head is not None and m is head}

def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``model``, adding the attribute when the path is new."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def layer_index(path: str, layers_pattern: str | list[str] | None) -> int | None:
    """The layer a module path belongs to, by HF PEFT's ``layers_to_transform`` rule: the first number that follows
    a ``layers_pattern`` component (any component when the pattern is empty), or None when there is none."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return None if match is None else int(match["idx"])
