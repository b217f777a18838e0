"""Several named adapters on one base model: load each once, switch the active one, run the bare base, delete.

Design: the model holds one adapter at a time; the others wait in CPU memory as their config and tensors (the
adapter directory's content, a few MB each). Switching puts back the modules the active adapter replaced (the
base layers themselves: the base is never copied or reloaded, 4-bit layers stay packed), then injects the next
adapter and copies its tensors in. A switch costs one injection, microseconds to milliseconds, and every adapter
in the set may be of another method (LoRA next to IA3 next to a bottleneck adapter), because each is exactly what
``load_adapter`` would build alone. Holding every adapter inside the layers (HF PEFT's per-name dictionaries)
would make switching a flag flip, but every layer of every method would need per-name parameter dicts and a
forward that picks one; that is the cost HF PEFT pays, and one we avoid.

Tensors of the base that an adapter trains in full (``modules_to_save`` heads, biases) are put back to the base's
values when that adapter is switched off, so "no adapter" really is the base model.

Example::

    adapters = NamedAdapters(model)
    adapters.load("support", "adapters/support")
    adapters.load("sql", "adapters/sql")
    adapters.activate("sql")
    with adapters.disabled():
        base_logits = model(**batch).logits
    adapters.delete("support")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_peft.adapter_io import adapter_state_dict, inject_tensors, read_adapter
from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.fingerprint import fingerprint_mismatch
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.surgery import active_config, detach, find_transformer


class NamedAdapters:
    """Named adapters for the transformers model in ``model``; at most one is active (injected) at a time.

    An adapter already injected in the model (e.g. one just trained) is adopted under ``name``; base tensors it
    trained in full (a classification head) cannot be put back when it is switched off, as their original values
    are gone: load such adapters from their directories instead.
    """

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        _, self.model = find_transformer(model)
        self._stored: dict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]] = {}
        self._base_values: list[tuple[torch.Tensor, torch.Tensor]] = []  # base tensors the active one overwrote
        self._flags: dict[str, bool] = {}
        self.active: str | None = None
        config = active_config(self.model)
        if config is not None:
            self._stored[name] = (config, {})
            self.active = name

    @property
    def names(self) -> list[str]:
        return list(self._stored)

    def load(self, name: str, path: str | os.PathLike, strict: bool = False) -> None:
        """Read the adapter at ``path`` (a directory of ours or HF PEFT's, or a checkpoint) and keep it as
        ``name``. It is checked against the model now, by injecting it once; afterwards the adapter that was
        active stays active, or, if none was, ``name`` becomes active. ``strict`` refuses an adapter trained on
        another base (see ``load_adapter``)."""
        if name in self._stored:
            raise ConfigError(f"An adapter named {name!r} is already loaded; delete it first or pick another name.")
        config, tensors, spelling, fingerprint = read_adapter(path)
        if spelling == "disk":
            config = config.saved_form()
        reason = fingerprint_mismatch(self.model, fingerprint)
        if reason is not None:
            message = f"{path} was trained on another base model: {reason}."
            if strict:
                raise AdapterMismatchError(message)
            warnings.warn(message, stacklevel=2)
        previous = self.active
        self._deactivate()
        try:
            self._inject(config, tensors, spelling, path)
        except Exception:
            if previous is not None:
                self.activate(previous)
            raise
        self._stored[name] = (active_config(self.model), {})
        self.active = name
        if previous is not None:
            self.activate(previous)

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter the model runs with."""
        if name not in self._stored:
            raise ConfigError(f"No adapter named {name!r}; loaded: {self.names}.")
        if name == self.active:
            return
        self._deactivate()
        config, tensors = self._stored[name]
        self._inject(config, tensors, "disk", name)
        self.active = name

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Run the bare base model inside the block; the active adapter comes back after it."""
        previous = self.active
        self._deactivate()
        try:
            yield self.model
        finally:
            if previous is not None:
                self.activate(previous)

    def delete(self, name: str) -> None:
        """Forget ``name``; if it is active, the model is left without an adapter."""
        if name not in self._stored:
            raise ConfigError(f"No adapter named {name!r}; loaded: {self.names}.")
        if name == self.active:
            self._deactivate()
        del self._stored[name]

    def _inject(self, config: AdapterConfig, tensors: dict[str, torch.Tensor], spelling: str, source: object) -> None:
        self._flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self._base_values = inject_tensors(self.model, config, tensors, spelling, source)
        self.model.requires_grad_(False)

    def _deactivate(self) -> None:
        """Store the active adapter's tensors (they may have changed), take it out and restore the base."""
        if self.active is None:
            return
        # Stored as a saved directory would hold it, so activation is exactly load_adapter's injection; cloned,
        # as on the CPU the state dict shares storage with the live tensors (the head is restored below).
        tensors = {key: value.clone() for key, value in adapter_state_dict(self.model).items()}
        self._stored[self.active] = (active_config(self.model).saved_form(), tensors)
        detach(self.model)
        with torch.no_grad():
            for tensor, value in self._base_values:
                tensor.copy_(value)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._flags.get(name, param.requires_grad))
        self._base_values = []
        self.active = None
