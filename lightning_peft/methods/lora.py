"""LoRA (Hu et al. 2021): a frozen weight ``W`` plus a trainable low-rank update.

::

    x ──► base_layer (W, frozen) ─────────────────────┐
    │                                                  ▼
    └──► dropout ──► A (r × in) ──► B (out × r) ──► × scaling ──► + ──► y

    y = W x + scaling · B (A x),   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

    with lora_bias:     y = W x + scaling · (B (A x) + b_B)
    PiSSA / OLoRA:      y = W x + scaling · (B (A x) - B0 (A0 x)),   A0, B0 = A, B as initialised

For a 4096×4096 projection with r=16, A and B hold 2·16·4096 = 131k numbers against W's 16.8M (0.8%).
``B`` starts at zero, so the adapted model starts identical to the base.

PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) start A and B from a decomposition of ``W`` (its top-r
singular vectors; its QR factors) and train them around ``W - scaling · B0 A0``. HF PEFT subtracts that product
from the base weight in place; here the base stays untouched and the adapter subtracts it (two more rank-r
products), so removing the adapter restores the base exactly and a quantized layer is never rewritten. Files are
HF PEFT's: they hold A and B and say ``init_lora_weights="pissa"``, and every loader (PEFT and this package)
derives A0 and B0 again from the base, deterministically. A serving stack that reads plain LoRA files needs the
merged model (``lightning-peft merge``).
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

from lightning_peft.errors import ConfigError, MergeError, TargetModulesError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer, WrappingLayer
from lightning_peft.methods.lora_parameters import ParameterLoraLayer, find_parameters, moe_all_linear
from lightning_peft.methods.lora_tokens import token_layers
from lightning_peft.methods.peft_fields import value_row
from lightning_peft.quantization import is_quantized
from lightning_peft.targets import find_targets, layer_index, model_type
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
INITS = (True, False, "gaussian", "pissa", "olora")
DECOMPOSED = ("pissa", "olora")
"""Initialisations that derive A and B from the base weight."""


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
    layers_to_transform: list[int] | int | None = None
    """Adapt only the targets in the layers with these indices (HF PEFT's rule: the first number in the module
    path after a module-list name); needs a list ``target_modules``. An entry naming a module's full path keeps it
    whatever its layer."""
    layers_pattern: list[str] | str | None = None
    """The name(s) of the module list whose index ``layers_to_transform`` reads (``"layers"``, ``"h"``); by
    default the first numbered path component."""
    target_parameters: list[str] | None = None
    """Parameters adapted directly, by full name or its last components (``["experts.gate_up_proj",
    "experts.down_proj"]``): the fused 3-D expert weights of MoE models (one low-rank update per expert) or any 2-D
    weight no linear layer owns (``"gate.weight"``, a router). ``target_modules=[]`` adapts these only; ``None``
    takes the family default besides, as in HF PEFT. ``"all-linear"`` on an MoE family whose experts are fused
    (Mixtral, Qwen3-MoE, OLMoE...) fills this in itself. No ``lora_dropout`` or ``use_dora`` on these."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train and are saved with the adapter: none, every bias, or those of the adapted layers."""
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = True
    """``True``: Kaiming-uniform A, zero B (no-op start). ``"gaussian"``: normal A with std 1/r, zero B.
    ``False``: random B too, so the adapter changes outputs from the start (useful only for tests). ``"pissa"``:
    A and B from the top-r singular vectors of W; ``"olora"``: from its QR factors. Both start as the base, need
    a full-precision base and load in HF PEFT. Other HF PEFT values are refused by name."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``lora_alpha / sqrt(r)``, which keeps high ranks learning (Kalajdzievski 2023)."""
    use_dora: bool = False
    """DoRA (``methods/dora.py``): a trainable magnitude per output row, LoRA on the direction; mergeable."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose rows of the input embedding train too (new tokens' embeddings), e.g. ``[32000, 32001]``; a
    dict names the embedding module: ``{"embed_tokens": [...]}``. A tied output head uses the trained rows too.
    Saved as HF PEFT saves them (``methods/lora_tokens.py``)."""
    lora_bias: bool = False
    """A trained bias on B, scaled like the update (HF PEFT's, for adapters extracted from full fine-tunes); it
    merges into the base layer's bias, so merging needs targets that have one."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): the B matrices train at ``loraplus_lr_ratio`` times the learning rate of A
    (e.g. 16), in their own optimizer param groups, whatever optimizer is configured. HF PEFT's LoraConfig has
    no such field: saved in the safetensors metadata, not ``adapter_config.json``."""
    fan_in_fan_out: bool = False
    """Whether the targets store weights as (in, out). Read from the layer type (GPT-2's ``Conv1D`` does), and
    written for HF PEFT, which needs it set for such layers."""

    def __post_init__(self) -> None:
        row = value_row("init_lora_weights", self.init_lora_weights)
        if row is not None and row.status == "refused":
            raise ConfigError(row.note)
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.init_lora_weights not in INITS:
            raise ConfigError(f"init_lora_weights must be one of {INITS}, got {self.init_lora_weights!r}.")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {self.use_dora!r}.")
        if self.use_dora and (self.lora_bias or self.init_lora_weights in DECOMPOSED):
            raise ConfigError(f"use_dora=True is not implemented with lora_bias=True or init_lora_weights="
                              f"{self.init_lora_weights!r} (HF PEFT refuses DoRA with lora_bias too); drop one.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(f"lora_bias=True needs init_lora_weights True or False (as in HF PEFT), got "
                              f"{self.init_lora_weights!r}.")
        self._check_layers()
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
        """``layer_type()`` around every targeted linear layer (with its rank and alpha from the patterns), a
        ``ParameterLoraLayer`` around every module owning a targeted parameter, and the trainable-token layers."""
        layer = self.layer_type()
        only_parameters = self.target_parameters and (
            self.target_modules == [] or (self.target_modules is None and model_type(model) not in DEFAULT_TARGETS))
        selected = {} if only_parameters else self.select_targets(model)
        layers: dict[str, AdapterLayer] = {p: layer(module, self._for_path(p)) for p, module in selected.items()}
        if self.target_parameters:
            for path, names in find_parameters(model, self.target_parameters, selected).items():
                ranks = {name: self.rank_and_alpha(f"{path}.{name}") for name in names}
                layers[path] = ParameterLoraLayer(model.get_submodule(path), ranks, self, self.use_rslora)
        if self.trainable_token_indices is not None:
            layers.update(token_layers(model, self.trainable_token_indices, self, set(layers)))
        return layers

    def _for_path(self, path: str) -> LoraConfig:
        """This config with the rank and alpha of the target at ``path`` (what its layer is built from)."""
        r, alpha = self.rank_and_alpha(path)
        return self if (r, alpha) == (self.r, self.lora_alpha) else dataclasses.replace(self, r=r, lora_alpha=alpha)

    def _check_layers(self) -> None:
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError(f"layers_to_transform needs target_modules as a list of names (as in HF PEFT), got "
                              f"target_modules={self.target_modules!r}: name the modules, or write the layer "
                              f"indices into the regex.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set without layers_to_transform: give the layer indices too.")
        indices = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
        if any(i < 0 for i in indices or []):
            raise ConfigError(f"layers_to_transform must hold layer indices >= 0, got {self.layers_to_transform!r}.")
        check_module_patterns("layers_pattern", self.layers_pattern)
        for pattern in [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []:
            check_module_patterns("layers_pattern", pattern)

    @property
    def quantized_base_refusal(self) -> str | None:  # a property here: it depends on init_lora_weights
        if self.init_lora_weights in DECOMPOSED:
            return (f"init_lora_weights={self.init_lora_weights!r} decomposes the full-precision base weight (as HF "
                    f"PEFT, which refuses it on a quantized base too): train it on an unquantized base, or use "
                    f"init_lora_weights=True.")
        return None

    def layer_type(self) -> type[LoraLayer]:
        """The layer wrapped around each target: LoRA, or the variant a flag selects (``use_dora``)."""
        return next((cls for flag, cls in LAYER_VARIANTS.items() if getattr(self, flag)), LoraLayer)

    def select_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers this config adapts: ``find_targets``' rule, then HF PEFT's ``layers_to_transform``."""
        selected = find_targets(model, self.target_modules, self.exclude_modules, DEFAULT_TARGETS, type(self).__name__,
                                modules_to_save=self.modules_to_save)
        if self.init_lora_weights in DECOMPOSED:
            held = [p for p, m in selected.items() if is_quantized(m) or m.weight.device.type == "meta"]
            if held:
                raise ConfigError(f"{held[0]} is quantized or holds no weights yet. {self.quantized_base_refusal}")
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return selected
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        names = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS.get(model_type(model), [])
        kept = {p: m for p, m in selected.items() if p in names or layer_index(p, self.layers_pattern) in wanted}
        if not kept:
            found = sorted({i for p in selected if (i := layer_index(p, self.layers_pattern)) is not None})
            raise TargetModulesError(
                f"layers_to_transform={self.layers_to_transform!r} (layers_pattern={self.layers_pattern!r}) keeps none "
                f"of the {len(selected)} modules target_modules selects; their layer indices are {found}."
            )
        return kept

    def lr_ratios(self, model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        if self.loraplus_lr_ratio is None:
            return []
        ratio = float(self.loraplus_lr_ratio)
        return [(param, ratio) for m in model.modules() if isinstance(m, LoraLayer)
                for param in (m.lora_B, m.lora_B_bias) if param is not None] + [
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

    Owns ``lora_A`` (r × in), ``lora_B`` (out × r) and, with ``lora_bias``, ``lora_B_bias`` (out) as plain
    parameters, so a pass that swaps linear layers never mistakes them for model layers. The base layer is kept as
    ``base_layer`` and called unchanged. PiSSA and OLoRA keep the initial A and B as buffers ``init_A``, ``init_B``
    (not saved: every load derives them again from the base).
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_B_bias")
    disk_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                                            "lora_B_bias": "lora_B.bias"}
    method_name: ClassVar[str] = "LoRA"

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__(base_layer, config)
        self.r = config.r
        self.scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **self.factory))
        self.register_parameter("lora_B_bias", nn.Parameter(torch.zeros(self.out_features, **self.factory))
                                if config.lora_bias else None)
        decomposed = config.init_lora_weights in DECOMPOSED
        self.register_buffer("init_A", torch.empty_like(self.lora_A) if decomposed else None, persistent=False)
        self.register_buffer("init_B", torch.empty_like(self.lora_B) if decomposed else None, persistent=False)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None
        if self.materialized:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init = self.config.init_lora_weights
        if init in DECOMPOSED:
            self._decompose_base(init)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            nn.init.zeros_(self.lora_B)

    def _decompose_base(self, init: str) -> None:
        """A and B from W (out × in, float32) as HF PEFT computes them, so its loader derives the same A0, B0.

        PiSSA: W = V S Uᵀ; B = V_r √(S_r/s), A = √(S_r/s) U_rᵀ, so s·B A is W's best rank-r approximation.
        OLoRA: W = Q R; B = Q_r, A = R_r (first r columns / rows).
        """
        weight = self.dense_weight().float()
        if init == "pissa":
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.diag(torch.sqrt(s[: self.r] / self.scaling))
            lora_A, lora_B = root @ uh[: self.r], v[:, : self.r] @ root
        else:
            q, r = torch.linalg.qr(weight)
            lora_A, lora_B = r[: self.r], q[:, : self.r]
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        self.init_A.copy_(self.lora_A)
        self.init_B.copy_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        dtype = self.compute_dtype(x)  # float32 parameters, compute in the activations' dtype
        down = F.linear(h.to(dtype), self.lora_A.to(dtype))  # (..., r): the cheap side of the product
        up = self.lora_B.to(dtype)
        if self.init_A is not None:  # PiSSA/OLoRA: take out the base's share B0 A0 (of the undropped input, as in W)
            down = torch.cat([down, F.linear(x.to(dtype), self.init_A.to(dtype))], dim=-1)
            up = torch.cat([up, -self.init_B.to(dtype)], dim=1)
        bias = None if self.lora_B_bias is None else self.lora_B_bias.to(dtype)
        if result.dtype != down.dtype:
            return result + (F.linear(down, up, bias) * self.scaling).to(result.dtype)
        # One GEMM adds scaling · down @ B^T onto the base output: no full-size temporaries.
        flat = torch.addmm(result.reshape(-1, self.out_features), down.reshape(-1, down.shape[-1]), up.t(),
                           alpha=self.scaling)
        if bias is not None:
            flat = flat + self.scaling * bias
        return flat.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · (B A - B0 A0)`` as an (out, in) fp32 tensor (B0 A0 only for PiSSA/OLoRA)."""
        delta = self.lora_B.float() @ self.lora_A.float()
        if self.init_A is not None:
            delta = delta - self.init_B.float() @ self.init_A.float()
        return delta * self.scaling

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.lora_B_bias is not None and self.base_layer.bias is None:
            raise MergeError(f"Cannot merge LoRA with lora_bias=True into {type(self.base_layer).__name__} without a "
                             f"bias (as in HF PEFT): its bias has nowhere to go. Serve the model with the adapter.")
        return super().merged_weight(weight)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.lora_B_bias is None else bias + self.scaling * self.lora_B_bias.float()

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.lora_B_bias is None else bias - self.scaling * self.lora_B_bias.float()

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
