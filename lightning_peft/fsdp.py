"""``PeftFSDPStrategy``: FSDP shards the frozen base; the adapter stays whole on every rank, as under DDP.

Why not let FSDP shard the adapter too (Lightning's ``FSDPStrategy`` with ``use_orig_params=True``): a unit that
mixes frozen and trainable tensors gets a gradient buffer as large as its whole shard, frozen part included, and
every adapter tensor becomes a flat slice that no rank holds whole, so ``save_adapter`` on rank 0 and adapter-only
checkpoints would need every rank to gather the base. Here every tensor that trains (and every adapter tensor) is
left out of FSDP (``ignored_states``): the units hold only frozen tensors and need no gradients, and the strategy
averages the adapter's gradients over the ranks itself, once per optimizer step, right after backward (where DDP
would have). The adapter is a fraction of a percent of the model, so its replicas cost little.

Built on public APIs only: Lightning's ``DDPStrategy`` for the processes, the launcher, the collectives and
checkpoint I/O (it runs on the CPU with gloo, which Lightning's ``FSDPStrategy`` refuses), and torch's
``FullyShardedDataParallel`` for the wrap, done in this strategy's ``setup`` (a public hook it overrides whole:
quantize/stream the base, let the precision plugin convert the module, wrap, build the optimizers).

Reading the base once: a module that creates its model on the meta device (the built-in modules do under this
strategy, ``streams_pretrained``) has rank 0 alone read the checkpoint and quantize it, tensor by tensor. The other
ranks keep the base on the meta device. At the wrap every rank turns its base into meta placeholders (rank 0 keeps
its real tensors aside), and FSDP materializes each unit in turn with ``param_init_fn``: rank 0 puts its tensors
back and broadcasts them (a 4-bit weight with its quantization state), the others receive them, and FSDP shards the
unit before the next one. So the file is read and quantized once, and a rank other than 0 never holds more of the
base than its shard plus one unit; rank 0 holds the quantized base until the wrap, as on one device.

What follows from it:

- checkpoints hold the adapter and its optimizer state in the format a single device writes, written by rank 0
  without gathering anything; every rank reads them back before the wrap, and rank 0's adapter is broadcast;
- ``save_adapter`` works once ``fit`` ends: the strategy's teardown, which runs before ``on_fit_end``, puts the
  module's own layers back in place of FSDP's wrappers (each rank keeps its shard of the base, so the module cannot
  be trained or run again). During ``fit`` a rank that reads the wrapped module's state dict alone would wait for
  the others: write checkpoints instead. The base's fingerprint is taken on rank 0 before the embedding is sharded.
- the wrap: each of the transformer's blocks (``_no_split_modules``, as ``from_pretrained(device_map=...)`` uses),
  and the input embedding and output head when untied, is a unit unless ``auto_wrap_policy`` says otherwise; ``wrap()`` inside ``configure_model`` is refused, since the
  adapter must go in before any wrap. Activation checkpointing is transformers' own (``gradient_checkpointing``).
- a 4-bit base is quantized before the wrap; FSDP flattens its packed weights with the other tensors of a unit,
  which must share one dtype, so the storage dtype must be the one it trains in: ``bnb_4bit_quant_storage=
  "bfloat16"`` with ``precision="bf16-true"`` (or ``"float32"`` with ``"32-true"``); mixed precision cannot work.
  8-bit weights are integers, which FSDP cannot flatten.

Registered as ``"peft_fsdp"`` and ``"qlora_fsdp"`` (NF4, double quantization, bfloat16 compute and storage).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.fsdp import CPUOffload, FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft.errors import ConfigError
from lightning_peft.fingerprint import base_fingerprint, pin_fingerprint
from lightning_peft.methods.base import AdapterConfig, AdapterLayer
from lightning_peft.quantization import QuantizationConfig
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.streaming import release_free_memory
from lightning_peft.surgery import find_transformer
from lightning_peft.targets import set_submodule

_WRAPPED_PREFIX = "_fsdp_wrapped_module."  # the path segment FSDP's wrappers add to the names inside them
_SHARDED = "_lightning_peft_sharded"
# The dtype FSDP holds and computes every tensor in, per precision: a 4-bit base must be stored in it.
_PRECISION_DTYPES = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16"}


def _unwrap(module: nn.Module) -> None:
    """Put back, in place, every module that FSDP wrapped inside ``module``, so its module paths (and
    ``save_adapter``'s keys) are the unwrapped ones and no FSDP state-dict hook, a collective, runs when one rank
    reads it. The frozen base keeps each rank's shard."""
    for path, sub in reversed(list(module.named_modules())):  # the innermost wrapper first
        if path and isinstance(sub, FullyShardedDataParallel):
            set_submodule(module, path, sub.module)


def clean_name(name: str) -> str:
    """A parameter's name as in the unwrapped module: without the path segments FSDP's wrappers add."""
    return name.replace(_WRAPPED_PREFIX, "")


def _replicated_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """What ``PeftFSDPStrategy`` keeps whole on every rank, by clean name: every trainable parameter and every
    adapter tensor."""
    kept = {clean_name(n): p for n, p in module.named_parameters() if p.requires_grad}
    for path, sub in module.named_modules():
        if isinstance(sub, AdapterLayer):
            kept.update({clean_name(f"{path}.{n}"): p for n, p in sub.adapter_parameters().items()})
    return kept


def _module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


class PeftFSDPStrategy(PeftStrategyMixin, DDPStrategy):
    """Shards the frozen base with FSDP and keeps the adapter whole on every rank; rank 0 alone reads the base.

    Takes the arguments of ``PeftStrategy`` (but ``device``). Checkpoints hold only what every rank holds whole (the
    adapter and the tensors that train), so the sharded base is never gathered.

    Args:
        auto_wrap_policy: which modules are FSDP units: a policy of ``torch.distributed.fsdp.wrap`` or a set of
            module classes; default: the transformer's blocks (``_no_split_modules``), the input embedding and
            the output head (unless tied).
        sharding_strategy: FSDP's ``ShardingStrategy`` or its name (``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ...).
        cpu_offload: keep the base's shards in CPU memory between uses (FSDP's ``CPUOffload(offload_params=True)``).
        state_dict_type: only ``"full"``: checkpoints are single files holding the adapter, never sharded.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default: the device's.
        timeout: how long a collective waits for the other ranks.
        fsdp_kwargs: further arguments of torch's ``FullyShardedDataParallel`` (``mixed_precision``,
            ``limit_all_gathers``, ...).

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
        auto_wrap_policy: Callable[..., bool] | set[type[nn.Module]] | None = None,
        sharding_strategy: str | ShardingStrategy = "FULL_SHARD",
        cpu_offload: bool | CPUOffload = False,
        state_dict_type: str = "full",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        fsdp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if quantization is not None and quantization.load_in_8bit:
            raise ConfigError("FSDP cannot shard 8-bit weights (integers); use load_in_4bit with "
                              "bnb_4bit_quant_storage='bfloat16', or PeftDDPStrategy for an 8-bit base.")
        if state_dict_type != "full":
            raise ConfigError("PeftFSDPStrategy writes single-file checkpoints (the adapter is whole on every "
                              "rank); leave state_dict_type='full'.")
        for name in ("activation_checkpointing", "activation_checkpointing_policy"):
            if name in (fsdp_kwargs or {}):
                raise ConfigError(f"PeftFSDPStrategy checkpoints activations with transformers' own gradient "
                                  f"checkpointing: pass gradient_checkpointing=True instead of {name}.")
        if isinstance(sharding_strategy, str) and sharding_strategy.upper() not in ShardingStrategy.__members__:
            raise ConfigError(f"sharding_strategy={sharding_strategy!r} is not one of "
                              f"{sorted(ShardingStrategy.__members__)}.")
        super().__init__(process_group_backend=process_group_backend, timeout=timeout)
        if isinstance(auto_wrap_policy, (set, list, tuple)):
            auto_wrap_policy = ModuleWrapPolicy(set(auto_wrap_policy))
        self.auto_wrap_policy = auto_wrap_policy
        self.fsdp_kwargs = {
            "sharding_strategy": ShardingStrategy[sharding_strategy.upper()] if isinstance(sharding_strategy, str)
            else sharding_strategy,
            "cpu_offload": cpu_offload if isinstance(cpu_offload, CPUOffload) else CPUOffload(bool(cpu_offload)),
            # Each unit's tensors stay the module's own parameters (views of the shard), so after teardown each
            # rank's module holds its shard under the original names.
            "use_orig_params": True,
            **(fsdp_kwargs or {}),
        }
        self._init_peft(quantization, checkpoint_dir, gradient_checkpointing, gradient_checkpointing_kwargs)
        self.replicated: dict[str, nn.Parameter] = {}

    @property
    @override
    def streams_pretrained(self) -> bool:
        """Always: rank 0 reads the base, quantized or not, and the other ranks receive their shards at the wrap."""
        return True

    @property
    @override
    def reads_pretrained(self) -> bool:
        return self.global_rank == 0

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
    def setup(self, trainer: pl.Trainer) -> None:
        """Prepare the base, convert the module for the precision (keeping the adapter's dtype), wrap it in FSDP in
        every stage (the base is sharded for evaluation too), then build the optimizers over the adapter."""
        module = trainer.lightning_module
        self.prepare_model(module)
        self.accelerator.setup(trainer)
        self.hold_kept_dtypes(module)
        self.precision_plugin.convert_module(module)
        self.restore_held_dtypes()
        self.model = self._shard(module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _shard(self, model: pl.LightningModule) -> FullyShardedDataParallel:
        if getattr(model, _SHARDED, False) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ConfigError(
                f"{type(model).__name__} was sharded by FSDP before (a run under FSDP, or wrap() in configure_model) "
                f"and each rank holds only its shard of the base: build the module afresh (load_adapter or "
                f"ckpt_path brings the adapter back)."
            )
        transformer = find_transformer(model)[1]
        self.replicated = _replicated_parameters(model)
        replicated = {id(p) for p in self.replicated.values()}
        streamed = any(id(t) not in replicated for _, t in _tensors_on_meta(model))
        streamed = bool(self.reduce(torch.tensor(int(streamed), device=self.root_device), reduce_op="sum"))
        pin_fingerprint(transformer, self.broadcast(base_fingerprint(transformer) if self.is_global_zero else None))
        with torch.no_grad():
            for param in self.replicated.values():  # FSDP moves only what it manages, and broadcasts nothing
                if param.device.type == "meta":  # a rank that did not read the base: its adapter is empty
                    torch.utils.swap_tensors(param, nn.Parameter(torch.empty_like(param, device=self.root_device),
                                                                 requires_grad=param.requires_grad))
                else:
                    param.data = param.data.to(self.root_device)
                if self.world_size > 1:
                    dist.broadcast(param.data, src=0)  # the adapter's random init may differ between ranks
        kwargs = {**self.fsdp_kwargs, "auto_wrap_policy": self.auto_wrap_policy or _block_policy(model)}
        kwargs["ignored_states"] = [*_parameters(kwargs.get("ignored_states", [])), *self.replicated.values()]
        if not streamed:
            return FullyShardedDataParallel(module=model, device_id=self.root_device, **kwargs)
        kwargs["param_init_fn"] = _RankZeroBase(model, replicated, self.root_device, self.is_global_zero,
                                                self.broadcast).materialize
        wrapped = FullyShardedDataParallel(module=model, device_id=self.root_device, **kwargs)
        release_free_memory()  # the units' whole tensors, freed once sharded, out of the C heap
        return wrapped

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and isinstance(self.model, FullyShardedDataParallel):
            _unwrap(module)
            setattr(module, _SHARDED, True)
            self.model = module
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
        params = [p for p in self.replicated.values() if p.requires_grad]
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
        """What every rank holds whole: the adapter and the tensors that train (the unwrapped module's names)."""
        return {name: param.detach() for name, param in self.replicated.items()}


def _tensors_on_meta(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for module in model.modules() for n, t in _module_tensors(module) if t.device.type == "meta"]


class _RankZeroBase:
    """The frozen base as rank 0 holds it, handed to every rank unit by unit as FSDP materializes the units.

    On construction every rank replaces each tensor FSDP will manage by a meta placeholder (a tensor shared by two
    modules, a tied embedding, stays shared); rank 0 keeps its real ones aside. ``materialize``, FSDP's
    ``param_init_fn``, runs on every rank for each module of a unit, in the same order: rank 0 broadcasts the
    module's shapes, dtypes and 4-bit quantization states, then each tensor; the others allocate and receive.
    """

    def __init__(self, model: nn.Module, replicated: set[int], device: torch.device, is_source: bool,
                 broadcast: Callable[[Any], Any]) -> None:
        self.device, self.is_source, self.broadcast = device, is_source, broadcast
        self.kept: dict[int, torch.Tensor] = {}  # placeholder id -> rank 0's tensor
        self.done: dict[int, torch.Tensor] = {}  # placeholder id -> materialized tensor
        placeholders: dict[int, torch.Tensor] = {}
        for module in model.modules():
            for name, tensor in _module_tensors(module):
                if id(tensor) in replicated:
                    continue
                placeholder = placeholders.get(id(tensor))
                if placeholder is None:
                    placeholder = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    if isinstance(tensor, nn.Parameter):
                        placeholder = nn.Parameter(placeholder, requires_grad=tensor.requires_grad)
                    placeholders[id(tensor)] = placeholder
                    if is_source:
                        self.kept[id(placeholder)] = tensor
                setattr(module, name, placeholder)

    @torch.no_grad()
    def materialize(self, module: nn.Module) -> None:
        pending = [(n, t) for n, t in _module_tensors(module) if t.device.type == "meta"]
        for name, placeholder in pending:
            if id(placeholder) in self.done:  # shared with a module materialized before
                setattr(module, name, self.done[id(placeholder)])
        pending = [(n, t) for n, t in pending if id(t) not in self.done]
        header = None
        if self.is_source:
            header = [(tuple(self.kept[id(t)].shape), self.kept[id(t)].dtype, _quantization_stats(self.kept[id(t)]))
                      for _, t in pending]
        header = self.broadcast(header)
        for (name, placeholder), (shape, dtype, stats) in zip(pending, header):
            if self.is_source:
                value = self.kept.pop(id(placeholder))
                value.data = value.data.to(self.device)
                dist.broadcast(value.data, src=0)
            else:
                data = torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(data, src=0)
                value = _received(module, placeholder, data, stats, self.device)
            setattr(module, name, value)
            self.done[id(placeholder)] = value


def _quantization_stats(tensor: torch.Tensor) -> dict[str, Any] | None:
    """A 4-bit weight's quantization state (scales, code, shape), on the CPU for the broadcast; None for others."""
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return None
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.as_dict(packed=True).items()}


def _received(module: nn.Module, placeholder: torch.Tensor, data: torch.Tensor, stats: dict[str, Any] | None,
              device: torch.device) -> torch.Tensor:
    if stats is not None:
        import bitsandbytes as bnb

        return bnb.nn.Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=module)
    if isinstance(placeholder, nn.Parameter):
        return nn.Parameter(data, requires_grad=placeholder.requires_grad)
    return data


def _parameters(states: Any) -> list[nn.Parameter]:
    return [p for s in states for p in (s.parameters() if isinstance(s, nn.Module) else [s])]


def _block_policy(model: nn.Module) -> CustomPolicy:
    """One FSDP unit per transformer block (the classes the model names in ``_no_split_modules``), and one each for
    the input embedding and the output head unless they share their weight: left in the root unit they would be
    materialized and flattened together, the largest unit of most models."""
    transformer = find_transformer(model)[1]
    names = set(getattr(transformer, "_no_split_modules", None) or [])
    embedding, head = transformer.get_input_embeddings(), transformer.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    own = [] if tied else [m for m in (embedding, head) if m is not None]
    return CustomPolicy(lambda module: type(module).__name__ in names or any(module is m for m in own))


def _qlora_fsdp() -> QuantizationConfig:
    return QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")


StrategyRegistry.register(PeftFSDPStrategy.strategy_name, PeftFSDPStrategy, description="PeftFSDPStrategy",
                          override=True)
StrategyRegistry.register("qlora_fsdp", PeftFSDPStrategy, description="PeftFSDPStrategy with NF4 double-quantized "
                          "base stored in bfloat16", override=True, quantization=_qlora_fsdp())


def is_fsdp(strategy: object) -> bool:
    """Whether ``strategy`` shards the model with FSDP: ours, or Lightning's own ``FSDPStrategy``."""
    return isinstance(strategy, (FSDPStrategy, PeftFSDPStrategy))
