"""What every adapter method shares: the config base class and the contract of an adapter layer.

A method is one file in this folder holding a config dataclass (field names as HF PEFT spells them) and the
``AdapterLayer`` modules it injects. Everything else in the package (freezing, saving, checkpoints, merging)
is driven by what the layers declare, never by matching substrings of parameter names.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lightning_peft.errors import ConfigError, TargetModulesError

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Keys HF PEFT writes that carry no meaning for us when left at these values.
_NEUTRAL_KEYS = {"peft_version", "inference_mode", "revision", "auto_mapping", "megatron_core", "qalora_group_size"}
# Keys HF PEFT writes that change the adapter's math when set: loading such a file would silently be wrong.
_UNSUPPORTED_WHEN_SET = {
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "layer_replication", "lora_bias",
    "target_parameters", "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens",
    "loftq_config", "megatron_config", "eva_config", "corda_config", "arrow_config", "kasa_config",
}


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclasses.dataclass
class AdapterConfig(ABC):
    """Fields every method shares; subclasses add their own and validate them in ``__post_init__``."""

    peft_type: ClassVar[str]
    disk_prefix: ClassVar[str] = "base_model.model."
    """What HF PEFT puts before a module path in its tensor keys (``base_model.`` for prompt methods, whose
    PEFT model wraps the transformers model directly)."""

    own_fields: ClassVar[tuple[str, ...]] = ("base_model_gguf_file",)
    """Fields HF PEFT's config for this ``peft_type`` lacks: ``save_adapter`` writes them to the safetensors
    metadata instead of ``adapter_config.json``, so PEFT loads the JSON without warnings."""

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
    """Modules trained in full and saved with the adapter (e.g. a classification head), by name or suffix."""
    autocast_adapter_dtype: bool = dataclasses.field(default=True, kw_only=True)
    """Adapter parameters in float32 whatever the base's dtype, as HF PEFT does: on a bfloat16 base, AdamW updates
    smaller than bfloat16's resolution (1/128 of a weight's magnitude) would be rounded away. Compute still runs
    in the activations' dtype. ``False`` keeps the base's dtype. A training choice: not written to
    ``adapter_config.json``."""

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

        Keys HF PEFT writes at inert values are accepted; a key that would change the math is refused; any other
        unknown key is dropped with a warning (what HF PEFT itself does).
        """
        from lightning_peft.methods import config_class

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
            elif key in _UNSUPPORTED_WHEN_SET and not _is_unset(value):
                raise ConfigError(
                    f"{source}: {key}={value!r} is an HF PEFT feature lightning_peft does not implement; "
                    f"remove it or train the adapter without it."
                )
            elif key not in _NEUTRAL_KEYS and not _is_unset(value) and key not in _UNSUPPORTED_WHEN_SET:
                dropped.append(key)
        if dropped:
            warnings.warn(f"{source}: ignoring unknown keys {sorted(dropped)}.", stacklevel=2)
        try:
            return target(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None


def check_field_types(config: object) -> None:
    """Refuse a dataclass field whose value is not of its annotated type, naming the field: a config read from
    JSON or YAML must fail here rather than deep in the math (ints pass for floats; bools pass for neither)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if not _matches(value, hint):
            expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{type(config).__name__}: {field.name}={value!r} is not of type {expected}.")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, (list, tuple, set)) and all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def adapter_dtype(config: AdapterConfig, base_weight: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter parameters built around a base weight (float32 unless the config keeps the
    base's dtype; a quantized weight has none to keep)."""
    if config.autocast_adapter_dtype or not base_weight.is_floating_point():
        return torch.float32
    return base_weight.dtype


def match_module_name(name: str, patterns: str | list[str] | None) -> bool:
    """HF PEFT's rule: a string is a regex that must match the whole path; a list matches a path or its suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == key or name.endswith("." + key) for key in patterns)


def check_module_patterns(field: str, value: Any) -> None:
    """Refuse a ``target_modules``-like field that is neither a regex string nor a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{field}={value!r} is not a valid regular expression: {err}.") from None
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field} must be a list of module names or a regex string, got {value!r}.")


def select_targets(
    model: nn.Module,
    target_modules: str | list[str],
    exclude_modules: str | list[str] | None,
    supported: Callable[[nn.Module], bool],
    skip: set[str] = frozenset(),
    what: str = "target_modules",
) -> dict[str, nn.Module]:
    """The modules whose path matches ``target_modules`` and not ``exclude_modules``; refuse when none fit.

    ``skip`` holds paths never adapted (the output head under ``"all-linear"``). The error lists the names of
    the modules that could have been targeted, so the fix is one read away.
    """
    found: dict[str, nn.Module] = {}
    wrong_type: list[str] = []
    for path, module in model.named_modules():
        if not path or path in skip:
            continue
        if not match_module_name(path, target_modules) or match_module_name(path, exclude_modules):
            continue
        if supported(module):
            found[path] = module
        else:
            wrong_type.append(f"{path} ({type(module).__name__})")
    if found:
        return found
    candidates = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if p and supported(m)})
    hint = f" Matching modules of a type that cannot be adapted: {', '.join(wrong_type[:5])}." if wrong_type else ""
    raise TargetModulesError(
        f"{what}={target_modules!r} matched no adaptable module of {type(model).__name__}.{hint} "
        f"Adaptable module names: {', '.join(candidates)}. A list entry matches a module path or its last "
        f"components (e.g. 'q_proj'); a string is a regex that must match the whole path."
    )


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output embedding (``lm_head``), which ``"all-linear"`` never adapts."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return {p for p, m in model.named_modules() if head is not None and m is head}


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

    ``adapter_parameter_names`` declares which of its parameters are the adapter (they are made trainable, saved
    and loaded; dotted names reach into submodules); ``disk_names`` maps each to the suffix HF PEFT uses in
    ``adapter_model.safetensors`` after the layer's path.

    A layer usually takes the place of the module at its path. Prompt and prefix tuning add a layer at a new path
    instead, act on the model's inputs through hooks registered in ``bind`` and return None from ``unload``.
    """

    adapter_parameter_names: ClassVar[tuple[str, ...]]
    disk_names: ClassVar[dict[str, str]]

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

    @abstractmethod
    def merge(self) -> None:
        """Fold the adapter into the base weights in place, so forward skips the adapter path."""

    @abstractmethod
    def unmerge(self) -> None:
        """Undo ``merge``."""

    @abstractmethod
    def merged_module(self) -> nn.Module | None:
        """A plain module with the adapter folded in, to take this layer's place for good; None for a layer that
        replaced nothing and leaves nothing behind (GaLore's record)."""

    @abstractmethod
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of ``merged_module()`` computed without changing this layer (for exports)."""


class WrappingLayer(AdapterLayer):
    """An adapter layer that takes the place of one linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a 4-bit or
    8-bit linear) and keeps it as ``base_layer``.

    Model code reads attributes of the layers it owns (T5's feed-forward reads ``wo.weight.dtype``), so the
    public attributes of the replaced layer that model code reads are forwarded here, read-only: ``weight``,
    ``bias``, ``in_features`` and ``out_features``. They are properties, not registered tensors, so the state
    dict, the parameter list and the checkpoint names stay those of ``base_layer``; a quantized base hands over
    its own ``Params4bit``/``Int8Params``. ``in_features``/``out_features`` come from the layer's attributes
    (``Conv1D``: ``nx``/``nf``), never from the weight's shape, which FSDP flattens.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = isinstance(base_layer, Conv1D)  # the base stores its weight as (in, out)

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
