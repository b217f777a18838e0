"""LoRA-FA (Zhang et al. 2023): LoRA whose down projection A stays frozen at its random start; only B trains.

::

    x ──► base_layer (W, frozen) ────────────────────────────┐
    │                                                         ▼
    └──► dropout ──► A (r × in, frozen) ──► B (out × r) ──► × scaling ──► + ──► y

With A frozen, B's gradient needs only ``A x`` (r numbers per token), not the layer's input (``in`` numbers per
token) that LoRA keeps for A's gradient: the activation memory the paper sets out to save (not measured here), with
half of LoRA's trainable parameters when in = out. Merging is LoRA's (``W + scaling · B A``).

HF PEFT offers LoRA-FA as an optimizer over a LoRA model (``create_lorafa_optimizer``), not as a ``peft_type``,
so files here say ``peft_type: "LORA_FA"`` and HF PEFT does not load them. They hold A too, which the adapter
needs to be reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lightning_peft.errors import ConfigError
from lightning_peft.methods.lora import LoraConfig, LoraLayer


@dataclasses.dataclass
class LoraFaConfig(LoraConfig):
    """LoRA's fields; A is frozen. ``use_dora`` is refused (DoRA's magnitude depends on a trained A).

    Example::

        LoraFaConfig(r=16, lora_alpha=32, target_modules="all-linear")
    """

    peft_type: ClassVar[str] = "LORA_FA"
    known_to_hf_peft: ClassVar[bool] = False
    adapts_parameters: ClassVar[bool] = False  # target_parameters refused: only linear layers get a frozen A

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ConfigError("LoraFaConfig does not support use_dora=True; use LoraConfig(use_dora=True) for DoRA.")

    def layer_type(self) -> type[LoraFaLayer]:
        return LoraFaLayer


class LoraFaLayer(LoraLayer):
    """A LoRA layer whose ``lora_A`` is saved and loaded with the adapter but never trained."""

    frozen_parameter_names: ClassVar[tuple[str, ...]] = ("lora_A",)
    method_name: ClassVar[str] = "LoRA-FA"
