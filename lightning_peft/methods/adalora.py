"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves, during training, to the layers that
need it.

::

    x ──► base_layer (W, frozen) ─────────────────────────────────────────────┐
    │                                                                         ▼
    └──► dropout ──► A (r × in) ──► × E (r singular values) ──► B (out × r) ──► × α / r₀ ──► + ──► y

Every layer starts with ``init_r`` triplets (a row of A, a value of E, a column of B). After each optimizer
step the rank allocator scores each triplet by its smoothed sensitivity ``|θ · ∂L/∂θ|`` and zeroes the value
of the least important ones, so the total number of live triplets shrinks on a cubic schedule from
``init_r · layers`` to ``target_r · layers`` between steps ``tinit`` and ``total_step - tfinal``. A regulariser
``‖AAᵀ - I‖ + ‖BᵀB - I‖`` keeps A and B near-orthogonal, so the values in E behave like singular values.
The scaling stays ``lora_alpha / init_r`` whatever the rank left, as in HF PEFT.

Files are HF PEFT's: ``lora_A`` (r × in), ``lora_B`` (out × r), ``lora_E`` (r × 1) per layer. We save every
triplet (pruned ones hold E = 0, which is exact); a file HF PEFT pruned by its ``rank_pattern`` loads with
each layer at its kept rank.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, TrainingHooks, WrappingLayer
from lightning_peft.methods.lora import DEFAULT_TARGETS
from lightning_peft.targets import find_targets
from lightning_peft.validation import check_module_patterns

_EPS = 1e-5  # added to the rank in the scaling, as HF PEFT does (files must give the same outputs)


