"""Module surgery in one place: find the transformers model, pick target modules, insert and remove adapters.

Injection is two-phase: the method builds every replacement layer first (``AdapterConfig.build_layers``), then
``attach`` sets them on their parents and fixes which parameters train. Nothing in the user's model changes
until every layer has been built, so an error leaves the model as it was.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from lightning_peft.errors import AdapterMismatchError, TargetModulesError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer
from lightning_peft.targets import set_submodule

# Heads HF PEFT trains in full for sequence classification: we add those the model has.
_SEQ_CLS_HEADS = ("classifier", "score")
_TASK_BY_CLASS_SUFFIX = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


def find_transformer(module: nn.Module) -> tuple[str, PreTrainedModel]:
    """The outermost transformers model in ``module`` and its path there ("" when ``module`` is one)."""
    for path, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return path, sub
    raise TypeError(
        f"{type(module).__name__} holds no transformers PreTrainedModel. Build it in __init__ or configure_model "
        f"and assign it to an attribute (e.g. self.model = AutoModelForCausalLM.from_config(...))."
    )


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, AdapterLayer)}


def active_config(model: nn.Module) -> AdapterConfig | None:
    """The config of the adapter injected in ``model``, or None when it holds none."""
    configs = {id(layer.config): layer.config for layer in adapter_layers(model).values()}
    if len(configs) > 1:
        raise AdapterMismatchError("The model holds layers of more than one adapter; remove all but one first.")
    return next(iter(configs.values()), None)


def resolve_config(model: PreTrainedModel, config: AdapterConfig) -> AdapterConfig:
    """Fill what the model tells: ``task_type`` from its class, and the classification head to train for SEQ_CLS."""
    task_type = config.task_type
    if task_type is None:
        name = type(model).__name__
        task_type = next((t for suffix, t in _TASK_BY_CLASS_SUFFIX.items() if name.endswith(suffix)), None)
        if model.config.is_encoder_decoder and name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
            task_type = "SEQ_2_SEQ_LM"  # T5ForConditionalGeneration, BartForConditionalGeneration...
    modules_to_save = list(config.modules_to_save or [])
    if task_type == "SEQ_CLS":
        names = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules()}
        modules_to_save += [h for h in _SEQ_CLS_HEADS if h in names and h not in modules_to_save]
    config = dataclasses.replace(config, task_type=task_type, modules_to_save=modules_to_save or None)
    return config.fill_from_model(model)


def modules_to_save_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the modules trained in full. As in HF PEFT, a name selects every module whose path ends with it
    (``"classifier"`` also selects DistilBERT's ``pre_classifier``), so files stay interchangeable. A name the
    model lacks is refused, except the two head names HF PEFT lists for every classification adapter."""
    names = config.modules_to_save or []
    paths = [p for p, _ in model.named_modules() if p and any(p.endswith(n) for n in names)]
    paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    missing = [n for n in names if n not in _SEQ_CLS_HEADS and not any(p.endswith(n) for p in paths)]
    if missing:
        raise TargetModulesError(
            f"modules_to_save names {missing}, which {type(model).__name__} does not have. "
            f"Top-level modules: {', '.join(n for n, _ in model.named_children())}."
        )
    return paths


def attach(model: PreTrainedModel, config: AdapterConfig) -> dict[str, AdapterLayer]:
    """Inject ``config``'s adapter into ``model`` in place and freeze everything the adapter does not train.

    Returns the inserted layers by path. Raises before touching the model if the config does not fit it.
    """
    if adapter_layers(model):
        raise AdapterMismatchError(
            f"{type(model).__name__} already holds an adapter; merge or remove it before injecting another."
        )
    config = resolve_config(model, config)
    save_paths = modules_to_save_paths(model, config)
    layers = config.build_layers(model)
    for layer in layers.values():
        layer.config = config
    for path, layer in layers.items():
        set_submodule(model, path, layer)
        layer.bind(model)
    model.requires_grad_(False)
    for layer in layers.values():
        for name, param in layer.adapter_parameters().items():
            param.requires_grad_(name not in layer.frozen_parameter_names)
    for path in save_paths:
        model.get_submodule(path).requires_grad_(True)
    for name in config.trainable_base_parameters(model, layers):
        model.get_parameter(name).requires_grad_(True)
    return layers


def detach(model: nn.Module) -> None:
    """Put back every module an adapter replaced (unmerged) and remove those it added; the base keeps its frozen
    flags."""
    for path, layer in adapter_layers(model).items():
        original = layer.unload()
        if original is None:
            parent, _, name = path.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, name)
        else:
            set_submodule(model, path, original)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit tensor counts for the weights it stores."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
