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
import re
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer, WrappingLayer
from lightning_peft.methods.lora_parameters import ParameterLoraLayer, find_parameters, moe_all_linear
from lightning_peft.targets import find_targets, model_type
from lightning_peft.validation import check_module_patterns

# What HF PEFT targets when target_modules is not given, for the families we test.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "mixtral": ["q_proj", "v_proj"],
}


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters, named as in HF PEFT so existing ``adapter_config.json`` files and habits carry over.

    Example::

        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    """

    peft_type: ClassVar[str] = "LORA"
    own_fields: ClassVar[tuple[str, ...]] = (*AdapterConfig.own_fields, "loraplus_lr_ratio")
    adapts_parameters: ClassVar[bool] = True
    """Whether the method honours ``target_parameters`` (and so adapts fused MoE experts under ``"all-linear"``)."""

    r: int = 8
    """Rank of the update; the adapter has ``r * (in + out)`` parameters per targeted layer."""
    lora_alpha: float = 8
    """Numerator of the scaling; keep ``lora_alpha / r`` fixed when changing ``r`` to keep the learning rate."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """Ranks other than ``r`` by target: a key is a regex matched against the end of a module path (or of a
    parameter's name for ``target_parameters``), as HF PEFT matches it: ``{"q_proj": 16, "layers.0.mlp.down_proj": 4}``.
    The first key (in order) that matches wins."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """``lora_alpha`` other than the default by target, matched like ``rank_pattern``."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input only; 0 costs nothing."""
    target_modules: list[str] | str | None = None
    """Module names or path suffixes, a full-match regex, or ``"all-linear"`` (every linear layer but the output
    head). ``None`` uses HF PEFT's default for the model family (e.g. ``q_proj``, ``v_proj`` for Llama)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, with the same matching rules as ``target_modules``."""
    target_parameters: list[str] | None = None
    """Parameters adapted directly, by full name or its last components (``["experts.gate_up_proj",
    "experts.down_proj"]``): the fused 3-D expert weights of MoE models (one low-rank update per expert) or any 2-D
    weight no linear layer owns (``"gate.weight"``, a router). ``target_modules=[]`` adapts these only; ``None``
    takes the family default besides, as in HF PEFT. ``"all-linear"`` on an MoE family whose experts are fused
    (Mixtral, Qwen3-MoE, OLMoE...) fills this in itself. No ``lora_dropout`` or ``use_dora`` on these."""
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
        check_parameter_fields(self)

    def fill_from_model(self, model: PreTrainedModel) -> LoraConfig:
        """``"all-linear"`` on an MoE family with fused experts becomes HF PEFT's explicit targets for it (the files
        then record what was adapted, as PEFT's do)."""
        if self.target_modules != "all-linear" or not self.adapts_parameters:
            return self
        fields = moe_all_linear(model, self.r, self.lora_alpha)
        if fields is None:
            return self
        if self.lora_dropout or self.use_dora:
            raise ConfigError(
                f"target_modules='all-linear' on {type(model).__name__} adapts its fused experts as parameters, "
                f"which take no {'use_dora' if self.use_dora else 'lora_dropout'}: set "
                f"{'use_dora=False' if self.use_dora else 'lora_dropout=0'}, or list target_modules (e.g. "
                f"{fields['target_modules']}) to adapt the linear layers only.")
        return dataclasses.replace(
            self, target_modules=fields["target_modules"],
            target_parameters=sorted({*(self.target_parameters or []), *fields["target_parameters"]}),
            rank_pattern={**self.rank_pattern, **fields["rank_pattern"]},
            alpha_pattern={**self.alpha_pattern, **fields["alpha_pattern"]})

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """The rank and alpha of the target at ``key`` (a module path or a parameter's name): the first matching
        ``rank_pattern`` / ``alpha_pattern`` key, else ``r`` / ``lora_alpha``."""
        return _pattern_value(self.rank_pattern, key, self.r), _pattern_value(self.alpha_pattern, key, self.lora_alpha)

    def build_layers(self, model: nn.Module) -> dict[str, AdapterLayer]:
        layer = next((cls for flag, cls in LAYER_VARIANTS.items() if getattr(self, flag)), LoraLayer)
        return self.build_lora_layers(model, layer)

    def build_lora_layers(self, model: nn.Module, layer: type[LoraLayer]) -> dict[str, AdapterLayer]:
        """``layer`` around every targeted linear layer (with its rank and alpha from the patterns), and a
        ``ParameterLoraLayer`` around every module owning a targeted parameter."""
        only_parameters = self.target_parameters and (
            self.target_modules == [] or (self.target_modules is None and model_type(model) not in DEFAULT_TARGETS))
        selected = {} if only_parameters else find_targets(
            model, self.target_modules, self.exclude_modules, DEFAULT_TARGETS, type(self).__name__)
        layers: dict[str, AdapterLayer] = {p: layer(module, self._for_path(p)) for p, module in selected.items()}
        if self.target_parameters:
            for path, names in find_parameters(model, self.target_parameters, selected).items():
                ranks = {name: self.rank_and_alpha(f"{path}.{name}") for name in names}
                layers[path] = ParameterLoraLayer(model.get_submodule(path), ranks, self, self.use_rslora)
        return layers

    def _for_path(self, path: str) -> LoraConfig:
        """This config with the rank and alpha of the target at ``path`` (what its layer is built from)."""
        r, alpha = self.rank_and_alpha(path)
        return self if (r, alpha) == (self.r, self.lora_alpha) else dataclasses.replace(self, r=r, lora_alpha=alpha)

    def lr_ratios(self, model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        if self.loraplus_lr_ratio is None:
            return []
        ratio = float(self.loraplus_lr_ratio)
        return [(m.lora_B, ratio) for m in model.modules() if isinstance(m, LoraLayer)] + [
            (b, ratio) for m in model.modules() if isinstance(m, ParameterLoraLayer) for b in m.lora_B.values()]

    def trainable_base_parameters(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> list[str]:
        if self.bias == "all":
            return [name for name, _ in model.named_parameters() if name.rpartition(".")[2] == "bias"]
        if self.bias == "lora_only":
            return [f"{path}.base_layer.bias" for path, layer in layers.items()
                    if isinstance(layer, LoraLayer) and layer.base_layer.bias is not None]
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


def _pattern_value(patterns: dict[str, float], key: str, default: float) -> float:
    """HF PEFT's rule: the value of the first pattern that matches the end of ``key`` at a ``.`` boundary."""
    return next((value for pattern, value in patterns.items() if re.match(rf"(.*\.)?({pattern})$", key)), default)


def check_parameter_fields(config: LoraConfig) -> None:
    """Refuse bad ``rank_pattern``, ``alpha_pattern`` or ``target_parameters`` values, naming the field."""
    for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        for pattern, value in getattr(config, field).items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{field} key {pattern!r} is not a valid regular expression: {err}.") from None
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
                raise ConfigError(f"{field}[{pattern!r}] must be a positive {kind.__name__}, got {value!r}.")
    targets = config.target_parameters
    if targets is None:
        return
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"target_parameters must be a list of parameter names, got {targets!r}.")
    config.target_parameters = sorted(targets) if isinstance(targets, (set, tuple)) else list(targets)
    if config.lora_dropout or config.use_dora or not config.adapts_parameters:
        what = ("lora_dropout (the update is folded into the weight, so it never sees a dropped input)"
                if config.lora_dropout else "use_dora" if config.use_dora else type(config).__name__)
        raise ConfigError(f"target_parameters cannot be combined with {what}; adapt these parameters with plain "
                          f"LoraConfig(lora_dropout=0) or leave target_parameters unset.")
