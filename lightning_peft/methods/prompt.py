"""Prompt tuning (Lester et al. 2021): trainable "virtual token" embeddings put in front of every input.

::

    input_ids ──► embedding (frozen) ──┐
                                       ▼
    prompt_embeddings (n × d) ──► [ virtual tokens | tokens ] ──► transformer (frozen) ──► logits (n + L positions)

The adapter is one ``(num_virtual_tokens, token_dim)`` tensor: 20 virtual tokens on a 4096-wide model train
82k numbers. Nothing inside the model changes: a forward pre-hook on the transformers model turns ``input_ids``
into ``inputs_embeds`` with the prompt in front, lengthens ``attention_mask``, and for causal LMs puts -100 in
front of ``labels`` so the loss ignores the virtual positions. The user keeps calling ``model(...)`` as before;
the logits cover the virtual positions too, exactly as HF PEFT's ``PeftModel`` returns them. ``causal_lm_loss``,
which calls the model's body rather than its forward, applies the same rewrite (``PromptEncoder.with_prompt``).

Encoder-decoders (T5, BART; ``task_type="SEQ_2_SEQ_LM"``) get the prompt in front of the encoder's input only, as
under HF PEFT's ``PeftModelForSeq2SeqLM``; decoder inputs, labels and logits keep their length::

    input_ids ──► [ virtual | tokens ] ──► encoder ──► (n + L states) ──► decoder cross-attention ──► logits
                                                                            ▲ mask: n ones + attention_mask

The hooks sit on the encoder (which ``generate`` calls on its own, before decoding) and on the decoder, which
attends to the virtual positions through a cross-attention mask lengthened by ``n``. HF PEFT stores
``num_transformer_submodules=2`` prompts for such models and reads only the first, the encoder's; the tensor
keeps that ``(2n, token_dim)`` shape here too, so files move either way unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Cache, PreTrainedModel

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer

PROMPT_TASKS = ("CAUSAL_LM", "SEQ_CLS")  # of decoder-only and encoder-only models
SEQ2SEQ_TASK = "SEQ_2_SEQ_LM"  # of encoder-decoders, for the methods that support them
ENCODER_PATH = "prompt_encoder"  # where the adapter module sits in the transformers model (HF PEFT's name)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass
class PromptLearningConfig(AdapterConfig):
    """What prompt and prefix tuning share. The model dimensions are filled in at injection and written to
    ``adapter_config.json``, where HF PEFT needs them."""

    disk_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    """How many virtual tokens are put in front of every sequence."""
    token_dim: int | None = None
    """Width of a virtual token (the model's hidden size; for prefix tuning the width of the keys and values)."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only and encoder-only models, 2 for encoder-decoders (HF PEFT's count of prompts stored)."""
    num_attention_heads: int | None = None
    """Attention heads (key-value heads for prefix tuning), read from the model."""
    num_layers: int | None = None
    """Transformer layers, read from the model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_int(name, getattr(self, name), optional=True)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules!r}: it is 1 (decoder-only "
                              f"or encoder-only models) or 2 (encoder-decoders); leave it unset to read it from the "
                              f"model.")

    def fill_from_model(self, model: PreTrainedModel) -> PromptLearningConfig:
        method = type(self).__name__.removesuffix("Config")
        if is_encoder_decoder(model):
            if self.task_type != SEQ2SEQ_TASK:
                raise ConfigError(f"{method} on the encoder-decoder {type(model).__name__} needs task_type="
                                  f"{SEQ2SEQ_TASK!r} (an AutoModelForSeq2SeqLM model); got {self.task_type!r}.")
        elif self.task_type not in PROMPT_TASKS:
            raise ConfigError(f"{method} supports task_type {PROMPT_TASKS} (a *ForCausalLM or *ForSequence"
                              f"Classification model); got task_type={self.task_type!r} for {type(model).__name__}.")
        if "inputs_embeds" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"{method} needs a model whose forward takes inputs_embeds; "
                              f"{type(model).__name__} does not.")
        dims = self.model_dims(model)
        wrong = {k: getattr(self, k) for k, v in dims.items() if getattr(self, k) not in (None, v)}
        if wrong:
            raise ConfigError(f"{wrong} does not fit {type(model).__name__}, which needs {dims}; leave these unset "
                              f"and they are read from the model.")
        return dataclasses.replace(self, **dims)

    def model_dims(self, model: PreTrainedModel) -> dict[str, int]:
        """``token_dim``, ``num_attention_heads``, ``num_layers`` and ``num_transformer_submodules`` of ``model``."""
        config = model.config
        return dict(token_dim=config.hidden_size, num_attention_heads=config.num_attention_heads,
                    num_layers=config.num_hidden_layers,
                    num_transformer_submodules=2 if is_encoder_decoder(model) else 1)


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning; field names as in HF PEFT.

    Example::

        PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT",
                           prompt_tuning_init_text="Classify the sentiment of this review:",
                           tokenizer_name_or_path="path/to/base")
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    """``RANDOM``: standard normal vectors. ``TEXT``: the embeddings of ``prompt_tuning_init_text``'s tokens,
    repeated or cut to ``num_virtual_tokens`` (often trains faster). ``SAMPLE_VOCAB``: embeddings of random tokens."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start the prompt (``TEXT`` only)."""
    tokenizer_name_or_path: str | None = None
    """The tokenizer (a local directory or hub name) that turns ``prompt_tuning_init_text`` into tokens."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ConfigError(f"prompt_tuning_init must be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB', "
                              f"got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path.")

    def saved_form(self) -> PromptTuningConfig:
        # Loading overwrites the initial prompt, so do not fetch the tokenizer a text initialisation needs.
        return dataclasses.replace(self, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                                   tokenizer_name_or_path=None)

    def build_layers(self, model: nn.Module) -> dict[str, PromptEncoder]:
        if hasattr(model, ENCODER_PATH):
            raise ConfigError(f"{type(model).__name__} already has an attribute {ENCODER_PATH!r}.")
        return {ENCODER_PATH: PromptEncoder(self, self._initial_prompt(model))}

    def _initial_prompt(self, model: PreTrainedModel) -> torch.Tensor:
        embedding = model.get_input_embeddings()
        n = self.num_virtual_tokens * self.num_transformer_submodules  # HF PEFT's row count; the first n are used
        if self.prompt_tuning_init == "RANDOM":
            return torch.randn(n, self.token_dim, device=embedding.weight.device)
        if self.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, embedding.num_embeddings, (n,))
        else:
            ids = torch.tensor(self._text_token_ids())
        with torch.no_grad():
            return embedding(ids.to(embedding.weight.device)).detach().float().clone()

    def _text_token_ids(self) -> list[int]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        ids = tokenizer(self.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise ConfigError(f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} gives no tokens.")
        n = self.num_virtual_tokens * self.num_transformer_submodules
        return (ids * math.ceil(n / len(ids)))[:n]  # repeated or cut to n, as HF PEFT does


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments all by name, so a hook can rewrite them whichever way the caller passed them."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}))
    return named


def is_later_step(cache: Any) -> bool:
    """Whether a forward continues from a cache (a generation step after the first): the virtual tokens are then
    already in it, put there by the first step."""
    return isinstance(cache, Cache) and cache.get_seq_length() > 0


def prepend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A 2D attention mask with ``n`` attended positions in front (the virtual tokens)."""
    if mask is None or mask.dim() != 2:
        return mask
    return torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)


