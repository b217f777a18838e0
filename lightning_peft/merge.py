"""Folding the adapter into the base: in memory (``merge_adapter``) or as an export (``MergeCallback``).

The export never changes the training model: each adapted layer hands over its merged weights
(``AdapterLayer.merged_state_dict``), the rest of the state dict is cast to the export dtype, and
``save_pretrained`` writes a plain transformers directory that loads without this package. A 4-bit or 8-bit
base is dequantized layer by layer (the delta added in the compute dtype), so the export needs no bitsandbytes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

from lightning_peft.atomic import atomic_directory
from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.quantization import dequantize, dequantize_module, is_quantized
from lightning_peft.surgery import adapter_layers, find_transformer, set_submodule

ExportDtype = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_dtype(dtype: ExportDtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def merge_adapter(model: nn.Module, dtype: ExportDtype | None = None) -> nn.Module:
    """Fold the adapter into ``model``'s weights in place and remove every adapter module; returns ``model``.

    The result is a plain transformers model (the same object). ``dtype`` optionally casts it afterwards.
    """
    _, hf = find_transformer(model)
    torch_dtype = _torch_dtype(dtype)
    layers = adapter_layers(hf)
    if not layers:
        raise AdapterMismatchError(f"{type(hf).__name__} holds no adapter to merge.")
    merged = {path: layer.merged_module() for path, layer in layers.items()}  # refuses before any swap
    merged.update({path: dequantize_module(m) for path, m in _bare_quantized(hf, layers).items()})
    for path, module in merged.items():
        if module is None:
            parent, _, name = path.rpartition(".")
            delattr(hf.get_submodule(parent) if parent else hf, name)
        else:
            set_submodule(hf, path, module)
    if torch_dtype is not None:
        hf.to(torch_dtype)
    return model


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter folded in, cast to ``dtype``; ``model`` is unchanged."""
    _, hf = find_transformer(model)
    layers = adapter_layers(hf)
    if not layers:
        raise AdapterMismatchError(f"{type(hf).__name__} holds no adapter to merge.")
    merged = {f"{path}.{k}": v for path, layer in layers.items() for k, v in layer.merged_state_dict().items()}
    quantized = _bare_quantized(hf, layers)
    for path, module in quantized.items():
        merged[f"{path}.weight"] = dequantize(module)
        if module.bias is not None:
            merged[f"{path}.bias"] = module.bias.detach()
    replaced = layers.keys() | quantized.keys()
    source = {}
    for key, tensor in hf.state_dict(keep_vars=True).items():
        if not _under(key, replaced):
            source[key] = tensor.detach()
    source.update(merged)
    if dtype is None:
        return source
    # Every source tensor is alive here, so storage addresses identify tied tensors (embeddings and lm_head),
    # which stay one tensor after the cast.
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in source.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        ident = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if ident not in cast:
            cast[ident] = tensor.to(dtype)
        out[key] = cast[ident]
    return out


def _under(key: str, paths: Collection[str]) -> bool:
    """Whether ``key`` names something inside one of the modules at ``paths``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _bare_quantized(model: nn.Module, layers: Collection[str]) -> dict[str, nn.Module]:
    """Quantized layers no adapter covers: exported dequantized, so the result needs no bitsandbytes."""
    return {p: m for p, m in model.named_modules() if is_quantized(m) and not _under(p, layers)}


def export_merged(
    model: nn.Module, dirpath: str | os.PathLike, dtype: ExportDtype | None = None, tokenizer: Any = None
) -> Path:
    """Write ``model`` with its adapter merged as a plain transformers directory (atomically)."""
    _, hf = find_transformer(model)
    torch_dtype = _torch_dtype(dtype)
    state = merged_state_dict(hf, torch_dtype)
    config = copy.deepcopy(hf.config)
    config.dtype = torch_dtype or hf.dtype
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with atomic_directory(dirpath) as tmp:
        hf.save_pretrained(tmp, state_dict=state)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(dirpath)


class MergeCallback(Callback):
    """At the end of ``fit``, export the model with its adapter merged to ``dirpath`` (rank 0 writes).

    Args:
        dirpath: the directory to write; replaced atomically if it exists.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps the model's dtype.
        save_tokenizer: also save the module's ``tokenizer`` attribute, if it has one.
    """

    def __init__(self, dirpath: str | os.PathLike, dtype: ExportDtype | None = None, save_tokenizer: bool = True) -> None:
        _torch_dtype(dtype)  # refuse a bad dtype now, not after hours of training
        self.dirpath = Path(dirpath)
        self.dtype = dtype
        self.save_tokenizer = save_tokenizer

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigError(
                "MergeCallback cannot export under FSDP: each rank holds only a shard of the base. Save the adapter "
                "(SaveAdapterCallback) and merge it in one process (lightning-peft merge, or load_adapter and "
                "export_merged)."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None) if self.save_tokenizer else None
            export_merged(pl_module, self.dirpath, self.dtype, tokenizer)
        trainer.strategy.barrier("MergeCallback")
