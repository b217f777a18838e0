"""Lightning checkpoint files that hold the adapter, not the model.

``PeftCallback.on_save_checkpoint`` trims the state dict to what trains; ``AdapterCheckpointIO`` (Lightning's
``CheckpointIO`` plugin, so every writer goes through it: ``ModelCheckpoint``, ``trainer.save_checkpoint``)
stores those tensors as one safetensors blob, writes the file atomically, and reads it back with ``weights_only``
so a checkpoint can never run code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from typing_extensions import override

from lightning_peft.atomic import atomic_file

SAFETENSORS_KEY = "state_dict_safetensors"


def encode_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``checkpoint`` whose state dict is one safetensors blob."""
    encoded = dict(checkpoint)
    state = encoded.pop("state_dict", {})
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
    # A uint8 tensor, not bytes: torch.save pickles bytes (protocol 2) as latin-1 text, 1.5 times their size.
    encoded[SAFETENSORS_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return encoded


def decode_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    if SAFETENSORS_KEY in checkpoint:
        checkpoint["state_dict"] = load_safetensors(checkpoint.pop(SAFETENSORS_KEY).cpu().numpy().tobytes())
    return checkpoint


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file without unpickling code, with its state dict decoded."""
    return decode_state_dict(torch.load(path, map_location=map_location, weights_only=True))


class AdapterCheckpointIO(TorchCheckpointIO):
    """Atomic, pickle-free-weights checkpoint files; ``validate`` checks a loaded checkpoint before any use, and
    ``prepare`` edits one in place before it is written (weights-only saves skip callbacks' hooks, not this).

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
            super().save_checkpoint(encode_state_dict(checkpoint), path)
            return
        with atomic_file(path) as tmp:
            torch.save(encode_state_dict(checkpoint), tmp)

    @override
    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            checkpoint = decode_state_dict(super().load_checkpoint(path, map_location, weights_only=True))
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            checkpoint = read_checkpoint(path, map_location=map_location)
        if self.validate is not None:
            self.validate(checkpoint, str(path))
        return checkpoint
