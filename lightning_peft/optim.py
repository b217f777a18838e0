"""The optimizer ``PeftCallback`` builds when the module does not configure one, over adapter parameters only.

Names follow transformers' ``TrainingArguments.optim``. Paged AdamW (bitsandbytes) moves optimizer state to
CPU under GPU memory pressure instead of failing; paging needs CUDA, so elsewhere a paged name falls back to
the same bitsandbytes update without paging (``AdamW32bit`` / ``AdamW8bit``) with a one-line warning. ``"auto"``
means paged AdamW on CUDA (and under a quantizing ``PeftStrategy``, everywhere), torch's AdamW otherwise.

bitsandbytes pages only the state of tensors of at least 100,000 values (a LoRA matrix of r=16 on a 4096-wide
layer holds 65,536: its state stays in plain GPU memory), and it synchronizes the GPU after every parameter's
update. A resumed run loads the state into plain device tensors (``load_state_dict``, then Lightning's move to the
device); ``repage`` puts it back into paged memory, and ``PeftStrategyMixin.load_optimizer_state_dict`` calls it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import torch

OptimName = Literal["auto", "adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"]
_BNB_CLASSES = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit"}
_UNPAGED_CLASSES = {"paged_adamw_32bit": "AdamW32bit", "paged_adamw_8bit": "AdamW8bit"}  # the same updates


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    optim: OptimName,
    learning_rate: float,
    weight_decay: float,
    on_cuda: bool,
) -> torch.optim.Optimizer:
    """Build the named optimizer; a bitsandbytes one that this platform lacks falls back to torch's AdamW."""
    name = ("paged_adamw_32bit" if on_cuda else "adamw_torch") if optim == "auto" else optim
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name not in _BNB_CLASSES:
        raise ValueError(f"optim={optim!r} is not one of {OptimName.__args__}.")
    class_name = _BNB_CLASSES[name]
    if name in _UNPAGED_CLASSES and not on_cuda:
        class_name = _UNPAGED_CLASSES[name]
        warnings.warn(f"optim={name!r}: paging needs CUDA; using bitsandbytes' {class_name} (same update, unpaged).",
                      stacklevel=2)
    try:
        import bitsandbytes.optim as bnb_optim

        cls = getattr(bnb_optim, class_name)
    except (ImportError, AttributeError, RuntimeError) as err:
        warnings.warn(f"optim={name!r} is unavailable here ({err}); using torch.optim.AdamW instead.", stacklevel=2)
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    return cls(params, lr=learning_rate, weight_decay=weight_decay)


def repage(optimizer: torch.optim.Optimizer) -> int:
    """Move back into paged memory the state of a paged bitsandbytes optimizer that a checkpoint load turned into
    plain device tensors, for the tensors bitsandbytes pages (it decides, through its ``get_state_buffer``).
    Returns how many state tensors moved; 0 for any other optimizer."""
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in ("state1", "state2"):
                value = state.get(key)
                if not isinstance(value, torch.Tensor) or getattr(value, "is_paged", False):
                    continue
                buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
                if getattr(buffer, "is_paged", False) and buffer.shape == value.shape:
                    buffer.copy_(value)
                    state[key] = buffer
                    moved += 1
    return moved


_GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group rates optimizers and schedulers keep


def split_lr_groups(optimizer: torch.optim.Optimizer, ratios: dict[int, float], schedulers: Iterable[object] = ()
                    ) -> int:
    """Move the parameters in ``ratios`` (by ``id``) into param groups of their own, at ``ratio`` times their
    group's learning rates; other hyper-parameters (weight decay, betas) are kept. Returns how many moved.

    Schedulers of ``optimizer`` built before the split learn the new groups too: each gets its parent's base
    rate (times the ratio) and, for lambda schedulers, its parent's lambda, so the ratio holds at every step.
    """
    moved = 0
    for index, group in enumerate(list(optimizer.param_groups)):
        by_ratio: dict[float, list[torch.nn.Parameter]] = {}
        for param in group["params"]:
            if id(param) in ratios:
                by_ratio.setdefault(ratios[id(param)], []).append(param)
        if not by_ratio:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in ratios]
        for ratio, params in by_ratio.items():
            new = {k: (v * ratio if k in _GROUP_RATES and isinstance(v, (int, float)) else v)
                   for k, v in group.items() if k != "params"}
            optimizer.add_param_group({**new, "params": params})
            for scheduler in schedulers:
                _extend_scheduler(scheduler, index, ratio)
            moved += len(params)
    return moved


def _extend_scheduler(scheduler: object, parent: int, ratio: float) -> None:
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _extend_scheduler(child, parent, ratio)
    for name in ("base_lrs", "max_lrs", "min_lrs"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) > parent:
            values.append(values[parent] * ratio)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list) and len(lambdas) > parent:
        lambdas.append(lambdas[parent])