@dataclasses.dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyper-parameters, named as in HF PEFT.

    Example::

        AdaLoraConfig(init_r=12, target_r=4, tinit=200, tfinal=500, deltaT=10, target_modules=["q_proj", "v_proj"])
    """

    peft_type: ClassVar[str] = "ADALORA"

    init_r: int = 12
    """Triplets each layer starts with."""
    target_r: int = 8
    """Average triplets per layer left at the end of the budgeting phase."""
    tinit: int = 0
    """Optimizer steps before any pruning (the adapter first learns something worth ranking)."""
    tfinal: int = 0
    """Final steps that train the ranks found, without changing them."""
    deltaT: int = 1
    """Prune every ``deltaT`` steps during the budgeting phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of its uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser added to the loss."""
    total_step: int | None = None
    """Optimizer steps of the run. ``None``: taken from the Trainer when ``fit`` starts (``max_steps`` or
    epochs × batches) and recorded, as HF PEFT needs it to load the file."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept triplets per layer (``<path>.lora_E`` → mask), as HF PEFT writes after pruning its tensors; layers are
    then built at their kept rank. Our own files keep every triplet and leave this unset."""
    lora_alpha: float = 8
    """Numerator of the scaling ``lora_alpha / init_r``."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str | None = None
    """Module names or path suffixes, or a full-match regex; ``None`` uses LoRA's default for the family."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted."""
    bias: Literal["none"] = "none"
    """Biases stay frozen (HF PEFT's field; other modes are not supported for AdaLoRA)."""
    init_lora_weights: bool = True
    """``True``: E = 0 (no-op start), A and B small normal. ``False``: random E too (tests)."""
    fan_in_fan_out: bool = False
    """Written ``True`` for layers that store weights as (in, out) (GPT-2's ``Conv1D``), as HF PEFT needs."""
    r: int = 8
    """HF PEFT's LoRA rank field, which AdaLoRA ignores (``init_r`` sets the rank); kept so files round-trip."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} exceeds init_r={self.init_r}: the budget only shrinks.")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}.")
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")
        if self.total_step is not None:
            self._check_schedule(self.total_step)
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: AdaLoRA here trains no biases; use bias='none' or LoRA.")
        check_module_patterns("target_modules", self.target_modules)
        check_module_patterns("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)

    def _check_schedule(self, total_step: int) -> None:
        if isinstance(total_step, bool) or not isinstance(total_step, int) or total_step <= 0:
            raise ConfigError(f"total_step must be a positive integer, got {total_step!r}.")
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                              f"total_step={total_step} steps; lower them or train longer.")

    def build_layers(self, model: nn.Module) -> dict[str, AdaLoraLayer]:
        selected = find_targets(model, self.target_modules, self.exclude_modules, DEFAULT_TARGETS, "AdaLoraConfig",
                                modules_to_save=self.modules_to_save)
        pattern = self.rank_pattern or {}
        return {path: AdaLoraLayer(module, self, sum(pattern.get(f"{path}.lora_E", [True] * self.init_r)))
                for path, module in selected.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "fan_in_fan_out": self.fan_in_fan_out}

    def training_hooks(self, model: nn.Module, total_steps: int | None) -> RankAllocator:
        if self.total_step is None:
            if total_steps is None:
                raise ConfigError("AdaLoRA needs the run's length for its rank schedule: set total_step, or give "
                                  "the Trainer max_steps or a finite max_epochs.")
            self._check_schedule(total_steps)
            self.total_step = total_steps  # recorded with the adapter: HF PEFT needs it to load the file
        return RankAllocator(model, self)


class AdaLoraLayer(WrappingLayer):
    """An SVD-form update ``B diag(E) A · lora_alpha / init_r`` around one linear layer (dense, ``Conv1D`` or
    4-bit). A, E and B are plain parameters; the base layer is kept as ``base_layer`` and called unchanged."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_E", "lora_B")
    disk_names: ClassVar[dict[str, str]] = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}
    method_name: ClassVar[str] = "AdaLoRA"

    def __init__(self, base_layer: nn.Module, config: AdaLoraConfig, r: int) -> None:
        super().__init__(base_layer, config)
        factory = self.factory
        self.scaling = config.lora_alpha / (config.init_r + _EPS)
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, **factory) * 0.02)
        self.lora_E = nn.Parameter(torch.randn(r, 1, **factory) if config.init_lora_weights is False
                                   else torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, **factory) * 0.02)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        dtype = self.compute_dtype(x)
        down = F.linear(h.to(dtype), (self.lora_A * self.lora_E).to(dtype))  # (..., r)
        return result + (F.linear(down, self.lora_B.to(dtype)) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``B diag(E) A · scaling`` as an (out, in) fp32 tensor."""
        return self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()) * self.scaling

    def orthogonality(self) -> torch.Tensor:
        """``‖AAᵀ - I‖_F + ‖BᵀB - I‖_F``: zero when A's rows and B's columns are orthonormal."""
        eye = torch.eye(self.lora_A.shape[0], device=self.lora_A.device, dtype=self.lora_A.dtype)
        return (torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye)
                + torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye))

    def extra_repr(self) -> str:
        return f"r={self.lora_E.shape[0]}, scaling={self.scaling:g}, merged={self.merged}"


class RankAllocator(TrainingHooks):
    """The budget schedule, importance scores and pruning of AdaLoRA, plus its regulariser.

    Importance of a parameter entry: ``I = |θ · g|`` smoothed by EMA (``beta1``), times the EMA of its deviation
    from that mean (``beta2``). A triplet's score is its E entry's plus the mean over its row of A and its column
    of B. Each pruning keeps the ``budget`` best triplets over all layers and zeroes E for the rest.
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig) -> None:
        self.config = config
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
        self.initial_budget = sum(layer.lora_E.shape[0] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}  # path -> kept triplets (bool, r), once pruning has begun
        self.warned_no_gradient = False

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets allowed at ``step``, whether to prune at this step), HF PEFT's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def regularizer(self) -> torch.Tensor | None:
        if not self.layers or self.config.orth_reg_weight == 0:
            return None
        total = sum(layer.orthogonality() for layer in self.layers.values())
        return self.config.orth_reg_weight * total / (2 * len(self.layers))  # mean over the A and B matrices

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for name, param in layer.adapter_parameters().items():
                if param.grad is None:
                    continue
                key = f"{path}.{name}"
                score = (param * param.grad).abs().float()
                mean = self.sensitivity.get(key, torch.zeros_like(score))
                spread = self.uncertainty.get(key, torch.zeros_like(score))
                self.sensitivity[key] = b1 * mean + (1 - b1) * score
                self.uncertainty[key] = b2 * spread + (1 - b2) * (score - self.sensitivity[key]).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        def entry(path: str, name: str) -> torch.Tensor:
            key = f"{path}.{name}"
            return self.sensitivity[key] * self.uncertainty[key]

        return {path: entry(path, "lora_E").view(-1) + entry(path, "lora_A").mean(dim=1)
                + entry(path, "lora_B").mean(dim=0) for path in self.layers
                if f"{path}.lora_E" in self.sensitivity}

    @torch.no_grad()
    def _prune_to(self, budget: int) -> None:
        scores = self._triplet_scores()
        if len(scores) != len(self.layers):
            if not self.warned_no_gradient:
                missing = sorted(set(self.layers) - scores.keys())
                warnings.warn(
                    f"AdaLoRA cannot allocate ranks: {len(missing)} of its {len(self.layers)} targets got no gradient "
                    f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), so every layer keeps init_r "
                    f"until they do. Drop them from target_modules, or make them part of the loss.", stacklevel=2)
                self.warned_no_gradient = True
            return
        drop = self.initial_budget - budget
        if drop <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), drop).values
        self.masks = {path: score > threshold for path, score in scores.items()}
        self._apply_masks()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for path, keep in self.masks.items():
            self.layers[path].lora_E.masked_fill_(~keep.view(-1, 1).to(self.layers[path].lora_E.device), 0.0)

    def after_optimizer_step(self, step: int) -> None:
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self._update_scores()
            budget, prune = self.budget(step)
            if prune:
                self._prune_to(budget)
        elif step == end:  # the last pruning fixes the ranks for the final phase
            self._update_scores()
            self._prune_to(self.target_budget)
            self.sensitivity, self.uncertainty = {}, {}
        else:
            self._apply_masks()  # keep pruned triplets at zero while the rest fine-tune

    def state_dict(self) -> dict[str, Any]:
        return {"sensitivity": dict(self.sensitivity), "uncertainty": dict(self.uncertainty),
                "masks": dict(self.masks), "total_step": self.config.total_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sensitivity = dict(state.get("sensitivity", {}))
        self.uncertainty = dict(state.get("uncertainty", {}))
        self.masks = dict(state.get("masks", {}))
