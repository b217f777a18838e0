"""A small LightningModule around a tiny transformers model, in both creation styles users write."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import VOCAB, make_model


class CausalLM(L.LightningModule):
    """Builds its model in ``configure_model`` (``in_init=False``) or in ``__init__``; records every loss."""

    def __init__(self, family: str = "llama", in_init: bool = True, optimizer: str | None = "all", lr: float = 1e-2,
                 sizes: dict | None = None):
        super().__init__()
        self.family, self.optimizer_kind, self.lr, self.sizes = family, optimizer, lr, sizes or {}
        self.model = make_model(family, **self.sizes).train() if in_init else None
        self.losses: list[float] = []

    def configure_model(self):
        if self.model is None:
            self.model = make_model(self.family, **self.sizes).train()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer_kind is None:
            return None
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # everything, frozen included: the common mistake


def loader(n: int = 16, length: int = 16, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, max_steps=4)
    return L.Trainer(**{**defaults, **kwargs})


class _SeedAsRankZero(L.Callback):
    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000)  # as rank 0 of tests/scripts/*_fit.py, whose adapter the others receive


def fit_on_both_ranks_batches(run: Path, module: L.LightningModule, callbacks: list, **kwargs) -> None:
    """Fit ``module`` in one process on what the two ranks of a scripted run trained on (``run/batches<N>``),
    every batch the ranks' batches of that step together: what the ranks should have trained, together."""
    ranks = [load_file(run / f"batches{r}.safetensors")["batches"] for r in (0, 1)]
    ids = torch.cat(ranks, dim=1).flatten(0, 1)
    trainer(callbacks=[_SeedAsRankZero(), *callbacks], max_steps=len(ranks[0]), **kwargs).fit(
        module, DataLoader(TensorDataset(ids), batch_size=2 * ranks[0].shape[1]))
