"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after the attention and/or feed-forward block.

::

    x ──► base_layer (output projection, frozen) ──► h ─────────────────────────────────┐
                                                      │                                  ▼
                                                      └─► down (d → d/rf) ─► σ ─► up (d/rf → d) ─► + ──► y

The adapter sits on the output projection of a sublayer (``o_proj`` / ``down_proj`` for Llama), before the
model's own residual and norm, which is where the paper puts it. With ``reduction_factor=16`` on a 4096-wide
model that is 2·4096·256 ≈ 2.1M numbers per adapter. ``up`` starts at zero, so the block starts as the identity.

The non-linearity is what gives the adapter its capacity beyond a low-rank update, and also why it cannot be
merged into the base weights: the model keeps the extra block at inference. HF PEFT has no such method, so the
files use our own ``peft_type`` ``BOTTLENECK`` (keys ``<path>.adapter_down.weight`` ...).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, WrappingLayer
from lightning_peft.targets import family_default, find_targets
from lightning_peft.validation import check_module_patterns

# The output projection of each sublayer, per family (names or a full-match regex): the adapter follows it.
PLACES: dict[str, dict[str, list[str] | str]] = {
    "llama": {"attention": ["self_attn.o_proj"], "feedforward": ["mlp.down_proj"]},
    "mistral": {"attention": ["self_attn.o_proj"], "feedforward": ["mlp.down_proj"]},
    "qwen2": {"attention": ["self_attn.o_proj"], "feedforward": ["mlp.down_proj"]},
    "gpt2": {"attention": ["attn.c_proj"], "feedforward": ["mlp.c_proj"]},
    "bert": {"attention": ["attention.output.dense"], "feedforward": r".*\.layer\.\d+\.output\.dense"},
    "distilbert": {"attention": ["attention.out_lin"], "feedforward": ["ffn.lin2"]},
}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclasses.dataclass
class BottleneckAdapterConfig(AdapterConfig):
    """Houlsby-style adapters; ``placement`` picks the sublayers, ``reduction_factor`` the width.

    Example::

        BottleneckAdapterConfig(reduction_factor=16, non_linearity="relu", placement="both")
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    known_to_hf_peft: ClassVar[bool] = False

    reduction_factor: int = 16
    """Bottleneck width is the hidden size divided by this (at least 1)."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation between the down and up projections."""
    placement: Literal["attention", "feedforward", "both"] = "both"
    """After the attention block, the feed-forward block, or both (the paper's choice)."""
    target_modules: list[str] | str | None = None
    """Output projections to follow, overriding ``placement`` (for families without a default): module names or
    path suffixes, or a full-match regex."""
    init_weights: bool = True
    """``True``: ``up`` at zero, the adapter starts as the identity. ``False``: random ``up`` (tests only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf <= 0:
            raise ConfigError(f"reduction_factor must be a positive integer, got {rf!r}.")
        if self.non_linearity not in _ACTIVATIONS:
            raise ConfigError(f"non_linearity={self.non_linearity!r} is not one of {sorted(_ACTIVATIONS)}.")
        if self.placement not in ("attention", "feedforward", "both"):
            raise ConfigError(f"placement must be 'attention', 'feedforward' or 'both', got {self.placement!r}.")
        check_module_patterns("target_modules", self.target_modules)
        if self.target_modules is not None and self.placement != "both":
            raise ConfigError("target_modules and placement both choose where adapters go; set only one.")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def build_layers(self, model: nn.Module) -> dict[str, BottleneckLayer]:
        selected: dict[str, nn.Module] = {}
        if self.target_modules is None:
            try:
                places = family_default(model, PLACES, "set target_modules to the attention and feed-forward "
                                                       "output projections.")
            except ConfigError as err:
                raise ConfigError(f"BottleneckAdapterConfig knows no sublayer outputs: {err}") from None
            kinds = ["attention", "feedforward"] if self.placement == "both" else [self.placement]
            for kind in kinds:
                selected.update(find_targets(model, places[kind], None, PLACES, type(self).__name__))
        else:
            selected = find_targets(model, self.target_modules, None, PLACES, type(self).__name__)
        return {path: BottleneckLayer(module, self) for path, module in sorted(selected.items())}


class BottleneckLayer(WrappingLayer):
    """A sublayer's output projection followed by ``h + up(σ(down(h)))``; the projection is kept as
    ``base_layer`` and called unchanged. ``down`` and ``up`` are plain linear layers with biases."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = (
        "adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    disk_names: ClassVar[dict[str, str]] = {}

    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = (
        "Cannot merge a bottleneck adapter: its non-linearity between the down and up projections is not a "
        "linear map, so no weight matrix equals it. Keep the adapter at inference (load_adapter), or train "
        "LoRA, DoRA or IA3 for a mergeable adapter."
    )

    def __init__(self, base_layer: nn.Module, config: BottleneckAdapterConfig) -> None:
        super().__init__(base_layer, config)
        hidden = self.out_features
        width = max(1, hidden // config.reduction_factor)
        self.adapter_down = nn.Linear(hidden, width, **self.factory)
        self.activation = _ACTIVATIONS[config.non_linearity]()
        self.adapter_up = nn.Linear(width, hidden, **self.factory)
        if self.materialized:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.adapter_down.weight, std=1e-2)  # small, so the block starts close to the identity
        nn.init.zeros_(self.adapter_down.bias)
        if self.config.init_weights:
            nn.init.zeros_(self.adapter_up.weight)
        else:
            nn.init.normal_(self.adapter_up.weight, std=1.0)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        dtype = self.compute_dtype(h)  # float32 parameters, compute in the activations' dtype
        down, up = self.adapter_down, self.adapter_up
        hidden = self.activation(F.linear(h.to(dtype), down.weight.to(dtype), down.bias.to(dtype)))
        return h + F.linear(hidden, up.weight.to(dtype), up.bias.to(dtype)).to(h.dtype)

    def extra_repr(self) -> str:
        return f"width={self.adapter_down.out_features}, non_linearity={self.config.non_linearity}"
