"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, the smallest adapter of all.

::

    attention keys / values:  y = l ⊙ (W x + b)        l: (out,)  scales the output
    feed-forward (down) layer: y = W (l ⊙ x) + b        l: (in,)   scales the input

A vector per targeted layer, initialised to ones (the model starts unchanged). On a Llama projection of
4096×4096 that is 4096 numbers against LoRA r=16's 131k. Merging multiplies the weight (and for an output vector
the bias) by ``l``, so the merged model costs nothing at inference. Files are HF PEFT's: ``ia3_l`` of shape
(out, 1) for output vectors and (1, in) for feed-forward ones.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from lightning_peft.errors import ConfigError, MergeError
from lightning_peft.methods.base import AdapterConfig, WrappingLayer
from lightning_peft.targets import family_default, find_targets, match_module_name
from lightning_peft.validation import check_module_patterns

# HF PEFT's defaults for the families we test: keys, values and the feed-forward down projection.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
}


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """(IA)³ hyper-parameters, named as in HF PEFT.

    Example::

        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    """Module names or path suffixes, a full-match regex, or ``"all-linear"``. ``None``: HF PEFT's default for the
    family (keys, values and the feed-forward down projection)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, with the same matching rules."""
    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is scaled (the paper's feed-forward rule); the others scale their output. Must be a
    subset of ``target_modules`` when both are lists. ``None``: HF PEFT's default for the family."""
    init_ia3_weights: bool = True
    """``True``: vectors of ones (no-op start). ``False``: random around one (tests only)."""
    fan_in_fan_out: bool = False
    """Written ``True`` for layers that store weights as (in, out) (GPT-2's ``Conv1D``), as HF PEFT needs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("target_modules", "exclude_modules", "feedforward_modules"):
            check_module_patterns(field, getattr(self, field))
            if isinstance(getattr(self, field), (tuple, set)):
                setattr(self, field, sorted(getattr(self, field)))
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}.")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            # A feed-forward entry must end some target (HF PEFT saves "all-linear" as full paths, ``wo`` as is).
            extra = sorted(f for f in self.feedforward_modules if not any(t.endswith(f) for t in self.target_modules))
            if extra:
                raise ConfigError(f"feedforward_modules {extra} end no entry of target_modules "
                                  f"{self.target_modules}; a feed-forward module must also be a target.")

    def build_layers(self, model: nn.Module) -> dict[str, IA3Layer]:
        feedforward = self.feedforward_modules
        if feedforward is None:
            feedforward = family_default(model, DEFAULT_FEEDFORWARD, "IA3Config needs target_modules and "
                                         "feedforward_modules, e.g. target_modules=['k_proj', 'v_proj', 'down_proj'], "
                                         "feedforward_modules=['down_proj'].")
        selected = find_targets(model, self.target_modules, self.exclude_modules, DEFAULT_TARGETS, "IA3Config",
                                modules_to_save=self.modules_to_save)
        return {path: IA3Layer(module, self, _is_feedforward(path, feedforward)) for path, module in selected.items()}


def _is_feedforward(path: str, feedforward: list[str] | str) -> bool:
    """HF PEFT's rule: a regex must match the whole path; a list entry matches a suffix of the path string."""
    if isinstance(feedforward, str):
        return match_module_name(path, feedforward)
    return any(path.endswith(key) for key in feedforward)


class IA3Layer(WrappingLayer):
    """A scaling vector on the input (feed-forward) or output (others) of one linear layer (dense, ``Conv1D``
    or 4-bit). The base layer is kept as ``base_layer`` and called unchanged."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("ia3_l",)
    disk_names: ClassVar[dict[str, str]] = {"ia3_l": "ia3_l"}
    method_name: ClassVar[str] = "IA3"

    def __init__(self, base_layer: nn.Module, config: IA3Config, is_feedforward: bool) -> None:
        super().__init__(base_layer, config)
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **self.factory))
        if config.init_ia3_weights is False and self.materialized:
            with torch.no_grad():
                self.ia3_l.add_(torch.randn_like(self.ia3_l) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            dtype = self.compute_dtype(x)
            return self.base_layer((x.to(dtype) * scale.to(dtype)).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale.to(result.dtype)).to(result.dtype)

    # l is (1, in) or (out, 1): broadcasting against the (out, in) weight scales its columns or its rows.
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.ia3_l.float()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not torch.all(self.ia3_l != 0):
            raise MergeError("Cannot unmerge IA3: a scaling entry is zero, so the original weight is lost.")
        return weight / self.ia3_l.float()

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.is_feedforward else bias * self.ia3_l.float().flatten()

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.is_feedforward else bias / self.ia3_l.float().flatten()

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, merged={self.merged}"
