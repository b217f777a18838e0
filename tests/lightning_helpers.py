"""A small LightningModule around a tiny transformers model, in both creation styles users write, and what the
two-process tests (DDP, FSDP) share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import VOCAB, launcher_free_env, make_model
from lightning_peft import CausalLMModule, load_adapter, save_adapter
from lightning_peft.adapter_io import adapter_state_dict

SEED = 1000  # rank N of a scripted two-process run seeds SEED + N before its adapter goes in


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


class PretrainedCausalLM(CausalLMModule):
    """The built-in ``CausalLMModule`` over a saved model directory (it creates its base on the meta device for a
    strategy that streams it in), trained and recorded as ``CausalLM``."""

    def __init__(self, path: str, lr: float = 1e-2):
        super().__init__(path, dtype="bfloat16", learning_rate=lr)
        self.losses: list[float] = []

    training_step = CausalLM.training_step

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.learning_rate)


def loader(n: int = 16, length: int = 16, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, max_steps=4)
    return L.Trainer(**{**defaults, **kwargs})


class RankRecorder(L.Callback):
    """For tests/scripts/two_process_fit.py, on every rank: seeds the rank's own random state before the adapter
    goes in (so an adapter not broadcast from rank 0 would differ), and at fit end writes into ``out`` its adapter
    (rank<N>.safetensors), losses, batches, its number of 4-bit layers and of frozen elements it holds, then calls
    save_adapter(out/adapter), which only rank 0 may carry out."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[torch.Tensor] = []

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(SEED + trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0])

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        save_file(adapter_state_dict(pl_module), self.out / f"rank{rank}.safetensors")
        save_file({"batches": torch.stack(self.batches)}, self.out / f"batches{rank}.safetensors")
        record = {"losses": pl_module.losses,
                  "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in pl_module.modules()),
                  "held": sum(p.numel() for p in pl_module.parameters() if not p.requires_grad)}
        (self.out / f"record{rank}.json").write_text(json.dumps(record))
        save_adapter(pl_module, self.out / "adapter")


def rank_records(run: Path) -> list[dict]:
    return [json.loads((run / f"record{r}.json").read_text()) for r in (0, 1)]


TWO_PROCESS_FIT = Path(__file__).parent / "scripts" / "two_process_fit.py"
# Every method but LoRA, each on a family it adapts, for one launch of TWO_PROCESS_FIT.
OTHER_METHODS = ["dora:llama", "ia3:llama", "adalora:llama", "prompt:llama", "prefix:llama", "bottleneck:qwen2"]


def run_two_processes(kind: str, out: Path, steps: int, *args: str) -> None:
    """Run tests/scripts/two_process_fit.py under ``kind`` ("ddp" or "fsdp"), outside whatever an in-process test
    left behind."""
    cmd = [sys.executable, str(TWO_PROCESS_FIT), kind, str(out), str(steps), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_free_env())
    assert result.returncode == 0, result.stderr[-3000:]


class _SeedAsRankZero(L.Callback):
    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(SEED)  # as rank 0, whose adapter the others receive


def check_ranks_against_one_process(run: Path, module: L.LightningModule, callbacks: list, tolerance: float = 1e-5,
                                    **fit_kwargs) -> dict[str, torch.Tensor]:
    """Both ranks of a scripted run hold the same adapter, the one ``module`` trains in one process on the ranks'
    batches of each step together, with the mean of their losses; rank 0 saved it. Returns the saved tensors."""
    ranks = [load_file(run / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    batches = [load_file(run / f"batches{r}.safetensors")["batches"] for r in (0, 1)]
    ids = torch.cat(batches, dim=1).flatten(0, 1)
    trainer(callbacks=[_SeedAsRankZero(), *callbacks], max_steps=len(batches[0]), **fit_kwargs).fit(
        module, DataLoader(TensorDataset(ids), batch_size=2 * batches[0].shape[1]))
    expected = adapter_state_dict(module)
    assert expected.keys() == ranks[0].keys()
    for key in expected:
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=10 * tolerance, atol=tolerance)
    per_rank = [record["losses"] for record in rank_records(run)]
    torch.testing.assert_close(torch.tensor(per_rank).mean(0), torch.tensor(module.losses), rtol=tolerance,
                               atol=tolerance)
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == ranks[0].keys() and all(torch.equal(saved[k], ranks[0][k]) for k in saved)
    return saved


def check_every_other_method(kind: str, out: Path, check_run) -> None:
    """Fit every method of ``OTHER_METHODS`` in one two-process launch under ``kind``; ``check_run(run, method,
    family)`` checks each, and the adapter rank 0 saved must load."""
    run_two_processes(kind, out, 4, *OTHER_METHODS)
    for run in OTHER_METHODS:
        method, family = run.split(":")
        check_run(out / f"{method}-{family}", method, family)
        load_adapter(make_model(family), out / f"{method}-{family}" / "adapter")
