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
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.errors import ConfigError, MergeError
from lightning_peft.methods.base import (
    AdapterConfig,
    AdapterLayer,
    WrappingLayer,
    adapter_dtype,
    check_module_patterns,
    output_head_paths,
    select_targets,
)
from lightning_peft.quantization import compute_dtype, dense_linear, dequantize, is_quantized

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
        targets = self.target_modules
        if targets is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_TARGETS:
                raise ConfigError(
                    f"LoraConfig has no target_modules and there is no default for model_type={model_type!r}; "
                    f"set target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')."
                )
            targets = DEFAULT_TARGETS[model_type]
        skip = set()
        if targets == "all-linear":
            targets, skip = r".*", output_head_paths(model)
        selected = select_targets(model, targets, self.exclude_modules, _adaptable, skip)
        if self.use_dora:
            from lightning_peft.methods.dora import DoraLayer  # dora.py builds on this module

            return {path: DoraLayer(module, self) for path, module in selected.items()}
        return {path: LoraLayer(module, self) for path, module in selected.items()}

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


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


class LoraLayer(WrappingLayer):
    """LoRA around one linear layer (``nn.Linear``, GPT-2's ``Conv1D``, or a quantized linear).

    Owns ``lora_A`` (r × in) and ``lora_B`` (out × r) as plain parameters, so a pass that swaps linear layers
    never mistakes them for model layers. The base layer is kept as ``base_layer`` and called unchanged.
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    disk_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer)
        self.config = config
        weight = base_layer.weight
        dtype = adapter_dtype(config, weight)
        self.r = config.r
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=dtype, device=weight.device))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        self.merged = False
        if weight.device.type != "meta":
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
        dtype = compute_dtype(self.base_layer) or x.dtype  # float32 parameters, compute in the activations' dtype
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

    def dense_weight(self) -> torch.Tensor:
        """The base weight as an (out, in) tensor in its own dtype (a quantized one dequantized)."""
        if is_quantized(self.base_layer):
            return dequantize(self.base_layer)
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._check_dense("merge")
        weight = self.base_layer.weight
        delta = self.delta_weight()
        weight.add_((delta.t() if self.transposed else delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        delta = self.delta_weight()
        weight.sub_((delta.t() if self.transposed else delta).to(weight.dtype))
        self.merged = False

    def unload(self) -> nn.Module:
        self.unmerge()
        return self.base_layer

    def merged_module(self) -> nn.Module:
        if is_quantized(self.base_layer):  # a plain layer in the compute dtype: rounding back would lose the update
            state = self.merged_state_dict()
            return dense_linear(state["weight"], state.get("bias"))
        self.merge()
        return self.base_layer

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        weight = self.dense_weight()
        merged = weight if self.merged else (weight.float() + self.delta_weight()).to(weight.dtype)
        out = {"weight": merged.t() if self.transposed else merged}
        if self.base_layer.bias is not None:
            out["bias"] = self.base_layer.bias.detach()
        return out

    def _check_dense(self, verb: str) -> None:
        if not self.base_layer.weight.is_floating_point():
            raise MergeError(
                f"Cannot {verb} LoRA in place into a quantized {type(self.base_layer).__name__}: rounding back to "
                f"low precision loses the update. Use merge_adapter(model, dtype=...) or MergeCallback, which "
                f"export dequantized weights."
            )

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
