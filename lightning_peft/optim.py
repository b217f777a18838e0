"""The optimizer ``PeftCallback`` builds when the module does not configure one, over adapter parameters only.

Names follow transformers' ``TrainingArguments.optim``. Paged AdamW (bitsandbytes) moves optimizer state to
CPU under GPU memory pressure instead of failing; paging needs CUDA, so elsewhere a paged name falls back to
the same bitsandbytes update without paging (``AdamW32bit`` / ``AdamW8bit``) with a one-line warning. ``"auto"``
means paged AdamW on CUDA (and under a quantizing ``PeftStrategy``, everywhere), torch's AdamW otherwise.
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
