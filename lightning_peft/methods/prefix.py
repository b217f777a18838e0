"""Prefix tuning (Li & Liang 2021): trainable keys and values in front of every attention layer's own.

::

    prefix (n × num_layers·2·token_dim) ──► split per layer ──► cache: layer i holds (K_i, V_i) of n positions
                                                                  │
    input_ids ──► transformer (frozen) ── attention i attends to [ K_i, V_i | the tokens' keys and values ]

With ``prefix_projection`` the prefix is computed from an ``n × token_dim`` embedding by a two-layer MLP
(``token_dim → encoder_hidden_size → num_layers·2·token_dim``), which trains more stably; HF PEFT saves only
its output, so a saved directory holds the projected prefix while Lightning checkpoints keep the MLP.

The prefix reaches the model through transformers' own cache: a forward pre-hook on the backbone
(``LlamaModel``, ``GPT2Model``, ``BertModel``...) hands it a ``DynamicCache`` already holding the prefix and
lengthens the attention mask, so the tokens sit at positions ``n..n+L-1`` as in HF PEFT. Generation works
unchanged: the first step fills the cache generation created, later steps find the prefix there.
For Llama-style grouped-query attention, keys and values have ``num_key_value_heads`` heads, so ``token_dim``
is ``num_key_value_heads · head_dim`` (HF PEFT's convention).

Two ways the prefix could silently stop acting are refused with a ConfigError instead:

- sliding-window attention (Mistral's config sets ``sliding_window``): a token more than ``sliding_window``
  positions after the virtual tokens no longer attends to them, and a sliding-window cache evicts them first.
  A forward (or generation step) that reaches past the window is refused, naming the limit and the fix
  (shorter sequences, or ``model.config.sliding_window = None``).
- a cache the caller filled without the prefix (``past_key_values`` from elsewhere): its keys and values were
  computed without the prefix, which must come first, so it cannot be added afterwards. Caches the adapted
  model filled carry a mark and continue as usual (copies too).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Cache, DynamicCache, PretrainedConfig, PreTrainedModel

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterLayer
from lightning_peft.methods.prompt import (
    ENCODER_PATH,
    PromptLearningConfig,
    call_kwargs,
    is_encoder_decoder,
    prepend_mask,
)

_HOLDS_PREFIX = "_lightning_peft_holds_prefix"  # set on a cache once the prefix is in it; copied with it


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning; field names as in HF PEFT.

    Example::

        PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512)
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    prefix_projection: bool = False
    """Compute the prefix with an MLP from a small embedding (reparameterisation) instead of training it directly."""
    encoder_hidden_size: int | None = None
    """Hidden width of that MLP; defaults to ``token_dim``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}.")
        if self.encoder_hidden_size is not None and (
            isinstance(self.encoder_hidden_size, bool) or not isinstance(self.encoder_hidden_size, int)
            or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}.")

    def fill_from_model(self, model: PreTrainedModel) -> PrefixTuningConfig:
        if is_encoder_decoder(model):
            raise ConfigError(
                f"Prefix tuning does not support encoder-decoder models such as {type(model).__name__}: HF PEFT "
                f"hands them a prefix for the encoder's self-attention and for both of the decoder's attentions "
                f"(num_transformer_submodules=2, an EncoderDecoderCache), which lightning_peft does not implement. "
                f"Use prompt tuning (PromptTuningConfig, task_type='SEQ_2_SEQ_LM'), or LoRA, DoRA, AdaLoRA or IA3 "
                f"(target_modules='all-linear' works)."
            )
        backbone = model.base_model
        if "past_key_values" not in inspect.signature(backbone.forward).parameters:
            raise ConfigError(f"Prefix tuning hands the prefix to attention as past_key_values, which "
                              f"{type(backbone).__name__} does not take; use prompt tuning or LoRA for this model.")
        filled = super().fill_from_model(model)
        return dataclasses.replace(filled, encoder_hidden_size=self.encoder_hidden_size or filled.token_dim)

    def model_dims(self, model: PreTrainedModel) -> dict[str, int]:
        dims = super().model_dims(model)
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None)
        if kv_heads:  # grouped-query attention: the cache holds the key-value heads only
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dims.update(token_dim=kv_heads * head_dim, num_attention_heads=kv_heads)
        return dims

    def saved_form(self) -> PrefixTuningConfig:
        # HF PEFT saves the prefix after the MLP: as a tensor, that is an unprojected prefix.
        return dataclasses.replace(self, prefix_projection=False) if self.prefix_projection else self

    def build_layers(self, model: nn.Module) -> dict[str, PrefixEncoder]:
        if hasattr(model, ENCODER_PATH):
            raise ConfigError(f"{type(model).__name__} already has an attribute {ENCODER_PATH!r}.")
        return {ENCODER_PATH: PrefixEncoder(self, device=model.get_input_embeddings().weight.device)}


