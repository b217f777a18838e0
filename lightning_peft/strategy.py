"""``PeftStrategy`` and ``PeftDDPStrategy``: QLoRA the Lightning way, the base prepared before the device move.

Preparing the base means, in this order: quantize every linear layer not skipped (``QuantizationConfig``), fill a
model created on the meta device from its pretrained directory tensor by tensor (``streaming``), freeze the
base with norms (and the modules trained in full) in float32, and switch on gradient checkpointing.

When it happens, and why there: the adapter must sit on top of the quantized layers, and ``PeftCallback``
injects it in its ``setup`` hook, which Lightning runs before ``strategy.setup``. So the callback asks the
strategy to prepare the model (``prepare_model``) right after building it and right before injecting. Doing it
in a strategy hook instead would need one that runs before callbacks' ``setup`` and after ``configure_model``;
there is none. ``strategy.setup`` also calls ``prepare_model`` (a no-op when done) for a run without the
callback; either way it happens before ``model_to_device()`` and before the DDP wrap.

Precision: ``strategy.setup`` lets the precision plugin convert the whole module (``"bf16-true"``:
``module.to(bfloat16)``) and then calls ``model_to_device()``. What must keep its dtype (the float32 adapter, the
norms and heads ``prepare_model`` holds in float32, the packed data of 4-bit layers) is held at the start of
``setup`` and given back, the very tensors, in ``model_to_device`` before the move: the only public step between
the conversion and the DDP wrap.

What streaming reads: ``checkpoint_dir`` when given, else the LightningModule's ``pretrained_source`` (a
``PretrainedSource``: a directory, or a GGUF file in it), else the meta model's ``name_or_path``, which
``AutoConfig.from_pretrained(path)`` records. A model that already holds weights is quantized in place and
never read from disk. ``trainer.init_module(empty_init=True)`` creates the model on the meta device; the
built-in modules create theirs there when the strategy quantizes (``streams_pretrained``) and record their source.

Registered with Lightning's ``StrategyRegistry``: ``"peft"``, ``"peft_ddp"`` (no quantization) and ``"qlora"``,
``"qlora_ddp"`` (NF4, double quantization, bfloat16 compute).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.optim import OptimName, repage
from lightning_peft.quantization import (
    QuantizationConfig,
    is_quantized,
    quantize_model,
    skip_paths,
    upcast_for_stability,
)
from lightning_peft.streaming import PretrainedSource, meta_tensor_names, stream_load
from lightning_peft.surgery import adapter_layers, find_transformer, modules_to_save_paths, resolve_config


class PeftStrategyMixin:
    """What both strategies add to their Lightning parent: base preparation at setup and meta-device init."""

    quantization: QuantizationConfig | None
    checkpoint_dir: str | None
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, Any]

    def _init_peft(self, quantization: QuantizationConfig | None, checkpoint_dir: str | os.PathLike | None,
                   gradient_checkpointing: bool, gradient_checkpointing_kwargs: dict[str, Any] | None) -> None:
        if quantization is not None and not isinstance(quantization, QuantizationConfig):
            raise ConfigError(f"quantization must be a QuantizationConfig or None, got {type(quantization).__name__}.")
        self.quantization = quantization
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.gradient_checkpointing = gradient_checkpointing
        self.gradient_checkpointing_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self._prepared: list[nn.Module] = []  # a list, not a WeakSet: spawn launchers pickle the strategy
        self._float32_modules: list[nn.Module] = []  # what prepare_model holds in float32 (norms, heads)
        self._held: list[tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def default_optim(self) -> OptimName:
        """What ``PeftCallback(optim="auto")`` builds under this strategy: paged AdamW for a quantized base."""
        return "paged_adamw_32bit" if self.quantization is not None else "auto"

    @property
    def streams_pretrained(self) -> bool:
        """Whether a module that loads a pretrained base (the built-in ones do) should create it on the meta device
        for ``prepare_model`` to stream in: when the base is quantized, so its full-precision weights never exist
        whole. Unquantized, ``from_pretrained`` holds each weight once anyway."""
        return self.quantization is not None

    @property
    def reads_pretrained(self) -> bool:
        """Whether this process reads a meta model's weights from disk; ``PeftFSDPStrategy`` reads on rank 0 only
        and leaves the other ranks' base on the meta device, to be filled, shard by shard, at the wrap."""
        return True

    def prepare_model(self, pl_module: pl.LightningModule, adapter: AdapterConfig | None = None) -> None:
        """Quantize, stream-load, freeze and checkpoint the transformers model of ``pl_module`` (once).

        ``adapter`` names the modules it trains in full (``modules_to_save``), which stay unquantized.
        """
        _, model = find_transformer(pl_module)
        if any(model is done for done in self._prepared):
            return
        if self.quantization is not None and adapter is not None and adapter.quantized_base_refusal:
            raise ConfigError(f"{type(adapter).__name__} cannot train on a quantized base: "
                              f"{adapter.quantized_base_refusal}")
        device = self.root_device
        source = self._weight_source(pl_module, model) if meta_tensor_names(model) else None
        keep = set()
        if self.quantization is not None:
            if adapter is not None:
                keep = set(modules_to_save_paths(model, resolve_config(model, adapter)))
            replaced = quantize_model(model, self.quantization, device, skip_paths(model, self.quantization, keep))
            bits = 4 if self.quantization.load_in_4bit else 8
            rank_zero_info(f"Quantized {len(replaced)} linear layers to {bits} bits.")
        if source is not None and self.reads_pretrained:
            # A module's own source asks for what from_pretrained(source) gives: a head the checkpoint lacks is new.
            initialized = stream_load(model, source, device,
                                      initialize_missing=source is getattr(pl_module, "pretrained_source", None))
            origin = source.path if source.gguf_file is None else f"{source.gguf_file} in {source.path}"
            rank_zero_info(f"Loaded the base weights from {origin}, tensor by tensor"
                           + (f"; newly initialized: {', '.join(initialized)}." if initialized else "."))
        if self.quantization is not None:
            model.requires_grad_(False)
            self._float32_modules.extend(upcast_for_stability(model, sorted(keep)))
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=self.gradient_checkpointing_kwargs)
            if self.gradient_checkpointing_kwargs.get("use_reentrant"):
                # Reentrant checkpointing only backpropagates into segments whose input requires grad; with a
                # frozen embedding nothing would, so the embedding output is made to.
                model.enable_input_require_grads()
        self._prepared.append(model)

    def _weight_source(self, pl_module: pl.LightningModule, model: nn.Module) -> PretrainedSource:
        """Where a meta model's weights are read: ``checkpoint_dir``, else the module's ``pretrained_source``,
        else the model's ``name_or_path``."""
        recorded = getattr(pl_module, "pretrained_source", None)
        if self.checkpoint_dir is None and isinstance(recorded, PretrainedSource):
            return recorded
        directory = self.checkpoint_dir or getattr(model, "name_or_path", None) or None
        if directory is None or not Path(directory).is_dir():
            raise ConfigError(
                f"{type(model).__name__} is on the meta device and its weights must be read from a pretrained "
                f"directory, but {'none is known' if directory is None else f'{directory!r} is not a directory'}. "
                f"Create it from AutoConfig.from_pretrained(path) or pass PeftStrategy(checkpoint_dir=path)."
            )
        return PretrainedSource(directory)

    def setup(self, trainer: pl.Trainer) -> None:
        self.prepare_model(trainer.lightning_module)  # before the parent moves and wraps the model
        # The parent's setup lets the precision plugin convert the whole module first ("bf16-true": module.to(
        # bfloat16)). What must keep its dtype is held here and given back before the device move and the wrap.
        self.hold_kept_dtypes(trainer.lightning_module)
        super().setup(trainer)

    def hold_kept_dtypes(self, pl_module: pl.LightningModule) -> None:
        """Hold the data of ``dtype_kept_parameters`` for ``restore_held_dtypes`` to give back after the precision
        plugin's conversion."""
        self._held = [(p, p.data) for p in self.dtype_kept_parameters(pl_module) if p.is_floating_point()]

    def dtype_kept_parameters(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        """Parameters a precision plugin's conversion must not change: the adapter's (float32 whatever the base
        dtype), what ``prepare_model`` holds in float32 (norms, modules trained in full; their hooks cast what
        goes in and out), and the packed data of 4-bit layers, whose float storage dtype is raw bytes, not
        values."""
        _, model = find_transformer(pl_module)
        params = [p for layer in adapter_layers(model).values() for p in layer.adapter_parameters().values()]
        params += [p for module in self._float32_modules for p in module.parameters()]
        params += [m.weight for m in model.modules() if is_quantized(m)]
        return params

    def model_to_device(self) -> None:
        """Runs right after the precision plugin converted the module (``Strategy.setup``, ``DDPStrategy.setup``):
        the held parameters get their own data back, bit for bit, then the model moves to the device."""
        self.restore_held_dtypes()
        super().model_to_device()

    def restore_held_dtypes(self) -> None:
        """Give every parameter held at ``setup`` the data it had before the precision plugin's conversion."""
        for param, data in self._held:
            if param.data is not data:
                param.data = data
        self._held = []

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Resuming: the parent loads the optimizer state and moves it to the device, which turns a paged
        optimizer's paged state into plain device tensors; it is paged again here."""
        super().load_optimizer_state_dict(checkpoint)
        moved = sum(repage(optimizer) for optimizer in self.optimizers)
        if moved:
            rank_zero_info(f"Resumed optimizer state: {moved} tensors back in paged memory.")

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and meta_tensor_names(module):
            # The run failed before the weights were read. Lightning's teardown moves the module to the CPU, which
            # a meta tensor cannot do; it would raise over the real error. Give those tensors (empty) CPU storage.
            for sub in module.modules():
                for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                    if tensor.device.type == "meta":
                        empty = torch.empty_like(tensor, device="cpu")
                        setattr(sub, name, nn.Parameter(empty, tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else empty)
        super().teardown()

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``empty_init=True`` creates tensors on the meta device; ``setup`` fills them from the checkpoint."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield


class PeftStrategy(PeftStrategyMixin, SingleDeviceStrategy):
    """One device; the base quantized (and, from the meta device, streamed in) before it is moved there.

    Args:
        quantization: how to quantize the base, or None to keep it in full precision.
        checkpoint_dir: the pretrained directory a meta-device model is filled from; default: the model's
            ``name_or_path``.
        gradient_checkpointing: recompute activations in backward (transformers' own checkpointing).
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint``; default ``{"use_reentrant": False}``.
        device: default: the Trainer's device (``accelerator`` and ``devices``, e.g. ``devices=[1]`` for the second
            GPU).

    Example::

        Trainer(strategy=PeftStrategy(quantization=QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
                callbacks=[PeftCallback(adapter=LoraConfig(r=16, target_modules="all-linear"))])
    """

    strategy_name = "peft"

    def __init__(
        self,
        quantization: QuantizationConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device or "cpu", **kwargs)
        self._device = None if device is None else torch.device(device)
        self._init_peft(quantization, checkpoint_dir, gradient_checkpointing, gradient_checkpointing_kwargs)
        # The Trainer fills this from its accelerator and ``devices`` flag (``devices=[1]``: [cuda:1]) on any
        # strategy that has the attribute, as it does for its parallel strategies.
        self.parallel_devices: list[torch.device] | None = None

    @property
    @override
    def root_device(self) -> torch.device:
        if self._device is not None:
            return self._device
        if self.parallel_devices:
            return torch.device(self.parallel_devices[0])
        return torch.device("cpu")

    @override
    def setup_environment(self) -> None:
        if self._device is None and self.parallel_devices and len(self.parallel_devices) > 1:
            raise ConfigError(
                f"PeftStrategy trains on one device, but the Trainer was given {len(self.parallel_devices)} "
                f"({', '.join(str(d) for d in self.parallel_devices)}). Pass one (devices=1 or devices=[N]), or use "
                f"strategy='peft_ddp' / 'qlora_ddp' for several."
            )
        super().setup_environment()


class PeftDDPStrategy(PeftStrategyMixin, DDPStrategy):
    """``DDPStrategy`` whose processes each prepare (quantize, stream-load) their base before the DDP wrap.

    Takes the arguments of ``PeftStrategy`` (but ``device``) plus those of ``DDPStrategy``.
    """

    strategy_name = "peft_ddp"

    def __init__(
        self,
        quantization: QuantizationConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_peft(quantization, checkpoint_dir, gradient_checkpointing, gradient_checkpointing_kwargs)


def _qlora() -> QuantizationConfig:
    return QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype="bfloat16")


for _cls in (PeftStrategy, PeftDDPStrategy):
    StrategyRegistry.register(_cls.strategy_name, _cls, description=_cls.__name__, override=True)
StrategyRegistry.register("qlora", PeftStrategy, description="PeftStrategy with NF4 double-quantized base",
                          override=True, quantization=_qlora())
StrategyRegistry.register("qlora_ddp", PeftDDPStrategy, description="PeftDDPStrategy with NF4 double-quantized base",
                          override=True, quantization=_qlora())
