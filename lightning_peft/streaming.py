"""Fill a model created on the meta device from a pretrained directory's safetensors files, one tensor at a time.

Each tensor is read from disk with plain file reads (no memory map, so pages already consumed do not stay
resident), converted and placed: a weight of a quantized layer is quantized on arrival (``load_weight``), any
other tensor takes the dtype the meta model declared. At no point does the full-precision
model exist in memory: the peak is the quantized model plus the largest single tensor. The many short-lived
buffers (each tensor, bitsandbytes' quantization temporaries) would leave the C heap fragmented, the freed
memory still counted as resident (measured: +60% over the quantized model); on glibc the free pages are
handed back to the system after each tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.errors import ConfigError
from lightning_peft.quantization import is_quantized, load_weight

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (one file, or the shards its index names)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(
        f"{directory} holds no model.safetensors or model.safetensors.index.json; streaming loads only safetensors "
        f"checkpoints (save with model.save_pretrained(path), which writes them by default)."
    )


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for each tensor of a safetensors file, each read into its own fresh memory."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        start = 8 + header_len
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ConfigError(f"{path}: tensor {name} has dtype {info['dtype']}, which streaming cannot read.")
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            f.readinto(memoryview(buffer.numpy()))
            yield name, buffer.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, which returns free heap pages to the system; None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _model_key(model: PreTrainedModel, key: str, names: set[str]) -> str | None:
    """``key`` as named in ``model``: checkpoints of a bare model lack the task model's prefix, and the reverse."""
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    for candidate in (key, prefix + key, key.removeprefix(prefix) if prefix else key):
        if candidate in names:
            return candidate
    return None


def meta_tensor_names(model: nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


@torch.no_grad()
def stream_load(model: PreTrainedModel, directory: str | os.PathLike, device: torch.device | str) -> None:
    """Load every tensor of ``directory`` into the meta tensors of ``model`` (quantized layers already in place),
    on ``device``; tied weights are re-tied and non-persistent buffers (rotary frequencies) recomputed.

    Raises ``ConfigError`` naming the tensors neither the checkpoint nor the model could provide.
    """
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for file in checkpoint_files(directory):
        for key, tensor in read_tensors(file):
            name = _model_key(model, key, names)
            if name is None:
                continue  # e.g. rotary buffers older checkpoints saved; transformers ignores them too
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            if is_quantized(owner) and attr == "weight":
                load_weight(owner, tensor, device)
                del tensor
                release_free_memory()
                continue
            current = getattr(owner, attr)
            dtype = current.dtype if current.is_floating_point() else tensor.dtype
            value = tensor.to(device=device, dtype=dtype)
            if isinstance(current, nn.Parameter):
                value = nn.Parameter(value, requires_grad=current.requires_grad)
            setattr(owner, attr, value)
            value._is_hf_initialized = True  # transformers' init functions skip tensors flagged as loaded
    model.tie_weights()
    _recompute_buffers(model, device)
    missing = meta_tensor_names(model)
    if missing:
        raise ConfigError(
            f"{directory} does not hold {len(missing)} tensors of {type(model).__name__}: {missing[:5]}. Create the "
            f"model from this directory's own config (AutoConfig.from_pretrained(path)), or build the missing "
            f"modules outside the meta-device context."
        )


def _recompute_buffers(model: PreTrainedModel, device: torch.device | str) -> None:
    """Give meta non-persistent buffers (rotary frequencies, position ids) their values, as transformers'
    ``from_pretrained`` does: allocate them, then run the model's own initializer on their module."""
    owners = {}
    for name, buffer in model.named_buffers():
        if buffer.device.type == "meta":
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            setattr(owner, attr, torch.empty_like(buffer, device=device))  # keeps the buffer's registration
            owners[owner_path] = owner
    for owner in owners.values():
        model._init_weights(owner)  # the per-module initializer models override; loaded tensors are flagged