class PromptEncoder(AdapterLayer):
    """Holds the soft prompt and, through a forward pre-hook on the transformers model (on an encoder-decoder's
    encoder), puts it in front of the input embeddings. Added to the model as ``prompt_encoder``; it replaces no
    module."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("prompt_embeddings",)
    disk_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "prompt_embeddings"}
    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = (
        "Cannot merge prompt tuning into the model: its virtual tokens are extra inputs in front "
        "of every sequence, not a change to any weight. Keep the adapter loaded (load_adapter) "
        "or serve it with HF PEFT."
    )

    def __init__(self, config: PromptTuningConfig, initial: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        # (n x num_transformer_submodules, token_dim), fp32 as in HF PEFT
        self.prompt_embeddings = nn.Parameter(initial.to(torch.float32))
        self._handles: list[RemovableHandle] = []

    def disk_key(self, path: str, name: str) -> str:
        return self.disk_names[name]  # HF PEFT's one model-level tensor, no module path

    def bind(self, model: nn.Module) -> None:
        if not is_encoder_decoder(model):
            self._handles.append(model.register_forward_pre_hook(self._prepend, with_kwargs=True))
            return
        # generate() runs the encoder on its own, then the model once per token with the encoder's output.
        self._handles += [model.get_encoder().register_forward_pre_hook(self._prepend, with_kwargs=True),
                          model.get_decoder().register_forward_pre_hook(self._attend_to_prompt, with_kwargs=True)]

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return (), self.with_prompt(model, call_kwargs(model, args, kwargs))

    def _attend_to_prompt(self, decoder: nn.Module, args: tuple,
                          kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The decoder's cross-attention mask with the virtual positions attended: the model hands the decoder the
        ``attention_mask`` it was given, one entry per real token, next to encoder states that also hold the
        prompt's."""
        kwargs = call_kwargs(decoder, args, kwargs)
        mask, states = kwargs.get("encoder_attention_mask"), kwargs.get("encoder_hidden_states")
        n = self.num_virtual_tokens
        if mask is not None and states is not None and mask.dim() == 2 and mask.shape[1] + n == states.shape[1]:
            kwargs["encoder_attention_mask"] = prepend_mask(mask, n)
        return (), kwargs

    def with_prompt(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a call to ``model`` (or to its body, which ``causal_lm_loss`` calls directly)
        with the virtual tokens put in front: what the hook hands the model's forward."""
        kwargs = dict(kwargs)
        n = self.num_virtual_tokens
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = prepend_mask(kwargs["attention_mask"], n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = None  # positions follow the lengthened sequence (HF PEFT drops them too)
        if is_later_step(kwargs.get("past_key_values")):
            return kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        batch = embeds.shape[0]
        prompt = self.prompt_embeddings[:n].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat((prompt, embeds), dim=1)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if self.config.task_type == "CAUSAL_LM" and labels is not None:
            kwargs["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:  # HF PEFT: type 0 for the virtual tokens of a classifier, dropped for an LM
            prefix = token_types.new_zeros(batch, n)
            kwargs["token_type_ids"] = torch.cat((prefix, token_types), 1) if self.config.task_type == "SEQ_CLS" else None
        return kwargs

    def unload(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.prompt_embeddings.shape[1]}"
