"""``PeftCallback``: adds an adapter to the transformers model inside a LightningModule.

Hooks, in Lightning's order of events:

- ``setup`` (before ``configure_model`` and before the strategy moves, wraps and builds optimizers): the model
  is built now if the module creates it in ``configure_model``, prepared by a ``PeftStrategy`` (quantized,
  streamed in from its checkpoint), then the adapter is injected and the base frozen (a model already wrapped by
  HF PEFT's ``get_peft_model`` is refused first), so DDP/FSDP wrap the adapted model and ``configure_optimizers``
  sees it. That is our one call of ``configure_model``; from then until ``on_fit_start`` a torch module
  registration hook refuses, as it happens, any assignment that replaces the adapted model (Lightning's own
  ``configure_model`` call of a module that builds a new model each call, or the module's ``setup``), with the
  one-line fix and before any optimizer exists: no public hook runs later and still before them. Under FSDP it takes
  ``PeftFSDPStrategy``, which keeps the adapter whole on every rank (``fsdp.py``); Lightning's ``FSDPStrategy``,
  which would shard it, is refused. Parameter counts are taken here, before FSDP shards the base.
- ``on_fit_start`` (optimizers exist, training state not yet restored): frozen tensors are dropped from the
  module's optimizers, or an optimizer over the adapter is built if the module configured none; optimizers that
  hold no adapter parameter are refused, never replaced; parameters a method trains at another rate (LoRA+'s B
  matrices) move to param groups of their own; parameter counts logged. Before that, the doctor's checks
  (``doctor.py``: targets, learning rate, alpha/r, tokenizer, data, checkpointing...) log their warnings and stop
  the run on an error, before any step.
- the first training batch (``on_train_batch_start``, ``on_after_backward``, ``on_train_batch_end``): labels that
  copy the inputs are warned about; a first backward that reaches no adapter parameter, or no backward at all
  (``training_step`` returned None), stops the run before the optimizer steps.
- ``on_save_checkpoint``: the checkpoint keeps only what trains (plus the adapter's record), never the base
  (``checkpoint.py``).

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
  checkpoint with the callback's, so a resumed run continues the same schedule; it is moved to each rank's
  device when restored.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_peft.accumulation import rescale_step
from lightning_peft.checkpoint import PEFT_KEY, AdapterCheckpointIO, adapter_keys, adapter_record
from lightning_peft.doctor import (
    diagnose,
    first_step_findings,
    label_findings,
    optimizer_findings,
    report,
    run_facts,
    wrapped_findings,
)
from lightning_peft.errors import AdapterMismatchError, ConfigError
from lightning_peft.fsdp import clean_name, is_fsdp
from lightning_peft.methods.base import AdapterConfig, TrainingHooks
from lightning_peft.optim import OptimName, build_optimizer, split_lr_groups
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.surgery import active_config, attach, count_parameters, find_transformer

_NO_OPTIMIZER_WARNING = "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer"
DEFAULT_LEARNING_RATE = 2e-4  # for a module that configures no optimizer and names no learning rate


_REPLACED = (
    "The model lost its adapter: {where} was assigned a new model after PeftCallback put the adapter in (by a "
    "configure_model that builds a new model each call, which Lightning calls again after the callback's setup, "
    "or by the module's setup hook), which would leave the optimizer nothing to train. Build the model once: make "
    "configure_model return early when the model exists, as Lightning requires: start it with "
    "`if self.model is not None: return`."
)


class PeftCallback(Callback):
    """Parameter-efficient fine-tuning of the transformers model held by the LightningModule.

    Args:
        adapter: the method and its hyper-parameters, e.g. ``LoraConfig(r=16, target_modules=["q_proj", "v_proj"])``.
        learning_rate: only for a module whose ``configure_optimizers`` returns None: the rate of the optimizer
            built over the adapter's parameters. Default: the module's ``learning_rate`` (or ``lr``) attribute or
            hyper-parameter, else 2e-4.
        weight_decay: only for a module whose ``configure_optimizers`` returns None (default 0).
        optim: only for a module whose ``configure_optimizers`` returns None: the optimizer, named as in
            transformers (default ``"auto"``: paged AdamW on CUDA, torch's AdamW elsewhere).

    A module that configures its own optimizers keeps them, and its learning rate; they must hold the adapter's
    parameters (``self.parameters()`` is fine: frozen ones are removed). Setting these three as well is refused,
    as they would do nothing.

    Example::

        trainer = Trainer(callbacks=[PeftCallback(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))])
    """

    def __init__(
        self,
        adapter: AdapterConfig,
        learning_rate: float | None = None,
        weight_decay: float | None = None,
        optim: OptimName | None = None,
    ) -> None:
        if not isinstance(adapter, AdapterConfig):
            raise TypeError(f"adapter must be an adapter config such as LoraConfig(...), got {type(adapter).__name__}.")
        self.adapter = adapter
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optim = optim
        self._module: pl.LightningModule | None = None
        self._hooks: TrainingHooks | None = None
        self._hooks_state: dict[str, Any] = {}
        self._stepped = False
        self._counts = (0, 0)
        self._first_batch_done = False
        self._backward_ran = False
        self._watch: RemovableHandle | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning warns that a module whose configure_optimizers returns None fits with no optimizer; this
        # callback then builds one over the adapter (on_fit_start), so the warning would be untrue.
        warnings.filterwarnings("ignore", message=re.escape(_NO_OPTIMIZER_WARNING))
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ConfigError(
                "PeftCallback under FSDP needs PeftFSDPStrategy (strategy='peft_fsdp'), which shards the base and "
                "keeps the adapter whole on every rank: Lightning's FSDPStrategy would shard it with the base, so "
                "save_adapter could not write it from rank 0 and checkpoints would gather the whole base."
            )
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model after this hook and requires it to be idempotent: building the model
            # here, in the contexts Lightning uses, lets the adapter go in before the strategy wraps it. This is our
            # one call; Lightning's, next, must keep the model (see _watch_model).
            with (
                trainer.strategy.tensor_init_context(),
                trainer.strategy.model_sharded_context(),
                trainer.precision_plugin.module_init_context(),
            ):
                pl_module.configure_model()
        _, model = find_transformer(pl_module)
        report(wrapped_findings(pl_module))
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
        self._watch_model(pl_module, model)
        pl_module.strict_loading = False  # checkpoints hold the adapter only; _validate_checkpoint checks them
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AdapterCheckpointIO(validate=self._validate_checkpoint,
                                                                 prepare=self._adapter_only)

    def _watch_model(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """Refuse, as it happens, an assignment that replaces the adapted model in ``pl_module`` (Lightning's own
        configure_model call, the module's setup hook): no public hook runs between those and configure_optimizers,
        so this is the one place to refuse before any optimizer exists. Watching stops at fit start or teardown.
        The strategy wrapping the model (DDP, FSDP: ``.module`` is the model) is not a replacement."""
        path = next(p for p, m in pl_module.named_modules() if m is model)
        parent_path, _, name = path.rpartition(".")
        parent = pl_module.get_submodule(parent_path)

        def refuse_replacement(module: nn.Module, attribute: str, value: nn.Module | None) -> None:
            if module is parent and attribute == name and value is not model and getattr(value, "module", None) \
                    is not model:
                self._stop_watching()
                raise ConfigError(_REPLACED.format(where=f"{type(pl_module).__name__}.{path}"))

        self._stop_watching()
        self._watch = register_module_module_registration_hook(refuse_replacement)

    def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_watching()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_watching()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_watching()
        _, model = find_transformer(pl_module)
        if active_config(model) is None:
            raise ConfigError(
                "The model lost its adapter between PeftCallback's setup and fit: a hook that runs after it (the "
                "module's setup) built a new model. Build the model once, in __init__ or in configure_model "
                "starting with `if self.model is not None: return`."
            )
        self._diagnose(trainer, pl_module, model)
        self._prune_optimizers(trainer, pl_module)
        self._split_lr_groups(trainer, model)
        steps = trainer.estimated_stepping_batches
        self._hooks = active_config(model).training_hooks(model, int(steps) if math.isfinite(steps) else None)
        self._restore_hooks_state()
        trainable, total = self._counts
        rank_zero_info(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def _diagnose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: torch.nn.Module) -> None:
        """The doctor's checks (``doctor.py``) on the adapted model and what the run feeds it, with the learning rate
        of the optimizer that will train the adapter; errors stop the run here, before any step."""
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        groups = [(opt, g) for opt in trainer.optimizers for g in opt.param_groups
                  if any(id(p) in trainable for p in g["params"])]
        lr, optimizer = self.built_learning_rate(pl_module), self.optim if self.optim not in (None, "auto") else "AdamW"
        if groups:
            lr, optimizer = groups[0][1].get("initial_lr", groups[0][1]["lr"]), type(groups[0][0]).__name__
        facts = run_facts(model, self.adapter, pl_module, trainer.datamodule, trainer.strategy, lr, optimizer)
        report(diagnose(facts) + optimizer_findings(model, trainer.optimizers))
        self._first_batch_done = self._backward_ran = False

    def _prune_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        trainable_ids = {id(p) for p in trainable}
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        own = {id(p) for p in pl_module.parameters()}
        if not optimized & own:  # configure_optimizers returned None (Lightning's placeholder holds no parameter)
            trainer.optimizers = [self._build_optimizer(trainer, pl_module, trainable)]
            return
        self._refuse_other_optimizers(trainer, pl_module)
        given = {name: value for name, value in (("learning_rate", self.learning_rate),
                                                 ("weight_decay", self.weight_decay), ("optim", self.optim))
                 if value is not None}
        if given:
            raise ConfigError(
                f"PeftCallback({', '.join(f'{k}={v!r}' for k, v in given.items())}) would do nothing: "
                f"{type(pl_module).__name__}.configure_optimizers builds the optimizer. Set these in the module, or "
                f"return None from configure_optimizers to let PeftCallback build one over the adapter."
            )
        if not optimized & trainable_ids:
            raise ConfigError(
                f"The optimizers from {type(pl_module).__name__}.configure_optimizers hold none of the adapter's "
                f"{len(trainable)} trainable tensors, so the adapter would not train. Pass self.parameters() to the "
                f"optimizer (frozen ones are removed for you), or return None to let PeftCallback build one."
            )
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

    def built_learning_rate(self, pl_module: pl.LightningModule) -> float:
        """The learning rate of the optimizer built for a module whose ``configure_optimizers`` returns None."""
        if self.learning_rate is not None:
            return self.learning_rate
        found = [name for name in ("learning_rate", "lr") if lightning_hasattr(pl_module, name)]
        return float(lightning_getattr(pl_module, found[0])) if found else DEFAULT_LEARNING_RATE

    def _build_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                         params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over the adapter for a module that configures none: the method's own (GaLore's), or
        the one ``optim`` names."""
        learning_rate = self.built_learning_rate(pl_module)
        model = find_transformer(pl_module)[1]
        config = active_config(model)
        optimizer = config.build_optimizer(model, learning_rate, self.weight_decay or 0.0)
        if optimizer is not None and self.optim is not None:
            raise ConfigError(f"PeftCallback(optim={self.optim!r}) would do nothing: {type(config).__name__} trains "
                              f"with its own optimizer; choose it with {type(config).__name__}(optim=...).")
        if optimizer is None:
            optim = self.optim or "auto"
            if optim == "auto" and isinstance(trainer.strategy, PeftStrategyMixin):
                optim = trainer.strategy.default_optim
            optimizer = build_optimizer(params, optim, learning_rate, self.weight_decay or 0.0,
                                        on_cuda=pl_module.device.type == "cuda")
        rank_zero_info(f"configure_optimizers returned None: built {type(optimizer).__name__} (lr={learning_rate}) "
                       f"over {len(params)} adapter tensors.")
        return optimizer

    def _refuse_other_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse optimizers from ``configure_optimizers`` when the method trains with its own (GaLore): keeping
        them would not be the method, and replacing them silently would drop the user's settings."""
        model = find_transformer(pl_module)[1]
        config = active_config(model)
        own = config.build_optimizer(model, DEFAULT_LEARNING_RATE, 0.0)
        if own is None:
            return
        others = [type(opt).__name__ for opt in trainer.optimizers if not isinstance(opt, type(own))]
        if others:
            name = type(config).__name__
            raise ConfigError(
                f"{name} trains with its own optimizer ({type(own).__name__}), but "
                f"{type(pl_module).__name__}.configure_optimizers returned {', '.join(others)}. Return None from "
                f"configure_optimizers to let PeftCallback build it (learning_rate and weight_decay from "
                f"PeftCallback or the module; rank, update_proj_gap, scale and optim from {name}), or build it "
                f"there with `{name}.build_optimizer(model, lr, weight_decay)` to add a scheduler."
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
        if not self._first_batch_done and not self._backward_ran and pl_module.automatic_optimization:
            report(first_step_findings(find_transformer(pl_module)[1], backward_ran=False))
        self._stepped = True
        penalty = self._hooks.regularizer() if self._hooks is not None else None
        if penalty is None:
            return
        rescale_step(pl_module)  # the loss's gradients take their token weights first: the regulariser's must not
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._first_batch_done:
            report(label_findings(batch, getattr(pl_module, "tokenizer", None)))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first backward, before any optimizer step: the loss must reach the adapter. Under FSDP the
        gradients sit in flat parameters, so only the step itself is checked."""
        if self._first_batch_done or self._backward_ran:
            return
        self._backward_ran = True
        if not is_fsdp(trainer.strategy):
            report(first_step_findings(find_transformer(pl_module)[1], backward_ran=True))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._first_batch_done:
            self._first_batch_done = True
            if pl_module.automatic_optimization and not self._backward_ran:
                report(first_step_findings(find_transformer(pl_module)[1], backward_ran=False))
        if self._stepped and self._hooks is not None:
            self._hooks.after_optimizer_step(trainer.global_step)
        self._stepped = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"training_hooks": self._hooks.state_dict()} if self._hooks is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._hooks_state = state_dict.get("training_hooks", {})
        self._restore_hooks_state()  # when Lightning restores after on_fit_start

    def _restore_hooks_state(self) -> None:
        """Hand the saved training state to the method, on this rank's device: checkpoints are read onto the CPU."""
        if self._hooks is not None and self._hooks_state and self._module is not None:
            self._hooks.load_state_dict(move_data_to_device(self._hooks_state, self._module.device))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        keys = adapter_keys(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint[PEFT_KEY] = adapter_record(pl_module)

    def _adapter_only(self, checkpoint: dict[str, Any]) -> None:
        """Trim a checkpoint that did not pass through ``on_save_checkpoint``: Lightning skips callbacks' hooks
        for weights-only saves (``ModelCheckpoint(save_weights_only=True)``), which would write the whole base."""
        if PEFT_KEY not in checkpoint and self._module is not None:
            self.on_save_checkpoint(self._module.trainer, self._module, checkpoint)

    def _validate_checkpoint(self, checkpoint: dict[str, Any], path: str) -> None:
        """Refuse, before Lightning restores anything, a checkpoint whose tensors do not fit the adapted module."""
        meta = checkpoint.get(PEFT_KEY)
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
        expected = adapter_keys(self._module)
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state.keys() & expected
                 if state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise AdapterMismatchError(
                f"{path} does not fit this module's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"shape mismatches {wrong[:3]}. Resume with the same model and adapter config as the run that "
                f"wrote it."
            )
