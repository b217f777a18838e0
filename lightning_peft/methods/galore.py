"""GaLore (Zhao et al., 2024): full-parameter training of chosen weights with low-rank optimizer state.

GaLore adds no layer. The targeted weights (the 2-D weights of the matched linear layers) train in full; what
shrinks is AdamW's state. Every ``update_proj_gap`` steps the gradient ``G`` (m x n) of each weight is split by
SVD and its top ``rank`` singular vectors become the projection ``P``; each step Adam runs on the projected
gradient and its update is projected back::

    "std" side, chosen by shape so the state is the smaller one:
      m >= n:  P = Vh[:r]  (r x n)   R = G Pᵀ  (m x r)   update = (N P)  * scale
      m <  n:  P = U[:, :r] (m x r)  R = Pᵀ G  (r x n)   update = (P N)  * scale
    where N = m̂ / (√v̂ + eps) are Adam's normalised moments of R.

For a 512 x 512 projection at rank 128 the state is P plus two moments of R: 3 x 64k floats against AdamW's
2 x 262k (0.375x); for a 1408 x 512 MLP weight, 0.27x.

How it fits the package: ``GaLoreConfig.trainable_base_parameters`` names the targeted weights (``attach``
freezes the rest), ``build_optimizer`` hands ``PeftCallback`` (and ``CausalLMModule``) the projected optimizer,
and one parameter-free ``GaLoreRecord`` layer at ``model.galore`` carries the config, so everything that asks a
model for its adapter (checkpoints, ``save_adapter``, ``MergeCallback``) finds it. An "adapter directory" for
GaLore holds the trained weights themselves under HF PEFT's key spelling and ``peft_type="GALORE"``: only
``load_adapter`` reads it (onto the same base); to serve the model, export it with ``MergeCallback``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer
from lightning_peft.targets import find_targets
from lightning_peft.validation import check_module_patterns

RECORD_PATH = "galore"


@dataclasses.dataclass
class GaLoreConfig(AdapterConfig):
    """Train the weights of ``target_modules`` in full with GaLore's low-rank projected AdamW.

    Example::

        PeftCallback(GaLoreConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank=128))
    """

    peft_type: ClassVar[str] = "GALORE"
    known_to_hf_peft: ClassVar[bool] = False
    own_fields: ClassVar[tuple[str, ...]] = ()  # no HF PEFT config to keep clean: every field goes in the JSON
    trains_base_weights: ClassVar[bool] = True
    quantized_base_refusal: ClassVar[str | None] = (
        "GaLore trains the base weights themselves, and a 4-bit or 8-bit weight cannot take optimizer updates. "
        "Train GaLore on a bfloat16/float32 base (drop the quantization), or use LoRA for a quantized base (QLoRA)."
    )

    target_modules: str | list[str] | None = None
    """Linear layers whose weights train in full (names or suffixes, a regex, or ``"all-linear"``: every linear
    layer but the output head), e.g. attention and MLP projections."""
    exclude_modules: str | list[str] | None = None
    """Linear layers left frozen even where ``target_modules`` matches them."""
    rank: int = 128
    """Rank of the gradient projection; a weight smaller than it in both dimensions projects at its own size."""
    update_proj_gap: int = 200
    """Optimizer steps between two SVD refreshes of the projection."""
    scale: float = 0.25
    """Factor on the projected-back update (the paper's alpha)."""
    proj_type: Literal["std"] = "std"
    """Projection side: ``"std"`` projects along the smaller dimension of each weight, as in the paper."""
    optim: Literal["adamw", "adamw8bit"] = "adamw"
    """The optimizer run in the projected space: ``"adamw"`` keeps its moments in float32, ``"adamw8bit"`` in
    bitsandbytes' blockwise 8 bits (the projection stays float32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_module_patterns("target_modules", self.target_modules)
        check_module_patterns("exclude_modules", self.exclude_modules)
        if self.target_modules is None:
            raise ConfigError("GaLoreConfig needs target_modules, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'].")
        for name in ("rank", "update_proj_gap"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GaLoreConfig: {name}={getattr(self, name)} must be at least 1.")
        if not self.scale > 0:
            raise ConfigError(f"GaLoreConfig: scale={self.scale} must be positive.")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linear layers whose weights GaLore trains; a quantized one is refused (see the refusal above)."""
        found = find_targets(model, self.target_modules, self.exclude_modules, {}, "GaLoreConfig",
                             lambda m: isinstance(m, (nn.Linear, Conv1D)))
        quantized = [path for path, m in found.items() if not m.weight.is_floating_point()
                     or type(m.weight).__name__ in ("Params4bit", "Int8Params")]
        if quantized:
            raise ConfigError(f"{quantized[0]} is quantized. {self.quantized_base_refusal}")
        return found

    def build_layers(self, model: nn.Module) -> dict[str, GaLoreRecord]:
        self.targets(model)  # refuse a config that fits nothing before the model changes
        if hasattr(model, RECORD_PATH):
            raise ConfigError(f"{type(model).__name__} already has an attribute {RECORD_PATH!r}.")
        return {RECORD_PATH: GaLoreRecord(self)}

    def trainable_base_parameters(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> list[str]:
        return [f"{path}.weight" for path in self.targets(model)]

    def build_optimizer(self, model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        projected = [m.weight for m in self.targets(model).values() if id(m.weight) in trainable]
        projected_ids = {id(p) for p in projected}
        flat = [p for p in projected if p.dim() != 2]
        if flat:
            raise ConfigError(
                f"GaLore needs each targeted weight whole as a matrix, but {len(flat)} are {flat[0].dim()}-D here "
                f"(FSDP flattens and shards them). Train GaLore with DDP or on one device."
            )
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in projected_ids]
        groups: list[dict[str, Any]] = [{"params": projected, "rank": self.rank}]
        if rest:  # heads trained in full (modules_to_save): plain AdamW in the same optimizer
            groups.append({"params": rest, "rank": None})
        return GaLoreAdamW(groups, lr=learning_rate, weight_decay=weight_decay,
                           update_proj_gap=self.update_proj_gap, scale=self.scale, eight_bit=self.optim == "adamw8bit")


class GaLoreRecord(AdapterLayer):
    """Carries the ``GaLoreConfig`` inside the model, at ``model.galore``: no parameters, no effect on forward.

    The trained weights are the model's own, so merging changes nothing; merging removes this record."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ()
    disk_names: ClassVar[dict[str, str]] = {}

    def __init__(self, config: GaLoreConfig) -> None:
        super().__init__()
        self.config = config

    def unload(self) -> None:
        return None

    def merge(self) -> None:
        """Nothing to fold in: the trained weights are the model's own."""

    def unmerge(self) -> None:
        """Nothing was folded in."""

    def merged_module(self) -> None:
        return None

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in a low-rank projection of each gradient (param groups with ``rank`` set);
    groups with ``rank=None`` take plain AdamW steps. All state is tensors (projection included), so it
    checkpoints and restores like any torch optimizer. With ``eight_bit`` the projected moments are kept in
    bitsandbytes' blockwise 8-bit format and updated by its kernel."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, update_proj_gap: int = 200, scale: float = 0.25,
                 rank: int | None = None, eight_bit: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale, rank=rank, eight_bit=eight_bit)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state as saved: torch casts floating state to each parameter's dtype, which would turn the
        float32 moments and projection of a bfloat16 weight (and 8-bit quantization maps) into bfloat16."""
        super().load_state_dict(state_dict)
        saved = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(saved, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[param][key] = value.to(param.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                step = int(state.get("step", 0)) + 1
                state["step"] = torch.tensor(float(step))
                projected = group["rank"] is not None and grad.dim() == 2
                right = projected and grad.shape[0] >= grad.shape[1]  # "std": project the larger side away
                if projected:
                    if (step - 1) % group["update_proj_gap"] == 0:
                        state["projection"] = projection(grad, group["rank"])
                    proj = state["projection"]
                    grad = grad @ proj.T if right else proj.T @ grad
                if projected and group["eight_bit"]:
                    update = adam_8bit_direction(state, grad, group["betas"], group["eps"], step)
                else:
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(grad)
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    update = (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + group["eps"])
                if projected:
                    update = (update @ proj if right else proj @ update) * group["scale"]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss


def projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's "std" projection of a gradient (m x n): its top right singular vectors (r x n) when m >= n, else
    its top left singular vectors (m x r), so the projected gradient is the smaller side."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    rows, cols = grad.shape
    return vh[:rank] if rows >= cols else u[:, :rank]



_BLOCK = 256  # values per absmax block of bitsandbytes' blockwise 8-bit optimizer state


def adam_8bit_direction(state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float,
                        step: int) -> torch.Tensor:
    """Adam's bias-corrected step direction for ``grad`` with both moments in ``state`` as blockwise 8-bit values,
    computed by bitsandbytes' kernel: it runs on a zero buffer at learning rate 1, which it leaves holding minus
    the direction (bitsandbytes adds ``eps`` to the uncorrected root of the second moment)."""
    import bitsandbytes.functional as bnb_functional

    if "state1" not in state:
        blocks = -(-grad.numel() // _BLOCK)
        state["state1"] = torch.zeros_like(grad, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(grad, dtype=torch.uint8)
        state["qmap1"] = bnb_functional.create_dynamic_map(signed=True).to(grad.device)
        state["qmap2"] = bnb_functional.create_dynamic_map(signed=False).to(grad.device)
        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
    buffer = torch.zeros_like(grad)
    bnb_functional.optimizer_update_8bit_blockwise(
        "adam", grad.contiguous(), buffer, state["state1"], state["state2"], betas[0], betas[1], 0.0, 0.0, eps, step,
        1.0, state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"])
    return buffer.neg_()
