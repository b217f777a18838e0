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

from lightning_peft.methods.lora import LoraConfig, LoraLayer, lora_variant


@lora_variant("use_dora")
class DoraLayer(LoraLayer):
    """LoRA plus a trainable magnitude vector around one linear layer (dense, ``Conv1D`` or 4-bit)."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = (*LoraLayer.adapter_parameter_names, "lora_magnitude_vector")
    disk_names: ClassVar[dict[str, str]] = {**LoraLayer.disk_names, "lora_magnitude_vector": "lora_magnitude_vector"}
    method_name: ClassVar[str] = "DoRA"

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, dtype=self.lora_A.dtype, device=self.lora_A.device))
        self._merge_factor: torch.Tensor | None = None  # f used by the last merge, so unmerge can invert it
        if self.materialized:
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
        dtype = self.compute_dtype(x)
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

    def _factor(self, weight: torch.Tensor) -> torch.Tensor:
        """``f = m / ‖W + s·BA‖_row`` (out,) from the unmerged (out, in) float32 weight."""
        return self.lora_magnitude_vector.float() / self._row_norm(weight, self.delta_weight())

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``f ⊙ (W + s·BA)``."""
        return self._factor(weight)[:, None] * (weight + self.delta_weight())

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / self._merge_factor[:, None] - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:  # f depends on W, so the factor of this merge is kept for unmerge
            self._merge_factor = self._factor(self.dense_weight().float())
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._merge_factor = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"
