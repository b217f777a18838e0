"""Trainable tokens (HF PEFT's ``trainable_token_indices`` of a LoRA config): chosen rows of an embedding train, the
rest of it stays frozen.

New tokens (chat markers added to a vocabulary) need their embedding rows trained, not the whole matrix: Llama-3-8B's
embedding holds 525M numbers, ten of its rows 41k. ``TokenLayer`` keeps the trained rows' values as one parameter,
``trainable_tokens_delta`` (n × dim; HF PEFT's name and layout, saved under
``<embedding>.token_adapter.trainable_tokens_delta``), and puts them in place of the base's rows in its output::

    ids ──► base embedding ──────────────────────────────────┐
     └──► slot of each id (-1: not trained) ──► delta rows ──► where(slot ≥ 0) ──► y

so no step copies the whole embedding. When the output head shares the embedding's weight (tied, as in SmolLM2 or
Llama-3.2-1B) a ``TiedTokenHead`` takes its place too, so the logits of those tokens come from the trained rows, as
in HF PEFT; only the embedding's layer owns and saves the tensor. Merging writes the rows into the embedding's
weight, and so into a tied head's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig, AdapterLayer, adapter_dtype
from lightning_peft.targets import match_module_name


def token_layers(model: nn.Module, indices: list[int] | dict[str, list[int]], config: AdapterConfig,
                 taken: set[str]) -> dict[str, AdapterLayer]:
    """The layers that train ``indices`` of ``model``'s input embedding (a list) or of the embeddings a dict names
    (by path or suffix), plus the tied output head's; ``taken`` holds paths other layers of the adapter replace."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(indices, dict):
        wanted = {}
        for name, rows in indices.items():
            paths = [p for p, m in model.named_modules() if p and match_module_name(p, [name])]
            if len(paths) != 1 or not isinstance(model.get_submodule(paths[0]), nn.Embedding):
                raise ConfigError(f"trainable_token_indices names {name!r}, which matches {paths or 'no module'}; "
                                  f"name one nn.Embedding of {type(model).__name__} by its path or last component.")
            wanted[paths[0]] = rows
    else:
        path = next((p for p, m in model.named_modules() if m is embedding), None)
        if path is None or not isinstance(embedding, nn.Embedding):
            raise ConfigError(f"trainable_token_indices: {type(model).__name__} has no nn.Embedding input embedding; "
                              f"name the embedding with a dict, e.g. {{'embed_tokens': [...]}}.")
        wanted = {path: indices}
    layers: dict[str, AdapterLayer] = {}
    for path, rows in wanted.items():
        if path in taken or any(match_module_name(path, [n]) for n in config.modules_to_save or []):
            raise ConfigError(f"{path} is both in trainable_token_indices and adapted or trained in full "
                              f"(target_modules, modules_to_save); choose one.")
        module = model.get_submodule(path)
        aliases = [p for p, m in model.named_modules(remove_duplicate=False) if p != path and m is not head
                   and (m is module or isinstance(m, nn.Embedding) and m.weight is module.weight)]
        if aliases:  # T5's encoder and decoder embed with the weight of `shared`: wrapping one would miss the others
            raise ConfigError(f"trainable_token_indices: {path} shares its weight with {aliases} in "
                              f"{type(model).__name__}, and training chosen rows of an embedding shared that way is "
                              f"not implemented; train it in full with modules_to_save=[{path.rsplit('.', 1)[-1]!r}].")
        layer = layers[path] = TokenLayer(module, rows, config)
        if head is not None and head is not layer.base_layer and getattr(head, "weight", None) is layer.weight:
            head_path = next(p for p, m in model.named_modules() if m is head)
            if head_path in taken or head_path in wanted:
                raise ConfigError(f"{head_path} is tied to {path}, whose trained tokens it follows: it cannot be "
                                  f"adapted or named in trainable_token_indices as well.")
            layers[head_path] = TiedTokenHead(head, layer)
    return layers


class TokenLayer(AdapterLayer):
    """An embedding whose rows ``token_indices`` are replaced by the trained ``trainable_tokens_delta``."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ("trainable_tokens_delta",)
    disk_names: ClassVar[dict[str, str]] = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}

    def __init__(self, base_layer: nn.Embedding, indices: list[int], config: AdapterConfig) -> None:
        super().__init__()
        weight = base_layer.weight
        vocab = base_layer.num_embeddings
        if not indices or len(set(indices)) != len(indices) or not all(0 <= i < vocab for i in indices):
            raise ConfigError(f"trainable_token_indices must be distinct token ids in [0, {vocab}), got {indices!r}.")
        if weight.device.type == "meta":
            raise ConfigError("trainable_token_indices starts from the embedding's rows, which are not loaded yet "
                              "(meta device): inject the adapter into a model with its weights.")
        self.base_layer, self.config, self.merged = base_layer, config, False
        self.register_buffer("token_indices", torch.tensor(indices, device=weight.device), persistent=False)
        slots = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
        slots[self.token_indices] = torch.arange(len(indices), device=weight.device)
        self.register_buffer("slots", slots, persistent=False)  # token id -> row of the delta, -1 when not trained
        rows = weight.detach()[self.token_indices]
        self.register_buffer("original", rows.clone(), persistent=False)  # what unmerge writes back
        self.trainable_tokens_delta = nn.Parameter(rows.to(adapter_dtype(config, weight)))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if self.merged:
            return result
        slot = self.slots[ids]
        rows = F.embedding(slot.clamp(min=0), self.trainable_tokens_delta).to(result.dtype)
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma's embeddings scale their output
        if scale is not None:
            rows = rows * (scale.to(result.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where((slot >= 0).unsqueeze(-1), rows, result)

    def merged_rows(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.detach().to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.copy_(self.merged_rows())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.index_copy_(0, self.token_indices, self.original)
            self.merged = False

    def unload(self) -> nn.Module:
        self.unmerge()
        return self.base_layer

    def merged_module(self) -> nn.Module:
        self.merge()
        return self.base_layer

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.base_layer.weight.detach() if self.merged else self.merged_rows()}


class TiedTokenHead(AdapterLayer):
    """An output head tied to a ``TokenLayer``'s embedding: the logits of the trained tokens use its rows. It owns
    nothing; merging the embedding merges it (they share the weight)."""

    adapter_parameter_names: ClassVar[tuple[str, ...]] = ()
    disk_names: ClassVar[dict[str, str]] = {}

    def __init__(self, base_layer: nn.Linear, embedding: TokenLayer) -> None:
        super().__init__()
        self.base_layer, self.config = base_layer, embedding.config
        self._embedding = [embedding]  # a list, not a submodule: the embedding is at its own path

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        embedding = self._embedding[0]
        if embedding.merged:
            return result
        rows = F.linear(x, embedding.trainable_tokens_delta.to(x.dtype))
        if self.base_layer.bias is not None:
            rows = rows + self.base_layer.bias[embedding.token_indices].to(rows.dtype)
        return result.index_copy(-1, embedding.token_indices, rows.to(result.dtype))

    def unload(self) -> nn.Module:
        return self.base_layer

    def merge(self) -> None:
        """Nothing of its own: the embedding's merge writes the shared weight."""

    def merged_module(self) -> nn.Module:
        return self.base_layer

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Empty: the head's weight is the embedding's, which an export writes once (``from_pretrained`` ties it)."""
        return {}
