"""Write a state dict that arrives one tensor at a time as safetensors files, without holding it in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype, shape and
byte range, then the tensors' bytes back to back. The header comes first, so the writer takes the plan (names,
dtypes, shapes, in order) before the tensors; each tensor is copied to the host, written and dropped. Files over
``max_shard_size`` bytes are split as transformers' ``save_pretrained`` does: ``model-00001-of-0000N.safetensors``
and a ``model.safetensors.index.json`` mapping every name to its file; one file is ``model.safetensors``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DEFAULT_SHARD_SIZE = 50 * 10**9  # transformers 5's save_pretrained default
Plan = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _shards(plan: Plan, max_shard_size: int) -> list[list[int]]:
    """Indices into ``plan`` per file, in order; a tensor larger than the limit gets a file of its own."""
    shards: list[list[int]] = [[]]
    size = 0
    for index, (_, dtype, shape) in enumerate(plan):
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards


def _header(plan: Plan, indices: list[int]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for index in indices:
        name, dtype, shape = plan[index]
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: safetensors has no dtype {dtype}.")
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does


def write_sharded(directory: str | Path, plan: Plan, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_size: int) -> list[Path]:
    """Write ``tensors`` (the names, dtypes and shapes of ``plan``, in its order) into ``directory``; returns the
    files written. A tensor that does not match the plan is refused before its file is complete."""
    directory = Path(directory)
    shards = _shards(plan, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    stream = iter(tensors)
    for name, indices in zip(names, shards):
        with open(directory / name, "wb") as f:
            header = _header(plan, indices)
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for index in indices:
                key, tensor = next(stream)
                expected = plan[index]
                if (key, tensor.dtype, tuple(tensor.shape)) != expected:
                    raise RuntimeError(f"tensor {key} {tensor.dtype} {tuple(tensor.shape)} does not match the "
                                       f"planned {expected}.")
                host = tensor.detach().to("cpu").contiguous()
                f.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                del host
    if next(stream, None) is not None:
        raise RuntimeError("more tensors than planned.")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(d, s) for _, d, s in plan)},
                 "weight_map": {plan[i][0]: name for name, indices in zip(names, shards) for i in indices}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]
