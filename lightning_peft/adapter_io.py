"""Saving and loading adapters in HF PEFT's on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are module paths inside
the transformers model, prefixed with ``base_model.model.``, with the suffix each adapter layer declares
(``lora_A.weight``...). This module is the only place that translates between those names and ours.

``adapter_config.json`` holds only fields HF PEFT's config class knows, so PEFT loads it without a warning.
What PEFT has no field for (the base's fingerprint, the GGUF file it was read from, ``loraplus_lr_ratio``) is
one JSON object under the key ``lightning_peft`` of the safetensors file's metadata, which PEFT ignores.
Loading never unpickles: tensors come from safetensors, Lightning checkpoints are read with ``weights_only``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_peft.atomic import atomic_directory
from lightning_peft.errors import AdapterFileError, AdapterMismatchError, TargetModulesError
from lightning_peft.fingerprint import base_fingerprint, fingerprint_mismatch
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.resources import model_source
from lightning_peft.surgery import (
    active_config,
    adapter_layers,
    attach,
    detach,
    find_transformer,
    modules_to_save_paths,
)

CONFIG_NAME = "adapter_config.json"
FINGERPRINT_KEY = "base_model_fingerprint"
METADATA_KEY = "lightning_peft"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_names(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    """Map each tensor the adapter owns, from its on-disk key to its name in ``model`` (a transformers model).

    Covers the adapter layers' declared parameters, the modules trained in full (``modules_to_save``) and the
    base parameters the config trains (biases).
    """
    names: dict[str, str] = {}
    layers = adapter_layers(model)
    for path, layer in layers.items():
        for param in layer.adapter_parameters():
            names[layer.disk_key(path, param)] = f"{path}.{param}"
    for path in modules_to_save_paths(model, config):
        for key in model.get_submodule(path).state_dict():
            names[f"{config.disk_prefix}{path}.{key}"] = f"{path}.{key}"
    for name in config.trainable_base_parameters(model, layers):
        names[f"{config.disk_prefix}{name}"] = name
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT's keys, contiguous and on CPU, ready for safetensors.

    Each adapter layer hands over what it saves (``AdapterLayer.saved_tensors``: its parameters, or a computed
    form such as prefix tuning's projected prefix); the rest are the model's own tensors.
    """
    _, hf = find_transformer(model)
    config = _require_adapter(hf)
    state = hf.state_dict(keep_vars=False)
    layers = adapter_layers(hf)
    owned = {f"{path}.{name}" for path, layer in layers.items() for name in layer.adapter_parameters()}
    tensors = {disk: state[name] for disk, name in adapter_names(hf, config).items() if name not in owned}
    with torch.no_grad():
        for path, layer in layers.items():
            tensors.update(layer.saved_tensors(path))
    return {disk: value.detach().cpu().contiguous() for disk, value in tensors.items()}


