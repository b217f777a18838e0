"""``PeftFSDPStrategy``: FSDP shards the frozen base; the adapter stays whole on every rank, as under DDP.

Why not let FSDP shard the adapter too (Lightning's ``FSDPStrategy`` with ``use_orig_params=True``): a unit that
mixes frozen and trainable tensors gets a gradient buffer as large as its whole shard, frozen part included, and
every adapter tensor becomes a flat slice that no rank holds whole, so ``save_adapter`` on rank 0 and adapter-only
checkpoints would need every rank to gather the base. Here every tensor that trains (and every adapter tensor) is
left out of FSDP (``ignored_states``): the units hold only frozen tensors and need no gradients, and the strategy
averages the adapter's gradients over the ranks itself, once per optimizer step, right after backward (where DDP
would have). The adapter is a fraction of a percent of the model, so its replicas cost little.

What follows from it:

- checkpoints hold the adapter and its optimizer state in the format a single device writes, written by rank 0
  without gathering anything, and are read back through the ``CheckpointIO`` on every rank (Lightning's
  ``FSDPStrategy`` unpickles full checkpoints itself, bypassing it);
- ``save_adapter`` works once ``fit`` ends: the strategy's teardown, which runs before ``on_fit_end``, puts the
  module's own layers back in place of FSDP's wrappers (each rank keeps its shard of the base, so the module cannot
  be trained or run again). During ``fit`` a rank that reads the wrapped module's state dict alone would wait for
  the others: write checkpoints instead. The base's fingerprint is taken before the embedding is sharded.
- the wrap: each of the transformer's blocks (``_no_split_modules``, as ``from_pretrained(device_map=...)`` uses)
  is a unit unless ``auto_wrap_policy`` says otherwise; ``wrap()`` inside ``configure_model`` is refused, since the
  adapter must go in before any wrap. FSDP runs on the CPU too (gloo), which Lightning's ``FSDPStrategy`` refuses.
- a 4-bit base is quantized before the wrap; FSDP flattens its packed weights with the other tensors of a unit and
  casts them to the dtype it trains in, so the storage dtype must be that one: ``bnb_4bit_quant_storage="bfloat16"``
  with ``precision="bf16-true"`` (or ``"float32"`` with ``"32-true"``); mixed precision cannot work. 8-bit weights
  are integers, which FSDP cannot flatten.

Registered as ``"peft_fsdp"`` and ``"qlora_fsdp"`` (NF4, double quantization, bfloat16 compute and storage).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.fingerprint import pin_fingerprint
from lightning_peft.methods.base import AdapterConfig, AdapterLayer
from lightning_peft.quantization import QuantizationConfig
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.surgery import find_transformer, set_submodule

_WRAPPED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_SHARDED = "_lightning_peft_sharded"
# The dtype FSDP holds and computes every tensor in, per precision: a 4-bit base must be stored in it.
_PRECISION_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16"}


def _unwrap(module: nn.Module) -> None:
    """Put back, in place, every module that FSDP or activation checkpointing wrapped inside ``module``, so its
    module paths (and ``save_adapter``'s keys) are the unwrapped ones and no FSDP state-dict hook, a collective,
    runs when one rank reads it. The frozen base keeps each rank's shard."""
    for path, sub in reversed(list(module.named_modules())):  # the innermost wrapper first
        inner = next((getattr(sub, name) for name in _WRAPPED if hasattr(sub, name)), None)
        if path and inner is not None:
            set_submodule(module, path, inner)


def clean_name(name: str) -> str:
    """A parameter's name as in the unwrapped module: without the path segments FSDP and checkpoint wrappers add."""
    for wrapped in _WRAPPED:
        name = name.replace(f"{wrapped}.", "")
    return name


def _replicated_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """What ``PeftFSDPStrategy`` keeps whole on every rank, by clean name: every trainable parameter and every
    adapter tensor."""
    kept = {clean_name(n): p for n, p in module.named_parameters() if p.requires_grad}
    for path, sub in module.named_modules():
        if isinstance(sub, AdapterLayer):
            kept.update({clean_name(f"{path}.{n}"): p for n, p in sub.adapter_parameters().items()})
    return kept


class PeftFSDPStrategy(PeftStrategyMixin, FSDPStrategy):
    """``FSDPStrategy`` that shards the frozen base and keeps the adapter whole on every rank.

    Takes the arguments of ``PeftStrategy`` (but ``device``) plus those of ``FSDPStrategy``; ``auto_wrap_policy``
    defaults to the transformer's blocks. Checkpoints hold only what every rank holds whole (the adapter and the
    tensors that train), so the sharded base is never gathered.

    Example::

        Trainer(accelerator="cuda", devices=8, strategy=PeftFSDPStrategy(), precision="bf16-true",
                callbacks=[PeftCallback(adapter=LoraConfig(r=16, target_modules="all-linear"))])
    """

    strategy_name = "peft_fsdp"

    def __init__(
        self,
        quantization: QuantizationConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if quantization is not None and quantization.load_in_8bit:
            raise ConfigError("FSDP cannot shard 8-bit weights (integers); use load_in_4bit with "
                              "bnb_4bit_quant_storage='bfloat16', or PeftDDPStrategy for an 8-bit base.")
        super().__init__(**kwargs)
        if self._state_dict_type != "full":
            raise ConfigError("PeftFSDPStrategy writes single-file checkpoints (the adapter is whole on every "
                              "rank); leave state_dict_type='full'.")
        self._init_peft(quantization, checkpoint_dir, gradient_checkpointing, gradient_checkpointing_kwargs)
        self._replicated: dict[str, nn.Parameter] = {}

    @override
    def prepare_model(self, pl_module: pl.LightningModule, adapter: AdapterConfig | None = None) -> None:
        storage = self.quantization.bnb_4bit_quant_storage if self.quantization is not None else None
        precision = self.precision_plugin.precision
        if storage is not None and _PRECISION_DTYPES.get(precision) != storage:
            raise ConfigError(
                f"FSDP flattens a 4-bit layer's packed weights with the other tensors of its unit and casts them "
                f"to the dtype it trains in, so both must be that one dtype: precision='bf16-true' with "
                f"bnb_4bit_quant_storage='bfloat16' (or '32-true' with 'float32'); got precision={precision!r} "
                f"and bnb_4bit_quant_storage={storage!r}."
            )
        super().prepare_model(pl_module, adapter)

    @override
    def dtype_kept_parameters(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        """Only what FSDP leaves out of its units (the adapter and what trains): a unit flattens its tensors into
        one of a single dtype, so norms and the 4-bit data take the precision's dtype there."""
        return list(_replicated_parameters(pl_module).values())

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.restore_held_dtypes()  # FSDPStrategy.setup converts the module, then wraps it here (no model_to_device)
        if getattr(model, _SHARDED, False) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ConfigError(
                f"{type(model).__name__} was sharded by FSDP before (a run under FSDP, or wrap() in configure_model) "
                f"and each rank holds only its shard of the base: build the module afresh (load_adapter or "
                f"ckpt_path brings the adapter back)."
            )
        pin_fingerprint(find_transformer(model)[1])
        self._replicated = _replicated_parameters(model)
        with torch.no_grad():
            for param in self._replicated.values():  # FSDP moves only what it manages, and broadcasts nothing
                param.data = param.data.to(self.root_device)
                if self.world_size > 1:
                    dist.broadcast(param.data, src=0)  # the adapter's random init may differ between ranks
        kwargs = dict(self.kwargs)
        kwargs.setdefault("auto_wrap_policy", _block_policy(model))
        kwargs["ignored_states"] = [*_parameters(kwargs.get("ignored_states", [])), *self._replicated.values()]
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # a torch.device: FSDP refuses a CPU run without one
            **kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and isinstance(self.model, FullyShardedDataParallel):
            _unwrap(module)
            setattr(module, _SHARDED, True)
        super().teardown()

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        def closure_then_average() -> Any:
            result = closure()
            self._average_gradients()
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    def _average_gradients(self) -> None:
        """Average the replicated parameters' gradients over the ranks, as DDP would: FSDP reduces only its own."""
        if self.world_size == 1:
            return
        params = [p for p in self._replicated.values() if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.root_device)
        dist.all_reduce(has_grad)  # a tensor unused on one rank still gets the others' gradient, on every rank
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param, n in zip(params, has_grad.tolist()):
            if n:
                by_dtype.setdefault(param.dtype, []).append(param)
        for group in by_dtype.values():  # one all-reduce per dtype, over the gradients laid end to end
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world_size
            for param, grad in zip(group, flat.split([p.numel() for p in group])):
                param.grad = grad.view_as(param)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {name: param.detach() for name, param in self._replicated.items()}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer.state_dict()  # it holds replicated tensors only: the single-device format

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if self.is_global_zero:  # the path as given: FSDPStrategy's makes it a local Path, remote URLs included
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        if Path(path).is_dir():
            raise ConfigError(f"{path} is a directory (a sharded FSDP checkpoint?); {type(self).__name__} writes "
                              f"and resumes single-file checkpoints.")
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        self._load_replicated(checkpoint.pop("state_dict"), path)
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            states = checkpoint.get("optimizer_states", [])
            if len(states) != len(self.optimizers):
                raise ConfigError(f"{path} holds {len(states)} optimizer states, this run has "
                                  f"{len(self.optimizers)} optimizers; resume with the same configure_optimizers.")
            for optimizer, state in zip(self.optimizers, states):
                optimizer.load_state_dict(state)
        return checkpoint

    def _load_replicated(self, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
        unknown = sorted(state.keys() - self._replicated.keys())
        if unknown:
            raise AdapterMismatchError(f"{path} holds tensors this run shards or lacks, e.g. {unknown[:3]}; "
                              f"{type(self).__name__} resumes checkpoints holding the adapter and trained tensors.")
        with torch.no_grad():
            for name, value in state.items():
                self._replicated[name].copy_(value)


def _parameters(states: Any) -> list[nn.Parameter]:
    return [p for s in states for p in (s.parameters() if isinstance(s, nn.Module) else [s])]


def _block_policy(model: nn.Module) -> ModuleWrapPolicy:
    """One FSDP unit per transformer block, the classes the model names in ``_no_split_modules``."""
    names = set(getattr(find_transformer(model)[1], "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    return ModuleWrapPolicy(classes)


def _qlora_fsdp() -> QuantizationConfig:
    return QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")


StrategyRegistry.register(PeftFSDPStrategy.strategy_name, PeftFSDPStrategy, description="PeftFSDPStrategy",
                          override=True)
StrategyRegistry.register("qlora_fsdp", PeftFSDPStrategy, description="PeftFSDPStrategy with NF4 double-quantized "
                          "base stored in bfloat16", override=True, quantization=_qlora_fsdp())
