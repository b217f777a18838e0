"""What every adapter method shares: the config base class (which registers each method by ``peft_type``), the
contract of an adapter layer, and ``WrappingLayer``, the base of every layer that wraps one linear layer.

A method is one file in this folder holding a config dataclass (field names as HF PEFT spells them) and the
``AdapterLayer`` modules it injects, with only its own math. Everything else in the package (freezing, saving,
checkpoints, merging) is driven by what the layers declare, never by matching substrings of parameter names.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lightning_peft.errors import ConfigError, MergeError
from lightning_peft.methods.peft_fields import WHOLE_FIELDS
from lightning_peft.quantization import compute_dtype, dense_linear, dequantize, is_quantized
from lightning_peft.validation import check_field_types, check_module_patterns

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}
"""Every method's config class by HF PEFT ``peft_type``, filled as each method's module is imported (a config
class that sets ``peft_type`` registers itself)."""


def config_class(peft_type: object, source: str = "adapter config") -> type[AdapterConfig]:
    """The config class for ``peft_type``; refuses a missing or unknown type, naming the ones we support."""
    if not isinstance(peft_type, str) or peft_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: peft_type={peft_type!r} is not supported; expected one of {sorted(CONFIG_CLASSES)}."
        )
    return CONFIG_CLASSES[peft_type]


@dataclasses.dataclass
class AdapterConfig(ABC):
    """Fields every method shares; subclasses add their own and validate them in ``__post_init__``."""

    peft_type: ClassVar[str]
    disk_prefix: ClassVar[str] = "base_model.model."
    """What HF PEFT puts before a module path in its tensor keys (``base_model.`` for prompt methods, whose
    PEFT model wraps the transformers model directly)."""

    known_to_hf_peft: ClassVar[bool] = True
    """Whether HF PEFT has this ``peft_type``, so it loads our files (not so for our own methods)."""

    own_fields: ClassVar[tuple[str, ...]] = ("base_model_gguf_file",)
    """Fields HF PEFT's config for this ``peft_type`` lacks: ``save_adapter`` writes them to the safetensors
    metadata instead of ``adapter_config.json``, so PEFT loads the JSON without warnings."""

    trains_base_weights: ClassVar[bool] = False
    """Whether the method trains the targeted base weights in full (GaLore), so a large trainable share is its
    point, not a mistake the doctor warns about."""

    quantized_base_refusal: ClassVar[str | None] = None
    """Why this method cannot train on a 4-bit or 8-bit base (GaLore trains the base weights themselves), or None
    when it can; ``PeftStrategy`` raises it before quantizing anything."""

    task_type: str | None = None
    """``CAUSAL_LM``, ``SEQ_CLS``, ...: tells HF PEFT which model class to wrap when it loads our files."""
    base_model_name_or_path: str | None = None
    """Recorded in ``adapter_config.json`` so the adapter says which base it belongs to (``package:NAME/...`` for
    a base inside an installed package). Filled in at save from where the model was loaded when left unset."""
    base_model_gguf_file: str | None = None
    """The GGUF file inside ``base_model_name_or_path`` the base was read from, filled in at save like it; kept in
    the safetensors metadata, as HF PEFT has no such field."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classification head), by name or suffix; as in
    HF PEFT, no adapter goes on them or on a layer inside them."""
    autocast_adapter_dtype: bool = dataclasses.field(default=True, kw_only=True)
    """Adapter parameters in float32 whatever the base's dtype, as HF PEFT does: on a bfloat16 base, AdamW updates
    smaller than bfloat16's resolution (1/128 of a weight's magnitude) would be rounded away. Compute still runs
    in the activations' dtype. ``False`` keeps the base's dtype. A training choice: not written to
    ``adapter_config.json``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "peft_type" in cls.__dict__:  # a method, not an intermediate base such as PromptLearningConfig
            if cls.peft_type in CONFIG_CLASSES:
                raise TypeError(f"peft_type {cls.peft_type!r} is already taken by {CONFIG_CLASSES[cls.peft_type]}.")
            CONFIG_CLASSES[cls.peft_type] = cls

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type={self.task_type!r} is not one of {TASK_TYPES}.")
        check_module_patterns("modules_to_save", self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @abstractmethod
    def build_layers(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """Build (without inserting) the adapter layers for ``model``, keyed by the path each one replaces.

        Building first and inserting after is what lets a failed injection leave the model untouched.
        """

    def trainable_base_parameters(self, model: nn.Module, layers: dict[str, AdapterLayer]) -> list[str]:
        """Names of base parameters (in ``model`` after injection) that this config trains too, e.g. biases."""
        return []

    def fill_from_model(self, model: PreTrainedModel) -> AdapterConfig:
        """This config with the fields the model determines filled in (prompt methods: ``token_dim``,
        ``num_layers``...), or a ConfigError when the model's family or task is one the method cannot adapt.
        Called at injection, before anything changes."""
        return self

    def saved_form(self) -> AdapterConfig:
        """The config to build layers from when loading a saved adapter directory: they must hold exactly its
        tensors. Most methods save what they train; prefix tuning through an MLP is saved after the projection,
        and prompt tuning skips its text initialisation (the tensor replaces it; the tokenizer may be absent)."""
        return self

    def training_hooks(self, model: nn.Module, total_steps: int | None) -> TrainingHooks | None:
        """What the method adds to a training step beyond its layers' forward (AdaLoRA: a regulariser and rank
        allocation), run by ``PeftCallback``; None for methods that need nothing. ``total_steps`` is the number
        of optimizer steps of the run, when known."""
        return None

    def lr_ratios(self, model: nn.Module) -> list[tuple[nn.Parameter, float]]:
        """Adapter parameters in ``model`` that train at a multiple of the configured learning rate (LoRA+: the B
        matrices); ``PeftCallback`` moves them into param groups of their own in whichever optimizer runs."""
        return []

    def build_optimizer(self, model: nn.Module, learning_rate: float, weight_decay: float
                        ) -> torch.optim.Optimizer | None:
        """The optimizer this method must train with, over the trainable parameters of ``model`` after injection
        (GaLore: AdamW in a low-rank projection of the gradients), or None when any optimizer will do. Called
        by ``PeftCallback``, which refuses a module that configures another one, and by ``CausalLMModule``."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``peft_type``, JSON-ready (``save_adapter`` keeps ``own_fields`` out of the JSON)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for field in dataclasses.fields(self):
            if field.name == "autocast_adapter_dtype":
                continue
            value = getattr(self, field.name)
            out[field.name] = sorted(value) if isinstance(value, (set, tuple)) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
        """Build the config of ``data['peft_type']`` from a dict as HF PEFT or we wrote it.

        A field of HF PEFT's ``LoraConfig`` this class lacks is refused by name when set, with the reason
        ``methods/peft_fields.py`` gives, unless it cannot change the math or is read from the model (then it is
        ignored); any other unknown key is dropped with a warning (what HF PEFT itself does).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        target = config_class(data.get("peft_type"), source) if cls is AdapterConfig else cls
        names = {f.name for f in dataclasses.fields(target)}
        kwargs, dropped = {}, []
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in names:
                kwargs[key] = value
                continue
            row = WHOLE_FIELDS.get(key)
            if _is_unset(value) or row is not None and (row.status == "ignored" or row.from_model):
                continue
            if row is None:
                dropped.append(key)
            elif row.status == "refused":
                raise ConfigError(f"{source}: {key}={value!r} is refused: {row.note}")
            else:
                raise ConfigError(
                    f"{source}: {key}={value!r} is an HF PEFT feature {target.__name__} does not implement; "
                    f"remove it or train the adapter without it."
                )
        if dropped:
            warnings.warn(f"{source}: ignoring unknown keys {sorted(dropped)}.", stacklevel=2)
        try:
            return target(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


class TrainingHooks:
    """Training-time work of a method beyond its layers' forward; ``PeftCallback`` calls these."""

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the training loss (its gradient is added once per optimizer step), or None."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Runs after optimizer step number ``step`` (1-based), gradients still in place."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume; saved in the Lightning checkpoint with the callback's state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class AdapterLayer(nn.Module, ABC):
    """A module that holds one adapter's trainable tensors next to (or around) a frozen base module.

    ``adapter_parameter_names`` declares which of its parameters are the adapter (they are saved and loaded, and
    trained unless also listed in ``frozen_parameter_names``; dotted names reach into submodules); ``disk_names``
    maps each to the suffix HF PEFT uses in ``adapter_model.safetensors`` after the layer's path.

    A layer usually takes the place of the module at its path. Prompt and prefix tuning add a layer at a new path
    instead, act on the model's inputs through hooks registered in ``bind`` and return None from ``unload``.

    A method that cannot be folded into the base weights sets ``mergeable = False`` and says why in
    ``merge_refusal``; every merge verb then raises that one MergeError.
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]]
    frozen_parameter_names: ClassVar[tuple[str, ...]] = ()
    """Adapter parameters saved with the adapter but never trained (LoRA-FA's random projection A)."""
    disk_names: ClassVar[dict[str, str]]
    mergeable: ClassVar[bool] = True
    merge_refusal: ClassVar[str] = ""
    """Why a non-mergeable method cannot merge, and what to do instead (the MergeError's text)."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        return {name: params[name] for name in self.adapter_parameter_names if name in params}

    def disk_key(self, path: str, name: str) -> str:
        """HF PEFT's key for adapter parameter ``name`` of this layer at ``path``."""
        return f"{self.config.disk_prefix}{path}.{self.disk_names.get(name, name)}"

    def saved_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """What ``save_adapter`` writes for this layer, by HF PEFT key: the adapter parameters as they are, unless
        the method saves a computed form (prefix tuning after its projection MLP)."""
        return {self.disk_key(path, name): param for name, param in self.adapter_parameters().items()}

    def bind(self, model: nn.Module) -> None:
        """Called by ``attach`` once the layer sits in ``model``; layers that act on the model's inputs register
        their hooks here and remove them in ``unload``."""

    @abstractmethod
    def unload(self) -> nn.Module | None:
        """The module this layer replaced, as it was before injection (adapter not merged); None for a layer that
        replaced nothing, after removing its hooks."""

    def merge(self) -> None:
        """Fold the adapter into the base weights in place, so forward skips the adapter path."""
        raise MergeError(self.merge_refusal)

    def unmerge(self) -> None:
        """Undo ``merge`` (nothing to undo for a method that never merges)."""

    def merged_module(self) -> nn.Module | None:
        """A plain module with the adapter folded in, to take this layer's place for good; None for a layer that
        replaced nothing and leaves nothing behind (GaLore's record)."""
        raise MergeError(self.merge_refusal)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of ``merged_module()`` computed without changing this layer (for exports)."""
        raise MergeError(self.merge_refusal)


class WrappingLayer(AdapterLayer):
    """An adapter layer that takes the place of one linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a 4-bit or
    8-bit linear) and keeps it as ``base_layer``: everything such a layer needs beyond its method's math.

    - Shapes: model code reads attributes of the layers it owns (T5's feed-forward reads ``wo.weight.dtype``), so
      ``weight``, ``bias``, ``in_features`` and ``out_features`` of the replaced layer are forwarded, read-only.
      They are properties, not registered tensors, so the state dict, the parameter list and the checkpoint names
      stay those of ``base_layer``; a quantized base hands over its own ``Params4bit``/``Int8Params``.
      ``in_features``/``out_features`` come from the layer's attributes (``Conv1D``: ``nx``/``nf``), never from
      the weight's shape, which FSDP flattens.
    - Dtype policy: ``factory`` gives the dtype (``adapter_dtype``) and device new adapter tensors take;
      ``compute_dtype`` is the dtype the adapter path computes in.
    - Merging: a method gives its merge rule over the dense (out, in) float32 weight (``merged_weight`` and its
      inverse ``unmerged_weight``; by default adding ``delta_weight()``) and, when it changes the bias,
      ``merged_bias``/``unmerged_bias``. This class does the rest once: the ``merged`` flag, writing back through
      ``Conv1D``'s transposed layout, refusing in-place merges into quantized weights, ``merged_module`` (a plain
      layer in the compute dtype for a quantized base) and ``merged_state_dict``.
    """

    method_name: ClassVar[str]
    """How error messages name the method (``"LoRA"``)."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.transposed = isinstance(base_layer, Conv1D)  # the base stores its weight as (in, out)
        self.merged = False
        weight = base_layer.weight
        self.factory = {"dtype": adapter_dtype(config, weight), "device": weight.device}
        self.materialized = weight.device.type != "meta"
        """False on the meta device, where initialising the adapter's tensors would be wasted."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.nx if self.transposed else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.nf if self.transposed else self.base_layer.out_features

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The adapter path computes in the base's compute dtype (a quantized base's), else the activations'."""
        return compute_dtype(self.base_layer) or x.dtype

    def dense_weight(self) -> torch.Tensor:
        """The base weight as an (out, in) tensor in its own dtype (a quantized one dequantized)."""
        if is_quantized(self.base_layer):
            return dequantize(self.base_layer)
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged (out, in) float32 weight from the unmerged one: by default plus the method's ``delta_weight()``
        (its additive update, (out, in) float32); a method with another rule overrides this and its inverse."""
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merged_weight``, for ``unmerge``."""
        return weight - self.delta_weight()

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias (float32) from the unmerged one; most methods leave it alone."""
        return bias

    def unmerged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def unload(self) -> nn.Module:
        self.unmerge()
        return self.base_layer

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not self.mergeable:
            raise MergeError(self.merge_refusal)
        if not self.base_layer.weight.is_floating_point():
            raise MergeError(
                f"Cannot merge {self.method_name} in place into a quantized {type(self.base_layer).__name__}: "
                f"rounding back to low precision loses the update. Use merge_adapter(model, dtype=...) or "
                f"MergeCallback, which export dequantized weights."
            )
        self._write(self.merged_weight, self.merged_bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._write(self.unmerged_weight, self.unmerged_bias)
            self.merged = False

    def _write(self, weight_rule: Callable[[torch.Tensor], torch.Tensor],
               bias_rule: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a rule to the dense weight and bias and write both back in place (both computed first, so a rule
        that refuses leaves the layer as it was)."""
        weight, bias = self.base_layer.weight, self.base_layer.bias
        dense = weight_rule(self.dense_weight().float())
        new_bias = bias_rule(bias.float()) if bias is not None else None
        weight.copy_((dense.t() if self.transposed else dense).to(weight.dtype))
        if bias is not None:
            bias.copy_(new_bias.to(bias.dtype))

    def merged_module(self) -> nn.Module:
        if not self.mergeable:
            raise MergeError(self.merge_refusal)
        if is_quantized(self.base_layer):  # a plain layer in the compute dtype: rounding back would lose the update
            state = self.merged_state_dict()
            return dense_linear(state["weight"], state.get("bias"))
        self.merge()
        return self.base_layer

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.mergeable:
            raise MergeError(self.merge_refusal)
        weight, bias = self.dense_weight(), self.base_layer.bias
        merged = weight if self.merged else self.merged_weight(weight.float()).to(weight.dtype)
        out = {"weight": merged.t() if self.transposed else merged}
        if bias is not None:
            out["bias"] = bias.detach() if self.merged else self.merged_bias(bias.float()).to(bias.dtype)
        return out


def adapter_dtype(config: AdapterConfig, base_weight: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter parameters built around a base weight (float32 unless the config keeps the
    base's dtype; a quantized weight has none to keep)."""
    if config.autocast_adapter_dtype or not base_weight.is_floating_point():
        return torch.float32
    return base_weight.dtype
