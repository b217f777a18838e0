"""Lightning checkpoint files that hold the adapter, not the model, in Lightning's own layout.

A checkpoint written under ``PeftCallback`` is an ordinary Lightning checkpoint whose ``state_dict`` holds only
what trains (the adapter's tensors, plus heads or biases the method trains), as plain tensors under the
LightningModule's names, and a ``peft`` record of plain JSON types (the adapter config, where the transformers
model sits in the module, a fingerprint of its base). So ``torch.load(path, weights_only=True)["state_dict"]``
reads it, and nothing in it is a class of ours.

- ``PeftCallback.on_save_checkpoint`` trims the state dict and adds the record (``adapter_keys``,
  ``adapter_record``).
- ``AdapterCheckpointIO`` (Lightning's ``CheckpointIO`` plugin, so every writer goes through it: ``ModelCheckpoint``,
  ``trainer.save_checkpoint``) writes the file atomically and reads it back with ``weights_only``, so a checkpoint
  can never run code.
- ``restore_adapter``, called from a LightningModule's ``on_load_checkpoint`` (the built-in modules do), makes
  ``Module.load_from_checkpoint(path)`` and ``trainer.validate(ckpt_path=...)`` work without ``PeftCallback``: it
  injects the recorded adapter and lets Lightning's strict loading check exactly the adapter's tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_peft.atomic import atomic_file
from lightning_peft.fingerprint import base_fingerprint, fingerprint_mismatch
from lightning_peft.fsdp import clean_name
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.surgery import active_config, adapter_layers, attach, find_transformer

PEFT_KEY = "peft"  # the checkpoint's adapter record
FINGERPRINT = "base_model_fingerprint"


def adapter_keys(pl_module: pl.LightningModule) -> set[str]:
    """State-dict keys of ``pl_module`` a checkpoint keeps: every trainable parameter and every adapter tensor."""
    prefix, model = find_transformer(pl_module)
    keys = {clean_name(name) for name, p in pl_module.named_parameters() if p.requires_grad}
    dot = f"{prefix}." if prefix else ""
    for path, layer in adapter_layers(model).items():
        keys.update(clean_name(f"{dot}{path}.{name}") for name in layer.adapter_parameters())
    return keys


def adapter_record(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The ``peft`` record of a checkpoint: the adapter config (with the base it was trained on), the module path
    of the transformers model and the base's fingerprint, as plain JSON types."""
    prefix, model = find_transformer(pl_module)
    config = active_config(model).to_dict()
    if config.get("base_model_name_or_path") is None:
        config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or None
    return {"adapter_config": config, "model_prefix": prefix, FINGERPRINT: base_fingerprint(model)}


def restore_adapter(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Prepare ``pl_module`` to load an adapter-only ``checkpoint``; call it from ``on_load_checkpoint``.

    If the module's model holds no adapter (no ``PeftCallback`` injected one), the one the checkpoint records is
    injected. Under strict loading (Lightning's default without ``PeftCallback``), the base tensors, which the
    checkpoint leaves out, are taken from the module itself, so the strict check covers exactly the adapter.
    A checkpoint without a ``peft`` record is left to Lightning.

    Example::

        class MyModule(LightningModule):
            def on_load_checkpoint(self, checkpoint):
                restore_adapter(self, checkpoint)
    """
    record = checkpoint.get(PEFT_KEY)
    if not isinstance(record, dict):
        return
    _, model = find_transformer(pl_module)
    if active_config(model) is None:
        config = AdapterConfig.from_dict(record.get("adapter_config"), source="the checkpoint's adapter record")
        reason = fingerprint_mismatch(model, record.get(FINGERPRINT))
        if reason is not None:
            warnings.warn(f"The checkpoint's adapter was trained on another base than this {type(model).__name__}: "
                          f"{reason}; its outputs will be wrong.", stacklevel=2)
        attach(model, config)
    if pl_module.strict_loading:
        kept = adapter_keys(pl_module)
        state = checkpoint["state_dict"]
        for name, tensor in pl_module.state_dict().items():
            if name not in kept:
                state.setdefault(name, tensor)


class AdapterCheckpointIO(TorchCheckpointIO):
    """Atomic checkpoint files read without unpickling code; ``validate`` checks a loaded checkpoint before any
    use, and ``prepare`` edits one in place before it is written (weights-only saves skip callbacks' hooks, not
    this).

    Installed by ``PeftCallback`` in place of Lightning's default ``TorchCheckpointIO``.
    """

    def __init__(self, validate: Callable[[dict[str, Any], str], None] | None = None,
                 prepare: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.validate = validate
        self.prepare = prepare

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        if self.prepare is not None:
            self.prepare(checkpoint)
        if "://" in str(path):  # remote file systems: no rename to rely on
            super().save_checkpoint(checkpoint, path)
            return
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            checkpoint = super().load_checkpoint(path, map_location, weights_only=True)
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True)
        if self.validate is not None:
            self.validate(checkpoint, str(path))
        return checkpoint
