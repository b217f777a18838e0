"""Folding the adapter into the base: in memory (``merge_adapter``) or as an export (``export_merged``,
``MergeCallback``).

The export never changes the training model: each adapted layer hands over its merged weights
(``AdapterLayer.merged_state_dict``), the rest of the state dict is cast to the export dtype, and the result is a
plain transformers directory (safetensors, ``config.json``) that loads without this package. A 4-bit or 8-bit
base is dequantized layer by layer (the delta added in the compute dtype), so the export needs no bitsandbytes.
It streams: one layer is merged at a time, on the model's device, and written to the file before the next
(``shards.write_sharded``), so host memory never holds the dense model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.atomic import atomic_directory, output_directory
from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.fsdp import is_fsdp
from lightning_peft.methods.base import AdapterLayer
from lightning_peft.quantization import dequantize, dequantize_module, dequantized_dtype, is_quantized
from lightning_peft.shards import DEFAULT_SHARD_SIZE, write_sharded
from lightning_peft.surgery import adapter_layers, find_transformer
from lightning_peft.targets import set_submodule

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


def merged_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's state dict with every adapter folded in, cast to ``dtype``, one tensor at a time, on the
    device the model is on; ``model`` is unchanged. Only one adapted or quantized layer is merged (dequantized) at
    once, so the whole dense model never exists in memory. A tensor tied to one named before (the output
    embedding) is left out, as ``save_pretrained`` does; ``from_pretrained`` ties it again."""
    return _merged(model, dtype, plan=False)


def _merged(model: nn.Module, dtype: torch.dtype | None, plan: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``merged_tensors``; with ``plan``, meta tensors of the same names, shapes and dtypes wherever they are
    known without computing (all but the adapted layers, whose merge rule is their own)."""
    _, hf = find_transformer(model)
    layers = adapter_layers(hf)
    if not layers:
        raise AdapterMismatchError(f"{type(hf).__name__} holds no adapter to merge.")
    replaced: dict[str, nn.Module] = {**layers, **_bare_quantized(hf, layers)}
    done: set[str] = set()
    seen: set[tuple] = set()
    with torch.no_grad():
        for key, tensor in hf.state_dict(keep_vars=True).items():
            owner = _owner(key, replaced)
            if owner is None:
                ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
                if ident in seen:
                    continue
                seen.add(ident)
                yield key, (_meta(tensor.shape, tensor.dtype, dtype) if plan else _cast(tensor.detach(), dtype))
            elif owner not in done:
                done.add(owner)
                module = replaced[owner]
                if plan and not isinstance(module, AdapterLayer):
                    merged = {"weight": _meta((module.out_features, module.in_features), dequantized_dtype(module),
                                              dtype)}
                    if module.bias is not None:
                        merged["bias"] = _meta(module.bias.shape, module.bias.dtype, dtype)
                else:
                    merged = {k: _cast(v, dtype) for k, v in _merged_layer(module).items()}
                for name, value in merged.items():
                    yield f"{owner}.{name}", value


def _meta(shape: torch.Size | tuple[int, ...], own: torch.dtype, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype if dtype is not None and own.is_floating_point else own, device="meta")


def _merged_layer(module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(module, AdapterLayer):
        return module.merged_state_dict()
    merged = {"weight": dequantize(module)}  # a quantized layer no adapter covers: exported dense
    if module.bias is not None:
        merged["bias"] = module.bias.detach()
    return merged


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _owner(key: str, paths: Collection[str]) -> str | None:
    """The path among ``paths`` of the module that holds ``key``, if any."""
    parts = key.split(".")
    return next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in paths), None)


def _bare_quantized(model: nn.Module, layers: Collection[str]) -> dict[str, nn.Module]:
    """Quantized layers no adapter covers: exported dequantized, so the result needs no bitsandbytes."""
    return {p: m for p, m in model.named_modules() if is_quantized(m) and _owner(f"{p}.weight", layers) is None}


def export_merged(
    model: nn.Module, dirpath: str | os.PathLike, dtype: ExportDtype | None = None, tokenizer: Any = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write ``model`` with its adapter merged as a plain transformers directory (atomically).

    The merge runs where the model is (a GPU, for a model trained there) and each merged tensor goes straight to
    the safetensors file(s) (``shards.write_sharded``): host memory holds one tensor at a time, never the dense
    model. The adapted layers are merged twice, once to learn the shapes the file header lists first, once to
    write; everything else is planned from its shape. Files of more than ``max_shard_size`` bytes are split as
    ``save_pretrained`` splits them.
    """
    _, hf = find_transformer(model)
    torch_dtype = _torch_dtype(dtype)
    plan = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in _merged(hf, torch_dtype, plan=True)]
    config = copy.deepcopy(hf.config)
    config.dtype = torch_dtype or hf.dtype
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with atomic_directory(dirpath) as tmp:
        write_sharded(tmp, plan, merged_tensors(hf, torch_dtype), max_shard_size)
        config.save_pretrained(tmp)
        if getattr(hf, "generation_config", None) is not None and hf.can_generate():
            hf.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(dirpath)


class MergeCallback(Callback):
    """When training ends, export the model with its adapter merged (rank 0 writes, the others wait).

    The export runs in ``on_train_end``: after the last validation, but before the strategy's teardown moves the
    model to the CPU (``on_fit_end`` comes after it), so the layers merge where they were trained, one at a time,
    and only the merged tensors travel to the host, each on its way to the file. An 8-bit base merges there too
    (the CPU move would leave its scales behind on the GPU). Under DDP the other ranks compute nothing: they wait
    at a barrier on a process group of their own whose timeout (``wait_hours``) allows for writing a large model,
    where the training group's would expire.

    Args:
        dirpath: the directory to write; default: ``merged`` inside the run's log directory (``trainer.log_dir``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps the model's dtype.
        save_tokenizer: also save the module's ``tokenizer`` attribute, if it has one.
        overwrite: replace a non-empty directory already at ``dirpath``; without it the run is refused at setup.
        wait_hours: how long the other ranks wait for rank 0's export.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, dtype: ExportDtype | None = None,
                 save_tokenizer: bool = True, overwrite: bool = False, wait_hours: float = 6.0) -> None:
        _torch_dtype(dtype)  # refuse a bad dtype now, not after hours of training
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.dtype = dtype
        self.save_tokenizer = save_tokenizer
        self.overwrite = overwrite
        self.wait_hours = wait_hours
        self._path: Path | None = None
        self._group: Any = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_fsdp(trainer.strategy):
            raise ConfigError(
                "MergeCallback cannot export under FSDP: each rank holds only a shard of the base. Save the adapter "
                "(SaveAdapterCallback) and merge it in one process (lightning-peft merge, or load_adapter and "
                "export_merged)."
            )
        self._path = output_directory(trainer, self.dirpath, "merged", self.overwrite, "merged model")
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Every rank creates the group here, together, as new_group requires.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(hours=self.wait_hours))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None) if self.save_tokenizer else None
            export_merged(pl_module, self._path, self.dtype, tokenizer)
            size = sum(f.stat().st_size for f in self._path.glob("*.safetensors"))
            rank_zero_info(f"Merged model written to {self._path} ({size / 2**20:.1f} MiB).")
        if self._group is not None:
            dist.barrier(group=self._group)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