def _check_window(config: PretrainedConfig, n: int, length: int) -> None:
    """Refuse a forward whose last position (virtual tokens included) lies beyond a sliding attention window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types) or length <= window:
        return
    raise ConfigError(
        f"Prefix tuning on a model with sliding-window attention (sliding_window={window}): this forward makes "
        f"the sequence {length} positions long counting the {n} virtual tokens, and its tokens past position "
        f"{window} no longer attend to the virtual tokens (a sliding-window cache also evicts them first), so the "
        f"prefix would silently stop acting. Keep inputs plus generated tokens within {window - n} tokens, or set "
        f"model.config.sliding_window = None to attend over the whole sequence."
    )


class PrefixEncoder(AdapterLayer):
    """Holds the prefix (or the embedding and MLP that compute it) and hands it to every attention layer through
    a forward pre-hook on the backbone. Added to the model as ``prompt_encoder``; it replaces no module."""

    disk_names: ClassVar[dict[str, str]] = {"prompt_embeddings": "prompt_embeddings"}
    mergeable: ClassVar[bool] = False
    merge_refusal: ClassVar[str] = (
        "Cannot merge prefix tuning into the model: its prefix is extra keys and values every "
        "attention layer reads, not a change to any weight. Keep the adapter loaded "
        "(load_adapter) or serve it with HF PEFT."
    )

    def __init__(self, config: PrefixTuningConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_virtual_tokens, self.num_layers = config.num_virtual_tokens, config.num_layers
        self.num_heads, self.head_dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
        width = config.num_layers * 2 * config.token_dim  # every layer's key and value, side by side
        n = config.num_virtual_tokens
        if config.prefix_projection:
            self.embedding = nn.Embedding(n, config.token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size, device=device),
                                           nn.Tanh(), nn.Linear(config.encoder_hidden_size, width, device=device))
            self.adapter_parameter_names = ("embedding.weight", "transform.0.weight", "transform.0.bias",
                                            "transform.2.weight", "transform.2.bias")
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, width, device=device))  # as nn.Embedding inits
            self.adapter_parameter_names = ("prompt_embeddings",)
        self._handles: list[RemovableHandle] = []

    def prefix(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, num_layers · 2 · token_dim)`` keys and values (HF PEFT's saved tensor)."""
        if self.config.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.prompt_embeddings

    def disk_key(self, path: str, name: str) -> str:
        return name if name == "prompt_embeddings" else super().disk_key(path, name)

    def saved_tensors(self, path: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix()}

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix keys and values as ``(batch, heads, n, head_dim)`` tensors."""
        n = self.num_virtual_tokens
        # (n, layers·2·heads·head_dim) → (2·layers, heads, n, head_dim): HF PEFT's layout, so files interchange.
        kv = self.prefix().to(dtype).view(n, 2 * self.num_layers, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    def bind(self, model: nn.Module) -> None:
        self._handles.append(model.base_model.register_forward_pre_hook(self._inject, with_kwargs=True))

    def _inject(self, backbone: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = call_kwargs(backbone, args, kwargs)
        n = self.num_virtual_tokens
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = prepend_mask(kwargs["attention_mask"], n)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n  # the tokens come after the prefix
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        _check_window(backbone.config, n, past + reference.shape[1] + (0 if past else n))
        if past and not getattr(cache, _HOLDS_PREFIX, False):
            raise ConfigError(
                f"past_key_values already holds {past} positions that prefix tuning did not fill: they were computed "
                f"without the prefix, which must come first in every layer's keys and values. Pass no cache (or an "
                f"empty one) to the first forward and continue with the past_key_values it returns."
            )
        if past:  # a later generation step: the first one put the prefix in
            return (), kwargs
        if getattr(backbone, "is_gradient_checkpointing", False) and backbone.training:
            raise ConfigError("Prefix tuning cannot train with gradient checkpointing: recomputing a layer would "
                              "add the prefix to the cache twice. Disable gradient checkpointing.")
        if cache is None:
            cache = DynamicCache(config=backbone.config)
        elif not isinstance(cache, DynamicCache):
            raise ConfigError(f"Prefix tuning puts its prefix in a DynamicCache, not a {type(cache).__name__}; "
                              f"generate with the default cache (cache_implementation='dynamic').")
        for layer, (keys, values) in enumerate(self.key_values(reference.shape[0], backbone.dtype)):
            cache.update(keys, values, layer)
        setattr(cache, _HOLDS_PREFIX, True)
        kwargs["past_key_values"] = cache
        return (), kwargs

    def unload(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"prefix_projection={self.config.prefix_projection}")
