"""Fill a model created on the meta device from pretrained weights, one tensor at a time: a ``save_pretrained``
directory's safetensors files, or a GGUF file (``PretrainedSource``).

Each tensor is read from disk with plain file reads (no memory map, so pages already consumed do not stay
resident), converted and placed: a weight of a quantized layer is quantized on arrival (``load_weight``), any
other tensor takes the dtype the meta model declared. A GGUF tensor is dequantized on its own and laid out by
transformers' own GGUF tensor processors and name map (llama's q/k rows un-permuted as its loader does), then
placed the same way. At no point does the full-precision model exist in memory: the peak is the quantized model
plus the largest single tensor. The many short-lived buffers (each tensor, bitsandbytes' quantization
temporaries) would leave the C heap fragmented, the freed memory still counted as resident (measured: +60% over
the quantized model); on glibc the free pages are handed back to the system after each tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``malloc_trim``, ``mallopt``); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = 2**20) -> None:
    """Have glibc serve every allocation of ``threshold`` bytes or more from its own memory map, unmapped when
    freed, for the rest of the process.

    By default glibc raises that threshold (up to 32 MiB) each time such a buffer is freed, and from then on
    serves large buffers from the heap. A training step on a 4-bit base allocates and frees a dequantized weight
    per layer, forward and backward, between the activations it keeps; in the heap they leave it fragmented, the
    freed memory still resident: measured +100 to +450 MiB over the step's needs for a 0.5B model on a CPU,
    varying from run to run. The cost is page faults on each large allocation: 20-30% of a step of the default
    job's full-precision LoRA on a CPU. A process-wide choice, so the ``lightning-peft`` command makes it, when its
    strategy quantizes the base, not the library (the same as ``MALLOC_MMAP_THRESHOLD_=1048576``).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where the weights of a model created on the meta device are: the safetensors files of a ``save_pretrained``
    directory ``path``, or the GGUF file ``gguf_file`` in it (a path of its own is taken as is, as by
    ``from_pretrained``).

    A LightningModule that records one as its ``pretrained_source`` attribute has ``PeftStrategy`` stream its
    meta model from there, with ``from_pretrained``'s treatment of tensors the checkpoint lacks (a new
    classification head gets the model's own initialization). The built-in modules do.
    """

    path: str
    gguf_file: str | None = None

    def tensors(self, model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor of the checkpoint, each read on its own (GGUF ones named as in
        ``model``)."""
        if self.gguf_file is None:
            for file in checkpoint_files(self.path):
                yield from read_tensors(file)
            return
        file = Path(self.gguf_file) if Path(self.gguf_file).is_file() else Path(self.path) / self.gguf_file
        if not file.is_file():
            raise ConfigError(f"GGUF file {self.gguf_file!r} is neither a file nor in {self.path}.")
        yield from read_gguf_tensors(file, model)


def read_gguf_tensors(path: Path, model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name in model, float32 tensor)`` for each tensor of a GGUF file that ``model`` holds, dequantized
    one at a time and laid out as transformers' GGUF loader lays it out: the same reader, dequantization, tensor
    processor (for llama: q and k rows back in Hugging Face order) and name map.

    A tensor the processor assembles from several (stacked MoE experts) comes at the end, once all are read.
    """
    from gguf import GGUFReader, dequantize
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    if is_gguf_arch_supported(architecture):
        raise ConfigError(
            f"{path.name}: transformers loads GGUF {architecture!r} models through its block-level GGUF loader, "
            f"which streaming does not follow. Load it in full (a strategy without quantization) or convert it to "
            f"safetensors (save_pretrained)."
        )
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=load_gguf_checkpoint(path)["config"])
    names = get_gguf_hf_weights_map(model, processor)
    assembled: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    with open(path, "rb") as f:
        for tensor in reader.tensors:
            f.seek(tensor.data_offset)  # the reader's own arrays are memory-mapped views of the file
            raw = np.fromfile(f, dtype=tensor.data.dtype, count=tensor.data.size).reshape(tensor.data.shape)
            result = processor.process(weights=dequantize(raw, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=assembled)
            if result.name in names:
                yield names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))
    yield from assembled["tensors"].items()


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
def stream_load(model: PreTrainedModel, source: str | os.PathLike | PretrainedSource, device: torch.device | str,
                initialize_missing: bool = False) -> list[str]:
    """Load every tensor of ``source`` (a pretrained directory, or a ``PretrainedSource``) into the meta tensors of
    ``model`` (quantized layers already in place), on ``device``; tied weights are re-tied and non-persistent
    buffers (rotary frequencies) recomputed, as ``from_pretrained`` does.

    A quantized layer's weight is rounded to the model's dtype before it is quantized, so the result is what
    quantizing ``from_pretrained(path, dtype=model.dtype)`` gives. Parameters the checkpoint lacks raise
    ``ConfigError`` naming them; with ``initialize_missing`` they get the model's own initialization instead, as
    ``from_pretrained`` gives a new head. Returns their names.
    """
    if not isinstance(source, PretrainedSource):
        source = PretrainedSource(str(source))
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    dtype = model.dtype
    for key, tensor in source.tensors(model):
        name = _model_key(model, key, names)
        if name is None:
            continue  # e.g. rotary buffers older checkpoints saved; transformers ignores them too
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        if is_quantized(owner) and attr == "weight":
            load_weight(owner, tensor.to(dtype), device)
            owner.weight._is_hf_initialized = True
            del tensor
            release_free_memory()
            continue
        current = getattr(owner, attr)
        value = tensor.to(device=device, dtype=current.dtype if current.is_floating_point() else tensor.dtype)
        if isinstance(current, nn.Parameter):
            value = nn.Parameter(value, requires_grad=current.requires_grad)
        setattr(owner, attr, value)
        value._is_hf_initialized = True  # transformers' init functions skip tensors flagged as loaded
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing and not initialize_missing:
        raise ConfigError(
            f"{source.path} does not hold {len(missing)} tensors of {type(model).__name__}: {missing[:5]}. Create "
            f"the model from this checkpoint's own config (AutoConfig.from_pretrained(path)), or build the missing "
            f"modules outside the meta-device context."
        )
    _initialize_meta_tensors(model, device)
    return missing


def _initialize_meta_tensors(model: PreTrainedModel, device: torch.device | str) -> None:
    """Give the tensors still on the meta device (non-persistent buffers such as rotary frequencies, parameters
    the checkpoint lacks) their values as ``from_pretrained`` does: allocate them, then run the model's own
    initializer on their modules, in its order (children first). Loaded tensors are flagged, so it skips them."""
    owners = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            value = torch.empty_like(tensor, device=device)  # a buffer keeps its registration (persistent or not)
            if isinstance(tensor, nn.Parameter):
                value = nn.Parameter(value, requires_grad=tensor.requires_grad)
            setattr(owner, attr, value)
            owners.add(owner)
    for module in _children_first(model):
        if module in owners:
            model._init_weights(module)


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _children_first(child)
    yield module
