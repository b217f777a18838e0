"""The causal language-model loss, with the output head run only where there are labels, a chunk at a time.

``model(**batch).loss`` projects every position onto the vocabulary and keeps float32 logits for the backward:
4 × 49,152 bytes per position for SmolLM2, and the head's share of the arithmetic (a fifth of it for a 135M
model), at positions that have no label too. On chat data only the answers have labels (a third of the positions
on the default run's data). ``causal_lm_loss`` runs the model's body (``model.base_model``) as the model's own
forward would, keeps the final hidden states of the labelled positions (shifted as transformers shifts them: the
state at position t predicts the label at t + 1) and runs the head and the cross-entropy on chunks of them::

    body ──► hidden (8, 256, 256) ──► labelled rows (656, 256) ──► per chunk of ≤ chunk_size rows:
                                                                   head ──► logits (≤ chunk_size, 49152) ──► CE sum

No tensor holds more than ``chunk_size × vocab`` logits in either pass, in one of two ways:

- A head that does not train (a plain ``nn.Linear`` whose parameters are frozen, LoRA's usual case, tied to the
  embedding or not) and whose logits are not post-processed: each chunk's gradient with respect to the hidden
  states, ``(softmax - one-hot) @ W``, is computed in the forward, right after the chunk's loss, and kept for the
  backward instead of the logits. Two head products per labelled row, not three.
- Any other head (a LoRA layer on ``lm_head``, a trained or 4-bit head, a head in an FSDP unit of its own): each
  chunk runs under ``torch.utils.checkpoint``, the forward keeping only the chunk's loss and the backward
  recomputing the chunk's logits. The head is called as the module it is, so its parameters' gradients flow
  through its own autograd and the hooks DDP and FSDP reduce them with.

What the model's forward does to the head's output before its loss is done here too: soft-capping (Gemma 2 and
3: ``final_logit_softcapping``; RecurrentGemma: ``logits_soft_cap``), Cohere's ``logit_scale`` and Granite's
``logits_scaling``. ``logits_to_keep`` is never passed (the body is called, not the model's forward). Models this
path cannot reproduce (no separate body or head, encoder-decoders, a loss with a router or z-loss term added) take
the full path, ``model(**batch)``, and say so once.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.checkpoint import checkpoint
from torchmetrics.aggregation import MeanMetric

from lightning_peft.data import IGNORE_INDEX
from lightning_peft.errors import ConfigError
from lightning_peft.methods.prompt import ENCODER_PATH, PromptEncoder

DEFAULT_CHUNK_SIZE = 1024  # rows: 201 MB of float32 logits per chunk at SmolLM2's vocabulary of 49,152
_announced: set[tuple[str, str]] = set()


class LossStats(NamedTuple):
    """What one batch gives: the mean loss and what aggregates over many batches (perplexity, token accuracy)."""

    loss: torch.Tensor
    """Mean cross-entropy over the labelled tokens (0 when there are none), differentiable."""
    loss_sum: torch.Tensor
    """Summed cross-entropy of the labelled tokens (float32), differentiable."""
    count: torch.Tensor
    """Number of labelled tokens (long)."""
    correct: torch.Tensor
    """Labelled tokens whose argmax prediction is the label (long)."""


class TokenPerplexity(MeanMetric):
    """Perplexity over many batches from their ``LossStats``: ``update(stats.loss, weight=stats.count)``, then
    exp of the token-weighted mean loss, as torchmetrics' ``Perplexity`` gives from the logits."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


@overload
def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = ...,
                   *, return_stats: Literal[False] = ...) -> torch.Tensor: ...


@overload
def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = ...,
                   *, return_stats: Literal[True]) -> LossStats: ...


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE,
                   *, return_stats: bool = False) -> torch.Tensor | LossStats:
    """Mean next-token cross-entropy over the positions whose label is not -100, as ``model(**batch).loss``.

    Args:
        model: a transformers causal LM (adapters attached or not).
        batch: ``labels`` plus what the model takes (``input_ids``, ``attention_mask``, ``position_ids``...);
            every key but ``labels`` goes to the model as is.
        chunk_size: labelled positions whose logits exist at once; memory grows as ``chunk_size × vocab``.
        return_stats: return ``LossStats`` (sum, count, correct argmax predictions) instead of the mean alone.

    A batch without labelled tokens gives a loss of 0 whose gradients are zero (transformers gives NaN, which
    would turn every trained weight into NaN at the next optimizer step).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if "labels" not in batch:
        raise ConfigError(f"causal_lm_loss needs batch['labels'] (-100 where there is no label); the batch has "
                          f"{sorted(batch)}.")
    labels = batch["labels"]
    # No cache: a loss needs none, and packed rows (position_ids, no attention_mask) stay apart only without one.
    inputs = {"use_cache": False, **{key: value for key, value in batch.items() if key != "labels"}}
    reason = _full_path_reason(model)
    if reason is None:
        stats = _labelled_stats(model, _final_hidden_states(model, inputs), labels, chunk_size, return_stats)
    else:
        if (type(model).__name__, reason) not in _announced:
            _announced.add((type(model).__name__, reason))
            rank_zero_info(f"causal_lm_loss computes {type(model).__name__}'s logits at every position: {reason}.")
        stats = _full_logits_stats(model, inputs, labels)
    return stats if return_stats else stats.loss


def _full_path_reason(model: Any) -> str | None:
    """Why ``model``'s loss cannot be computed from its body's output and its head alone, or None when it can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if model.base_model is model:
        return "its body is not a submodule of its own (base_model_prefix)"
    if model.get_output_embeddings() is None:
        return "it has no output embedding layer (get_output_embeddings() is None)"
    if getattr(config, "output_router_logits", False):
        return "its loss adds the router's load-balancing loss (output_router_logits=True)"
    if getattr(config, "z_loss_coefficient", 0):
        return "its loss adds a z-loss (z_loss_coefficient)"
    return None


