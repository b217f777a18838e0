"""LoRA (Hu et al. 2021): a frozen weight ``W`` plus a trainable low-rank update.

::

    x ──► base_layer (W, frozen) ─────────────────────┐
    │                                                  ▼
    └──► dropout ──► A (r × in) ──► B (out × r) ──► × scaling ──► + ──► y

    y = W x + scaling · B (A x),   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

For a 4096×4096 projection with r=16, A and B hold 2·16·4096 = 131k numbers against W's 16.8M (0.8%).
``B`` starts at zero, so the adapted model starts identical to the base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer, WrappingLayer
from lightning_peft.targets import find_targets
from lightning_peft.validation import check_module_patterns

# What HF PEFT targets when target_modules is not given, for the families we test.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters, named as in HF PEFT so existing ``adapter_config.json`` files and habits carry over.

    Example::

        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    """

    peft_type: ClassVar[str] = "LORA"
    own_fields: ClassVar[tuple[str, ...]] = (*AdapterConfig.own_fields, "loraplus_lr_ratio")

    r: int = 8
    """Rank of the update; the adapter has ``r * (in + out)`` parameters per targeted layer."""
    lora_alpha: float = 8
    """Numerator of the scaling; keep ``lora_alpha / r`` fixed when changing ``r`` to keep the learning rate."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input only; 0 costs nothing."""
    target_modules: list[str] | str | None = None
    """Module names or path suffixes, a full-match regex, or ``"all-linear"`` (every linear layer but the output
    head). ``None`` uses HF PEFT's default for the model family (e.g. ``q_proj``, ``v_proj`` for Llama)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, with the same matching rules as ``target_modules``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train and are saved with the adapter: none, every bias, or those of the adapted layers."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """``True``: Kaiming-uniform A, zero B (no-op start). ``"gaussian"``: normal A with std 1/r, zero B.
    ``False``: random B too, so the adapter changes outputs from the start (useful only for tests)."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``lora_alpha / sqrt(r)``, which keeps high ranks learning (Kalajdzievski 2023)."""
    use_dora: bool = False
    """DoRA (``methods/dora.py``): a trainable magnitude per output row, LoRA on the direction; mergeable."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): the B matrices train at ``loraplus_lr_ratio`` times the learning rate of A
    (e.g. 16), in their own optimizer param groups, whatever optimizer is configured. HF PEFT's LoraConfig has
    no such field: saved in the safetensors metadata, not ``adapter_config.json``."""
    fan_in_fan_out: bool = False
    """Whether the targets store weights as (in, out). Read from the layer type (GPT-2's ``Conv1D`` does), and
    written for HF PEFT, which needs it set for such layers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}.")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {self.use_dora!r}.")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
            raise ConfigError(f"loraplus_lr_ratio must be a positive number (e.g. 16) or None, got {ratio!r}.")
        check_module_patterns("target_modules", self.target_modules)
        check_module_patterns("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def build_layers(self, model: nn.Module) -> dict[str, LoraLayer]:
        layer = next((cls for flag, cls in LAYER_VARIANTS.items() if getattr(self, flag)), LoraLayer)
        selected = find_targets(model, self.target_modules, self.exclude_modules, DEFAULT_TARGETS, type(self).__name__)
        return {path: layer(module, self) for path, module in selected.items()}

    def lr_ratios(self, model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        if self.loraplus_lr_ratio is None:
            return []
        return [(m.lora_B, float(self.loraplus_lr_ratio)) for m in model.modules() if isinstance(m, LoraLayer)]

    def trainable_base_parameters(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> list[str]:
        if self.bias == "all":
            return [name for name, _ in model.named_parameters() if name.rpartition(".")[2] == "bias"]
        if self.bias == "lora_only":
            return [f"{path}.base_layer.bias" for path, layer in layers.items() if layer.base_layer.bias is not None]
        return []


class LoraLayer(WrappingLayer):
    """LoRA around one linear layer (``nn.Linear``, GPT-2's ``Conv1D``, or a quantized linear).

    Owns ``lora_A`` (r × in) and ``lora_B`` (out × r) as plain parameters, so a pass that swaps linear layers
    never mistakes them for model layers. The base layer is kept as ``base_layer`` and called unchanged.
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    disk_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    method_name: ClassVar[str] = "LoRA"

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        self.r = config.r
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        if self.materialized:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.config.init_lora_weights
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        dtype = self.compute_dtype(x)  # float32 parameters, compute in the activations' dtype
        down = F.linear(h.to(dtype), self.lora_A.to(dtype))  # (..., r): the cheap side of the product
        if result.dtype != down.dtype:
            return result + F.linear(down * self.scaling, self.lora_B.to(dtype)).to(result.dtype)
        # One GEMM adds scaling · down @ B^T onto the base output: no full-size temporaries.
        flat = torch.addmm(result.reshape(-1, self.out_features), down.reshape(-1, self.r), self.lora_B.to(dtype).t(),
                           alpha=self.scaling)
        return flat.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` as an (out, in) fp32 tensor."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


LAYER_VARIANTS: dict[str, type[LoraLayer]] = {}
"""LoRA variants chosen by a ``LoraConfig`` flag, by flag name (``use_dora``): each variant's module adds itself
with ``lora_variant``, so this module needs none of them."""


def lora_variant(flag: str) -> Callable[[type[LoraLayer]], type[LoraLayer]]:
    """Class decorator: ``LoraConfig`` builds the decorated layer when its field ``flag`` is set."""
    def register(cls: type[LoraLayer]) -> type[LoraLayer]:
        LAYER_VARIANTS[flag] = cls
        return cls
    return register
