"""``PeftCallback``: adds an adapter to the transformers model inside a LightningModule.

Hooks, in Lightning's order of events:

- ``setup`` (before ``configure_model`` and before the strategy moves, wraps and builds optimizers): the model
  is built now if the module creates it in ``configure_model``, prepared by a ``PeftStrategy`` (quantized,
  streamed in from its checkpoint), then the adapter is injected and the base frozen,
  so DDP/FSDP wrap the adapted model and ``configure_optimizers`` sees it. ``configure_model`` is called a second
  time here: one that builds a new model each call (Lightning's call would drop the adapted one) is refused with
  the one-line fix before any optimizer exists; no public hook runs later and still before them. Under FSDP it takes
  ``PeftFSDPStrategy``, which keeps the adapter whole on every rank (``fsdp.py``); Lightning's ``FSDPStrategy``,
  which would shard it, is refused. Parameter counts are taken here, before FSDP shards the base.
- ``on_fit_start`` (optimizers exist, training state not yet restored): frozen tensors are dropped from the
  optimizers, or an optimizer over the adapter is built if the module configured none; parameters a method
  trains at another rate (LoRA+'s B matrices) move to param groups of their own; parameter counts logged.
- ``on_save_checkpoint``: the checkpoint keeps only what trains (plus the adapter's record), never the base.

A method may add work to each training step (``AdapterConfig.training_hooks``; AdaLoRA does):

- ``on_before_optimizer_step``: the gradient of the method's regulariser is added to the parameters'
  gradients. Lightning offers no hook that replaces the loss; adding ``∇R`` to the accumulated gradients equals
  backpropagating ``loss + R`` (R does not depend on the batch), and here it is exact under gradient
  accumulation (once per step), AMP (Lightning has unscaled the gradients) and DDP (R is the same on every
  rank, and ``torch.autograd.grad`` fires no DDP reduction hooks); clipping comes after, as it should.
  The logged loss is the user's, without R.
- ``on_train_batch_end``: after a batch that stepped the optimizer, the method's ``after_optimizer_step`` runs
  (AdaLoRA's rank allocation), with the gradients still in place: Lightning zeroes them only at the next step.
- ``state_dict`` / ``load_state_dict``: the method's training state (importance scores, masks) rides in the
  checkpoint with the callback's, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.distributed.fsdp import FullyShardedDataParallel
from typing_extensions import override

from lightning_peft.adapter_io import FINGERPRINT_KEY
from lightning_peft.checkpoint import AdapterCheckpointIO
from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.fingerprint import base_fingerprint
from lightning_peft.fsdp import PeftFSDPStrategy, clean_name
from lightning_peft.methods.base import AdapterConfig, TrainingHooks
from lightning_peft.optim import OptimName, build_optimizer, split_lr_groups
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.surgery import active_config, adapter_layers, attach, count_parameters, find_transformer


_REBUILDS = (
    "The LightningModule builds a new model each time configure_model is called, so Lightning's own call would "
    "throw away the model PeftCallback put the adapter in (and leave the optimizer nothing to train). Make "
    "configure_model return early when the model exists, as Lightning requires: start it with "
    "`if self.model is not None: return`."
)


class PeftCallback(Callback):
    """Parameter-efficient fine-tuning of the transformers model held by the LightningModule.

    Args:
        adapter: the method and its hyper-parameters, e.g. ``LoraConfig(r=16, target_modules=["q_proj", "v_proj"])``.
        learning_rate, weight_decay, optim: used only when the module's ``configure_optimizers`` returns None;
            then an optimizer over the adapter's parameters is built (``optim`` as in transformers).

    Example::

        trainer = Trainer(callbacks=[PeftCallback(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))])
    """

    def __init__(
        self,
        adapter: AdapterConfig,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        optim: OptimName = "auto",
    ) -> None:
        if not isinstance(adapter, AdapterConfig):
            raise TypeError(f"adapter must be an adapter config such as LoraConfig(...), got {type(adapter).__name__}.")
        self.adapter = adapter
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optim = optim
        self._module: pl.LightningModule | None = None
        self._prefix = ""
        self._hooks: TrainingHooks | None = None
        self._hooks_state: dict[str, Any] = {}
        self._stepped = False
        self._counts = (0, 0)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy) and not isinstance(trainer.strategy, PeftFSDPStrategy):
            raise ConfigError(
                "PeftCallback under FSDP needs PeftFSDPStrategy (strategy='peft_fsdp'), Lightning's FSDPStrategy "
                "with the adapter kept whole on every rank: FSDPStrategy would shard it with the base, so "
                "save_adapter could not write it from rank 0 and checkpoints would gather the whole base."
            )
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model after this hook and requires it to be idempotent: building the model
            # here, in the same contexts Lightning would use, lets the adapter go in before the strategy wraps it.
            # A second call now shows whether Lightning's would replace the adapted model: no public hook runs
            # between Lightning's call and configure_optimizers, so this is the earliest point to say so.
            with (
                trainer.strategy.tensor_init_context(),
                trainer.strategy.model_sharded_context(),
                trainer.precision_plugin.module_init_context(),
            ):
                pl_module.configure_model()
                built = find_transformer(pl_module)[1]
                pl_module.configure_model()
            if find_transformer(pl_module)[1] is not built:
                raise ConfigError(_REBUILDS)
        self._prefix, model = find_transformer(pl_module)
        if isinstance(trainer.strategy, PeftStrategyMixin):
            trainer.strategy.prepare_model(pl_module, self.adapter)  # quantize / stream in the base first
        if active_config(model) is None:
            if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                raise ConfigError(
                    "configure_model wrapped layers in FSDP before the adapter went in; leave the wrapping to the "
                    "strategy (PeftFSDPStrategy wraps each transformer block, or pass auto_wrap_policy)."
                )
            attach(model, self.adapter)
        self._counts = count_parameters(pl_module)  # once FSDP shards the base, each rank would count its shard
        self._module = pl_module
        pl_module.strict_loading = False  # checkpoints hold the adapter only; _validate_checkpoint checks them
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AdapterCheckpointIO(validate=self._validate_checkpoint,
                                                                 prepare=self._adapter_only)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _, model = find_transformer(pl_module)
        if active_config(model) is None:
            raise ConfigError(
                "The model lost its adapter between PeftCallback's setup and fit: a hook that runs after it (the "
                "module's setup) built a new model. Build the model once, in __init__ or in configure_model "
                "starting with `if self.model is not None: return`."
            )
        self._prune_optimizers(trainer, pl_module)
        self._split_lr_groups(trainer, model)
        steps = trainer.estimated_stepping_batches
        self._hooks = active_config(model).training_hooks(model, int(steps) if math.isfinite(steps) else None)
        if self._hooks is not None and self._hooks_state:
            self._hooks.load_state_dict(self._hooks_state)
        trainable, total = self._counts
        rank_zero_info(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def _prune_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._method_optimizer(trainer, pl_module):
            return
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        trainable_ids = {id(p) for p in trainable}
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        if not optimized & trainable_ids:
            optim = self.optim
            if optim == "auto" and isinstance(trainer.strategy, PeftStrategyMixin):
                optim = trainer.strategy.default_optim
            trainer.optimizers = [
                build_optimizer(trainable, optim, self.learning_rate, self.weight_decay,
                                on_cuda=pl_module.device.type == "cuda")
            ]
            rank_zero_info(f"No optimizer from configure_optimizers: built {type(trainer.optimizers[0]).__name__} "
                           f"(lr={self.learning_rate}) over {len(trainable)} adapter tensors.")
            return
        dropped = 0
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                kept = [p for p in group["params"] if p.requires_grad]
                dropped += len(group["params"]) - len(kept)
                group["params"] = kept
        if dropped:
            rank_zero_info(f"Removed {dropped} frozen tensors from the optimizers; they stay bit-identical.")
        left_out = trainable_ids - optimized
        if left_out:
            rank_zero_warn(f"{len(left_out)} trainable adapter tensors are in no optimizer and will not train; "
                           f"pass self.parameters() (frozen ones are removed for you).")

    def _method_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Install the optimizer the method must train with (GaLore's), if it has one; True when installed.

        A module whose ``configure_optimizers`` returned another optimizer is refused: replacing it silently
        would drop the user's settings, and keeping it would not be the method."""
        model = find_transformer(pl_module)[1]
        config = active_config(model)
        own = config.build_optimizer(model, self.learning_rate, self.weight_decay)
        if own is None:
            return False
        configured = [opt for opt in trainer.optimizers if any(group["params"] for group in opt.param_groups)]
        if not configured:
            trainer.optimizers = [own]
            rank_zero_info(f"{type(config).__name__}: built {type(own).__name__} (lr={self.learning_rate}).")
            return True
        if all(isinstance(opt, type(own)) for opt in configured):
            return False
        name = type(config).__name__
        raise ConfigError(
            f"{name} trains with its own optimizer ({type(own).__name__}), but configure_optimizers returned "
            f"{', '.join(type(opt).__name__ for opt in configured)}. Return None from configure_optimizers to let "
            f"PeftCallback build it (learning_rate and weight_decay from PeftCallback; rank, update_proj_gap, "
            f"scale and optim from {name}), or build it there with "
            f"`{name}.build_optimizer(model, lr, weight_decay)` to add a scheduler."
        )

    def _split_lr_groups(self, trainer: pl.Trainer, model: torch.nn.Module) -> None:
        """Give the parameters the method trains at another rate (LoRA+'s B matrices) param groups of their own, in
        the optimizers just pruned or built, and teach their schedulers the new groups."""
        ratios = {id(param): ratio for param, ratio in active_config(model).lr_ratios(model)}
        if not ratios:
            return
        for optimizer in trainer.optimizers:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            moved = split_lr_groups(optimizer, ratios, schedulers)
            if moved:
                rank_zero_info(f"{moved} adapter tensors train at {sorted(set(ratios.values()))} times the learning "
                               f"rate of their group (LoRA+).")

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._stepped = True
        penalty = self._hooks.regularizer() if self._hooks is not None else None
        if penalty is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stepped and self._hooks is not None:
            self._hooks.after_optimizer_step(trainer.global_step)
        self._stepped = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"training_hooks": self._hooks.state_dict()} if self._hooks is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._hooks_state = state_dict.get("training_hooks", {})
        if self._hooks is not None and self._hooks_state:  # restored after on_fit_start
            self._hooks.load_state_dict(self._hooks_state)

    def checkpoint_keys(self, pl_module: pl.LightningModule) -> set[str]:
        """State-dict keys a checkpoint keeps: every trainable parameter and every adapter tensor."""
        keys = {clean_name(name) for name, p in pl_module.named_parameters() if p.requires_grad}
        prefix = f"{self._prefix}." if self._prefix else ""
        for path, layer in adapter_layers(find_transformer(pl_module)[1]).items():
            keys.update(clean_name(f"{prefix}{path}.{name}") for name in layer.adapter_parameters())
        return keys

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        keys = self.checkpoint_keys(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        model = find_transformer(pl_module)[1]
        checkpoint["peft"] = {"adapter_config": active_config(model).to_dict(), "model_prefix": self._prefix,
                              FINGERPRINT_KEY: base_fingerprint(model)}

    def _adapter_only(self, checkpoint: dict[str, Any]) -> None:
        """Trim a checkpoint that did not pass through ``on_save_checkpoint``: Lightning skips callbacks' hooks
        for weights-only saves (``ModelCheckpoint(save_weights_only=True)``), which would write the whole base."""
        if "peft" not in checkpoint and self._module is not None:
            self.on_save_checkpoint(self._module.trainer, self._module, checkpoint)

    def _validate_checkpoint(self, checkpoint: dict[str, Any], path: str) -> None:
        """Refuse, before Lightning restores anything, a checkpoint whose tensors do not fit the adapted module."""
        meta = checkpoint.get("peft")
        if self._module is None or not isinstance(meta, dict):
            raise AdapterMismatchError(
                f"{path} was not written under PeftCallback (it has no adapter record); resume from a checkpoint "
                f"of this run, or load base weights into the model before fitting."
            )
        config = active_config(find_transformer(self._module)[1])
        saved_type = (meta.get("adapter_config") or {}).get("peft_type")
        if saved_type != config.peft_type:
            raise AdapterMismatchError(
                f"{path} holds a {saved_type} adapter but this run trains {config.peft_type}; "
                f"resume with the adapter config the checkpoint was written with."
            )
        state = checkpoint.get("state_dict", {})
        # Parameters, not state_dict(): under FSDP that would gather the base on every rank.
        own = {clean_name(n): p for n, p in self._module.named_parameters(remove_duplicate=False)}
        expected = self.checkpoint_keys(self._module)
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state.keys() & expected
                 if state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise AdapterMismatchError(
                f"{path} does not fit this module's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape mismatches {wrong[:3]}. Resume with the same model and adapter config as the run that "
                f"wrote it."
            )
