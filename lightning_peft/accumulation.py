"""Optimizer steps that weigh every labelled token alike, however the step is cut into micro-batches and ranks.

Lightning's ``accumulate_grad_batches=k`` averages the k micro-batches' losses, and DDP and FSDP average the ranks'
gradients: a micro-batch's mean loss counts the same whether it holds 3 labelled tokens or 300. Packed rows and
length-grouped batches hold very different numbers of labels, so the accumulated step is not the step one batch of
the same examples takes. ``TokenWeightedSteps`` makes it that step: the gradient is the mean over every labelled
token the step saw, on every rank.

Each micro-batch's mean loss is weighted by its token count over a reference count shared by the ranks (the first
micro-batch's, averaged over them; it keeps the loss at the scale of a mean, which float16's loss scaling needs).
Once the step's backward passes are done, before clipping and the optimizer, the gradients are rescaled by
``reference * k * ranks / tokens in the step`` (summed over the ranks): what Lightning's and the strategy's averaging
divided by is replaced by the step's token count. ``PeftCallback`` has that done before it adds a per-step
regulariser's gradient (AdaLoRA's), which must not be rescaled. The built-in modules weigh in ``training_step`` and
rescale in ``on_before_optimizer_step``; a subclass overriding either keeps this by calling ``super()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy


class TokenWeightedSteps:
    """The per-step bookkeeping: ``weigh`` each micro-batch's loss in ``training_step``, ``rescale`` the gradients in
    ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self._reference: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self.step_loss: torch.Tensor | None = None
        """The last finished step's loss: the mean over its tokens on every rank (what is logged)."""

    def weigh(self, loss: torch.Tensor, tokens: torch.Tensor, strategy: Strategy) -> torch.Tensor:
        """``loss`` (a mean over ``tokens`` items) as its share of the step: ``loss * tokens / reference``."""
        tokens = tokens.detach().float()
        if self._reference is None:  # the step's first micro-batch: every rank is here at once
            self._reference = strategy.reduce(tokens.clone(), reduce_op="mean").clamp(min=1)
            self._tokens = torch.zeros_like(tokens)
            self._loss_sum = torch.zeros_like(tokens)
        self._tokens = self._tokens + tokens
        self._loss_sum = self._loss_sum + loss.detach().float() * tokens
        return loss * (tokens / self._reference)

    def rescale(self, parameters: Iterable[torch.nn.Parameter], strategy: Strategy, accumulate: int) -> None:
        """Turn the accumulated, rank-averaged gradients into the mean over the step's tokens, and start a new step."""
        if self._reference is None or self._tokens is None or self._loss_sum is None:
            return
        loss_sum, total = strategy.reduce(torch.stack([self._loss_sum, self._tokens]), reduce_op="sum")
        total = total.clamp(min=1)
        self.step_loss = loss_sum / total
        factor = float(self._reference * accumulate * strategy.world_size / total)
        self._reference = self._tokens = self._loss_sum = None
        if factor != 1.0:
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(factor)


def rescale_step(module: pl.LightningModule) -> None:
    """Rescale the step's gradients of a module that weighs its micro-batches (its ``step_weights``); a no-op for
    other modules, and once done in a step."""
    weights = getattr(module, "step_weights", None)
    if isinstance(weights, TokenWeightedSteps):
        weights.rescale(module.parameters(), module.trainer.strategy, module.trainer.accumulate_grad_batches)