def save_adapter(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write the adapter in ``model`` (a transformers model or a module holding one) as an HF PEFT directory.

    The directory is written atomically: it is complete under its final name or not there at all. In a
    distributed run only global rank 0 writes (every rank holds the same adapter).
    """
    _, hf = find_transformer(model)
    config = _require_adapter(hf)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return Path(save_directory)
    tensors = adapter_state_dict(hf)
    content = config.to_dict()
    if content["base_model_name_or_path"] is None:
        content["base_model_name_or_path"], content["base_model_gguf_file"] = model_source(hf)
    if any(getattr(layer, "transposed", False) for layer in adapter_layers(hf).values()):
        content["fan_in_fan_out"] = True
    own = {key: content.pop(key) for key in config.own_fields}
    record = {FINGERPRINT_KEY: base_fingerprint(hf), "config": {k: v for k, v in own.items() if v is not None}}
    with atomic_directory(save_directory) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", METADATA_KEY: json.dumps(record)})
        (tmp / CONFIG_NAME).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return Path(save_directory)


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor], str, Any]:
    """Read an adapter directory or a lightning_peft checkpoint file without touching any model.

    Returns the config, the tensors, how their keys are spelled (``"disk"``: HF PEFT keys; otherwise the module
    path prefix of checkpoint state-dict keys, which are relative to the LightningModule) and the recorded base
    fingerprint (None when absent).
    """
    path = Path(path)
    if path.is_file():
        return _read_checkpoint(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path} does not exist. Pass a directory written by save_adapter or HF PEFT.")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{path} has no {CONFIG_NAME}; is it an adapter directory (see save_adapter)?")
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{path} holds adapter_model.bin, a pickle, which is never loaded (it can run code). Convert it "
                f"to {WEIGHTS_NAME} in a trusted environment (peft's save_pretrained writes safetensors)."
            )
        raise AdapterFileError(f"{path} has no {WEIGHTS_NAME}.")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_path} is not valid JSON ({err}); re-save the adapter.") from None
    try:
        with safe_open(weights_path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_path} is not a readable safetensors file ({err}); re-save it.") from None
    try:
        record = json.loads(metadata.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{weights_path}: its {METADATA_KEY!r} metadata is not valid JSON ({err}).") from None
    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        raise AdapterFileError(f"{weights_path}: its {METADATA_KEY!r} metadata is not a JSON object of objects.")
    fingerprint = record.get(FINGERPRINT_KEY)
    if isinstance(data, dict):
        fingerprint = record.get(FINGERPRINT_KEY, data.pop(FINGERPRINT_KEY, None))  # older files kept it in the JSON
        data = {**data, **record.get("config", {})}
    config = AdapterConfig.from_dict(data, source=str(config_path))
    return config, tensors, "disk", fingerprint


def _read_checkpoint(path: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], str, Any]:
    from lightning_peft.checkpoint import FINGERPRINT, PEFT_KEY

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise AdapterFileError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err}).") from None
    meta = checkpoint.get(PEFT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "adapter_config" not in meta:
        raise AdapterFileError(f"{path} is not a checkpoint written under PeftCallback (no adapter record).")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFileError(f"{path} has no state_dict of tensors; re-save it under PeftCallback.")
    config = AdapterConfig.from_dict(meta["adapter_config"], source=f"{path} (adapter_config)")
    return config, state, str(meta.get("model_prefix", "")), meta.get(FINGERPRINT)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, strict: bool = False
) -> nn.Module:
    """Inject the adapter saved at ``path`` into ``model`` in place and return the model to call.

    ``path`` is an adapter directory (ours or HF PEFT's) or a checkpoint written under ``PeftCallback``.
    Every file, key and shape is checked before the first weight is written: on any error the model is left as
    it was. With ``is_trainable=False`` (inference) the adapter's tensors are frozen too.

    The adapter records a fingerprint of the base it was trained on; loading it onto another base with the same
    shapes warns loudly, or with ``strict=True`` is refused (AdapterMismatchError).
    """
    config, tensors, spelling, fingerprint = read_adapter(path)
    if spelling == "disk":
        config = config.saved_form()
    _, hf = find_transformer(model)
    reason = fingerprint_mismatch(hf, fingerprint)
    if reason is not None:
        message = (f"{path} was trained on another base model than this {type(hf).__name__}: {reason}. Its outputs "
                   f"will be wrong; load it onto {config.base_model_name_or_path or 'the base it was trained on'}.")
        if strict:
            raise AdapterMismatchError(message)
        warnings.warn(message, stacklevel=2)
    inject_tensors(hf, config, tensors, spelling, path)
    if not is_trainable:
        hf.requires_grad_(False)
    return model


def inject_tensors(hf: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], spelling: str,
                   source: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attach ``config`` to the transformers model ``hf`` and copy in ``tensors`` (keys spelled as ``read_adapter``
    says); on any error the model is left as it was. Returns the base tensors it overwrote (heads trained in
    full, biases), each with a CPU copy of its value before, so the bare base can be restored."""
    flags = {name: p.requires_grad for name, p in hf.named_parameters()}
    try:
        attach(hf, config)
    except TargetModulesError as err:
        raise AdapterMismatchError(f"{source} does not fit {type(hf).__name__}: {err}") from None
    try:
        names = adapter_names(hf, active_config(hf))
        if spelling == "disk":
            named = {names.get(key, key): value for key, value in tensors.items()}
        else:
            prefix = f"{spelling}." if spelling else ""
            named = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _check_tensors(hf, named, set(names.values()), source)
    except Exception:
        detach(hf)
        for name, param in hf.named_parameters():
            param.requires_grad_(flags[name])
        raise
    owned = {f"{path}.{name}" for path, layer in adapter_layers(hf).items() for name in layer.adapter_parameters()}
    overwritten = []
    with torch.no_grad():
        for name, value in named.items():
            target = _get_tensor(hf, name)
            if name not in owned:
                overwritten.append((target, target.detach().cpu().clone()))
            target.copy_(value)
    return overwritten


def _check_tensors(hf: nn.Module, named: dict[str, torch.Tensor], expected: set[str], path: object) -> None:
    missing = sorted(expected - named.keys())
    unexpected = sorted(named.keys() - expected)
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{path} does not fit {type(hf).__name__}: "
            + (f"missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"tensors for modules the model lacks or the config does not adapt: {unexpected[:5]}; "
               if unexpected else "")
            + "load it into the base model it was trained on."
        )
    for name, value in named.items():
        target = _get_tensor(hf, name)
        if target.shape != value.shape:
            raise AdapterMismatchError(
                f"{path}: {name} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}; "
                f"the adapter was trained on a base with other dimensions."
            )


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_path) if module_path else model, attr)


def _require_adapter(hf: nn.Module) -> AdapterConfig:
    config = active_config(hf)
    if config is None:
        raise AdapterMismatchError(
            f"{type(hf).__name__} holds no adapter; inject one with PeftCallback or load_adapter first."
        )
    return config


__all__ = ["adapter_names", "adapter_state_dict", "inject_tensors", "load_adapter", "read_adapter", "save_adapter"]
