"""LoRA on parameters (HF PEFT's ``target_parameters``): a low-rank update to a weight no linear layer owns, above
all the fused expert tensors transformers 5 keeps for Mixtral-style MoE models.

::

    experts.gate_up_proj   (E, out, in)   one (out, in) matrix per expert; (E, in, out) where the module says
                                          ``is_transposed`` (GPT-OSS); a 2-D weight (out, in) is one expert
    lora_A                 (E·r, in)      rows e·r ... e·r+r-1 are expert e's A_e
    lora_B                 (out, r·E)     columns e, E+e, 2E+e, ... are expert e's B_e
    W_e' = W_e + scaling · B_e A_e

For Mixtral-8x7B's ``gate_up_proj`` (8, 28672, 4096) with r=16: A and B hold 16·8·(4096 + 28672) = 4.2M numbers
against the stack's 940M (0.4%). The layout is HF PEFT's, kept as is so files need no translation. The module that
owns the parameter runs unchanged with ``W + ΔW`` in its place (``torch.func.functional_call``), whatever expert
kernel it dispatches to; that costs one temporary the size of the stack per forward (HF PEFT's costs the same).

Every targeted parameter of one module is held by one ``ParameterLoraLayer``. HF PEFT nests one wrapper per
parameter instead, the first-registered parameter innermost: the disk keys follow that nesting
(``experts.base_layer.lora_A.weight`` for ``gate_up_proj``, ``experts.lora_A.weight`` for ``down_proj``).

``"all-linear"`` on the families whose expert ``Linear`` layers transformers 5 fused (Mixtral, Qwen3-MoE, OLMoE...)
adapts the experts and the router as HF PEFT's does: ``moe_all_linear`` below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_peft.errors import ConfigError, TargetModulesError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer, adapter_dtype
from lightning_peft.targets import is_linear, model_type, output_head_paths

try:  # transformers 5: the families whose per-expert Linear layers became fused parameters, by v4 naming style
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as _FUSED_FAMILIES
except ImportError:  # transformers 4 keeps one Linear per expert, which "all-linear" reaches as any other
    _FUSED_FAMILIES = {}

# The v4 Linear names of the experts and the router, per naming style, and the parameter each became. HF PEFT reads
# the same transformers table (adding Mixtral itself), so "all-linear" covers the same families as there.
_V4_NAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_FUSED = "gate_up_proj"  # two v4 projections stacked: HF PEFT gives it twice the rank and alpha


def moe_all_linear(model: nn.Module, r: int, lora_alpha: float) -> dict[str, Any] | None:
    """What ``target_modules="all-linear"`` means on a model whose experts are fused parameters, as config fields
    (``target_modules``, ``target_parameters`` and the ``rank_pattern``/``alpha_pattern`` entries of the fused
    gate/up stack, which stands for two v4 layers of rank ``r`` each); None for any other model.

    As in HF PEFT, the v4 names of the experts and the router leave ``target_modules`` (a ``Linear`` of that name
    elsewhere, such as a shared expert's ``down_proj``, is then not adapted) and their parameters are targeted.
    """
    family = model_type(model)
    style = "mixtral" if family == "mixtral" else _FUSED_FAMILIES.get(family)
    if style not in _V4_NAMES:
        return None
    renamed = _V4_NAMES[style]
    head = output_head_paths(model)
    linear = {path.rpartition(".")[2] for path, m in model.named_modules()
              if path and path not in head and is_linear(m)}
    key = rf".*\.{re.escape(_FUSED)}"
    return {
        "target_modules": sorted(linear - renamed.keys()),
        "target_parameters": sorted(set(renamed.values())),
        "rank_pattern": {key: 2 * r},
        "alpha_pattern": {key: 2 * lora_alpha},
    }


def find_parameters(model: nn.Module, target_parameters: list[str], taken: Mapping[str, nn.Module]
                    ) -> dict[str, list[str]]:
    """The targeted parameters by path of the module that owns them, in the order the module registered them.

    A name matches a parameter's full name or its last components (``"experts.gate_up_proj"``). A parameter inside
    a module ``target_modules`` already adapts (``taken``) is refused, as is a target list that matches nothing.
    """
    found: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            if not any(key == t or key.endswith(f".{t}") for t in target_parameters):
                continue
            if not path:
                raise ConfigError(f"target_parameters: {key} belongs to the top-level model, which cannot be wrapped.")
            owner = next((p for p in taken if path == p or path.startswith(f"{p}.")), None)
            if owner is not None:
                raise ConfigError(
                    f"target_parameters selects {key}, inside {owner}, which target_modules already adapts; remove "
                    f"one of the two (a linear layer is adapted through target_modules).")
            found.setdefault(path, []).append(name)
    if found:
        return found
    candidates = sorted({f"{p.rpartition('.')[2]}.{n}" if p else n for p, m in model.named_modules()
                         for n, t in m.named_parameters(recurse=False) if t.dim() in (2, 3) and not is_linear(m)})
    raise TargetModulesError(
        f"target_parameters={target_parameters!r} matched no parameter of {type(model).__name__}. Parameters that "
        f"no linear layer owns: {', '.join(candidates) or 'none'}. A name matches a parameter's full name or its "
        f"last components (e.g. 'experts.gate_up_proj')."
    )


class ParameterLoraLayer(AdapterLayer):
    """LoRA on one or more 2-D or 3-D parameters of one module (an MoE experts module, a router), which it keeps as
    ``base_layer`` and runs with the adapted weights in place of its own.

    ``lora_A[name]`` (E·r, in) and ``lora_B[name]`` (out, r·E) per targeted parameter ``name``, in HF PEFT's layout.
    No dropout (the update is folded into the weight, so it cannot see a dropped input) and no DoRA, as in HF PEFT.
    """

    def __init__(self, base_layer: nn.Module, ranks: Mapping[str, tuple[int, float]], config: AdapterConfig,
                 use_rslora: bool = False) -> None:
        """``ranks`` gives (rank, alpha) by name for each targeted parameter of ``base_layer``, in the order the
        module registered them."""
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.names = list(ranks)
        self.merged = False
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        transposed = getattr(base_layer, "is_transposed", False)
        for name in self.names:
            weight = getattr(base_layer, name)
            if weight.dim() not in (2, 3) or not weight.is_floating_point():
                raise ConfigError(
                    f"target_parameters: {name} of {type(base_layer).__name__} is a {weight.dim()}-D "
                    f"{weight.dtype} tensor; LoRA adapts floating-point 2-D (out, in) or 3-D (experts, out, in) ones.")
            experts = weight.shape[0] if weight.dim() == 3 else 1
            flipped = weight.dim() == 3 and transposed  # stored (E, in, out)
            out_features, in_features = weight.shape[-2:][::-1] if flipped else weight.shape[-2:]
            r, alpha = ranks[name]
            factory = {"dtype": adapter_dtype(config, weight), "device": weight.device}
            self.lora_A[name] = nn.Parameter(torch.empty(experts * r, in_features, **factory))
            self.lora_B[name] = nn.Parameter(torch.zeros(out_features, r * experts, **factory))
            self.r[name] = r
            self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
            if weight.device.type != "meta":
                self._init(name, getattr(config, "init_lora_weights", True))
        # What the layer declares (see AdapterLayer): per instance, as the targeted parameters vary by module.
        self.adapter_parameter_names = tuple(f"lora_{ab}.{n}" for n in self.names for ab in "AB")
        nesting = {n: "base_layer." * (len(self.names) - 1 - i) for i, n in enumerate(self.names)}
        self.disk_names = {f"lora_{ab}.{n}": f"{nesting[n]}lora_{ab}.weight" for n in self.names for ab in "AB"}

    @torch.no_grad()
    def _init(self, name: str, init: bool | str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A[name], std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        if init is False:
            nn.init.normal_(self.lora_B[name], std=0.02)

    def adapted(self, name: str) -> torch.Tensor:
        """``W + ΔW`` for the parameter ``name``, in ``W``'s dtype (what the base module computes with)."""
        weight = getattr(self.base_layer, name)
        lhs, rhs = self._factors(name, weight.dtype)
        if weight.dim() == 2:
            return weight + (lhs[0] @ rhs[0]) * self.scaling[name]
        return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling[name])

    def _factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs), batched by expert, with ``ΔW = scaling · lhs @ rhs`` in the parameter's own layout."""
        weight = getattr(self.base_layer, name)
        experts = weight.shape[0] if weight.dim() == 3 else 1
        a = self.lora_A[name].to(dtype).view(experts, self.r[name], -1)  # (E, r, in)
        b = self.lora_B[name].to(dtype).view(-1, self.r[name], experts).permute(2, 0, 1)  # (E, out, r)
        if weight.dim() == 3 and getattr(self.base_layer, "is_transposed", False):
            return a.transpose(1, 2), b.transpose(1, 2)  # ΔW_e stored as (in, out)
        return b, a

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of the parameter ``name`` in float32, shaped like it."""
        weight = getattr(self.base_layer, name)
        lhs, rhs = self._factors(name, torch.float32)
        return (torch.bmm(lhs, rhs) * self.scaling[name]).view(weight.shape)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        weights = {name: self.adapted(name) for name in self.names}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def unload(self) -> nn.Module:
        self.unmerge()
        return self.base_layer

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add(1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add(-1)
            self.merged = False

    def _add(self, sign: int) -> None:
        for name in self.names:
            weight = getattr(self.base_layer, name)
            weight.copy_((weight.float() + sign * self.delta_weight(name)).to(weight.dtype))

    def merged_module(self) -> nn.Module:
        self.merge()
        return self.base_layer

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.base_layer.state_dict())
        if not self.merged:
            for name in self.names:
                weight = state[name]
                state[name] = (weight.float() + self.delta_weight(name)).to(weight.dtype)
        return state

    def extra_repr(self) -> str:
        return f"parameters={self.names}, r={self.r}, merged={self.merged}"

