"""DoRA (Liu et al. 2024): the weight split into a magnitude per output row and a direction; LoRA moves the direction.

::

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          m: (out,) trainable, starts at ‖W + s·BA‖_row

    y = W' x + b = f ⊙ (W x + s·B A x) + b,      f = m / ‖W + s·BA‖_row   (one factor per output feature)

The row norm is treated as a constant in backward (detached), as the paper's section 4.3 and HF PEFT do: it saves
the memory of a second graph through ``W + s·BA`` and changes the gradient of ``m`` and ``BA`` only slightly.
Chosen with ``LoraConfig(use_dora=True)``; files are HF PEFT's (``lora_magnitude_vector`` of shape (out,)
next to ``lora_A`` and ``lora_B``). On a 4-bit base (QDoRA) ``W`` is dequantized for the norm in each forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.methods.lora import LoraConfig, LoraLayer
from lightning_peft.quantization import compute_dtype


class DoraLayer(LoraLayer):
    """LoRA plus a trainable magnitude vector around one linear layer (dense, ``Conv1D`` or 4-bit)."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = (*LoraLayer.adapter_parameter_names, "lora_magnitude_vector")
    disk_names: ClassVar[dict[str, str]] = {**LoraLayer.disk_names, "lora_magnitude_vector": "lora_magnitude_vector"}

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, dtype=self.lora_A.dtype, device=self.lora_A.device))
        self._merge_factor: torch.Tensor | None = None  # f used by the last merge, so unmerge can invert it
        if self.lora_A.device.type != "meta":
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ‖W + s·BA‖_row``: the layer starts exactly as plain LoRA with the same A and B."""
        self.lora_magnitude_vector.copy_(self._row_norm(self.dense_weight().float(), self.delta_weight()))

    @staticmethod
    def _row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        dtype = compute_dtype(self.base_layer) or x.dtype
        weight = self.dense_weight().to(dtype)  # (out, in); a 4-bit weight dequantized
        lora_A, lora_B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        with torch.no_grad():
            norm = self._row_norm(weight, (lora_B @ lora_A) * self.scaling)
        factor = self.lora_magnitude_vector.to(dtype) / norm  # (out,)
        if self.lora_dropout is not None and self.training:
            h = self.lora_dropout(x).to(dtype)
            base = F.linear(h, weight)  # the base path sees the same dropped input as the update
        else:
            h = x.to(dtype)
            bias = self.base_layer.bias
            base = result.to(dtype) - (bias.to(dtype) if bias is not None else 0)
        update = F.linear(F.linear(h, lora_A), lora_B) * self.scaling
        return result + ((factor - 1) * base + factor * update).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """``f ⊙ (W + s·BA)`` as an (out, in) fp32 tensor, from the unmerged base weight."""
        weight, delta = self.dense_weight().float(), self.delta_weight()
        factor = self.lora_magnitude_vector.float() / self._row_norm(weight, delta)
        return factor[:, None] * (weight + delta)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._check_dense("merge")
        weight, delta = self.dense_weight().float(), self.delta_weight()
        self._merge_factor = self.lora_magnitude_vector.float() / self._row_norm(weight, delta)
        self._write(self._merge_factor[:, None] * (weight + delta))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._write(self.dense_weight().float() / self._merge_factor[:, None] - self.delta_weight())
        self._merge_factor = None
        self.merged = False

    def _write(self, dense: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.copy_((dense.t() if self.transposed else dense).to(weight.dtype))

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        dtype = self.dense_weight().dtype
        merged = self.dense_weight() if self.merged else self.merged_weight().to(dtype)
        out = {"weight": merged.t() if self.transposed else merged}
        if self.base_layer.bias is not None:
            out["bias"] = self.base_layer.bias.detach()
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"