def _final_hidden_states(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The body's last hidden states for ``inputs``: (batch, positions, width), virtual tokens included."""
    encoder = getattr(model, ENCODER_PATH, None)
    if isinstance(encoder, PromptEncoder):  # its hook sits on the whole model, whose forward is not called here
        inputs = encoder.with_prompt(model, inputs)
    return model.base_model(**inputs)[0]  # last_hidden_state, the first field of every body's output


def _logit_transforms(model: Any) -> tuple[Any, Any, Any]:
    """What the model's forward does to its head's output: (soft cap, multiplier, divisor), None for each it does not
    apply."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
    return cap, getattr(model, "logit_scale", None), getattr(config, "logits_scaling", None)


def _logits(model: Any, rows: torch.Tensor) -> torch.Tensor:
    """Float32 logits of ``rows`` of final hidden states, post-processed as the model's forward does."""
    logits = model.get_output_embeddings()(rows)
    cap, scale, scaling = _logit_transforms(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if scale is not None:
        logits = logits * scale
    if scaling is not None:
        logits = logits / scaling
    return logits.float()  # the loss is computed in float32, as transformers' ForCausalLMLoss does


def _frozen_head(model: Any) -> torch.nn.Linear | None:
    """The output head when its logits are plain ``rows @ W^T + b`` and nothing in it trains, else None."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    if head.weight.shape != (head.out_features, head.in_features):  # sharded: an FSDP unit of its own
        return None
    return head if all(transform is None for transform in _logit_transforms(model)) else None


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed float32 cross-entropy of ``rows @ weight^T + bias`` against ``targets``, a chunk of rows at a time,
    with the rows' gradient computed in the forward: the backward only scales it (the head's weights do not train)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int, count_correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        correct = torch.zeros((), dtype=torch.long, device=rows.device)
        grad_rows = torch.empty_like(rows)
        for start in range(0, len(rows), chunk_size):
            chunk = slice(start, start + chunk_size)
            logits, target = F.linear(rows[chunk], weight, bias).float(), targets[chunk]
            if count_correct:
                correct += (logits.argmax(-1) == target).sum()
            log_total = logits.logsumexp(-1)
            loss_sum += (log_total - logits.gather(1, target[:, None]).squeeze(1)).sum()
            probabilities = logits.sub_(log_total[:, None]).exp_()  # in place: the logits are not needed again
            probabilities[torch.arange(len(target), device=rows.device), target] -= 1  # d(loss) / d(logits)
            grad_rows[chunk] = probabilities.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_rows)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, grad_correct: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_loss.to(grad_rows.dtype), None, None, None, None, None


def _chunk_sums(model: Any, rows: torch.Tensor, targets: torch.Tensor,
                count_correct: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = _logits(model, rows)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, (logits.argmax(-1) == targets).sum() if count_correct else None


def _labelled_stats(model: Any, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                    count_correct: bool) -> LossStats:
    # Prompt tuning puts its virtual tokens in front: the labels belong to the last positions.
    predicting = hidden[:, hidden.shape[1] - labels.shape[1]:-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, targets = predicting[mask], targets[mask]  # (labelled, width), (labelled,)
    count = int(mask.sum())
    if count == 0:  # one row through the head keeps every trainable tensor in the graph (DDP waits for them all)
        zero = _logits(model, hidden.reshape(-1, hidden.shape[-1])[:1]).sum() * 0.0
        return LossStats(zero, zero, torch.zeros((), dtype=torch.long, device=hidden.device),
                         torch.zeros((), dtype=torch.long, device=hidden.device))
    head = _frozen_head(model)
    if head is not None and torch.is_grad_enabled() and rows.requires_grad:
        loss_sum, correct = _FrozenHeadCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk_size,
                                                          count_correct)
        return LossStats(loss_sum / count, loss_sum, torch.tensor(count, device=rows.device), correct)
    sums, rights = [], []
    for start in range(0, count, chunk_size):
        chunk = (model, rows[start:start + chunk_size], targets[start:start + chunk_size], count_correct)
        if torch.is_grad_enabled():  # keep the chunk's loss only; the backward recomputes its logits
            loss, right = checkpoint(_chunk_sums, *chunk, use_reentrant=False)
        else:
            loss, right = _chunk_sums(*chunk)
        sums.append(loss)
        rights.append(right)
    loss_sum = torch.stack(sums).sum()
    correct = torch.stack(rights).sum() if count_correct else torch.zeros((), dtype=torch.long, device=rows.device)
    return LossStats(loss_sum / count, loss_sum, torch.tensor(count, device=rows.device), correct)


def _full_logits_stats(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> LossStats:
    """The model's own forward and loss; the statistics from its logits."""
    out = model(**inputs, labels=labels)
    logits = out.logits[:, out.logits.shape[1] - labels.shape[1]:-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    labelled, targets = logits[mask].float(), targets[mask]
    count = mask.sum()
    if int(count) == 0:
        zero = out.logits.sum() * 0.0
        return LossStats(zero, zero, count, count.clone())
    loss_sum = F.cross_entropy(labelled, targets, reduction="sum")
    return LossStats(out.loss, loss_sum, count, (labelled.argmax(-1) == targets).sum())
