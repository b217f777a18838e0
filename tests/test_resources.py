"""A long run holds its memory flat: hundreds of steps under PeftCallback (with AdaLoRA's per-step hooks and
LoRA+'s param groups too) add no resident memory per step, while a run that keeps each step's graph alive, the
leak this guards against, is caught by the same measure."""

from __future__ import annotations

import os

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_helpers import CausalLM, loader
from lightning_peft import AdaLoraConfig, LoraConfig, PeftCallback

STEPS, SETTLE = 300, 100  # steps run, and the first steps left out (allocator and caches warming up)
# Bytes of resident growth per step tolerated: a clean run measures ~0.5 KB (plus the allocator's occasional jump of
# a few hundred KB), one that keeps its graphs 100+ KB.
LEAK_LIMIT = 10_000


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ResidentProbe(Callback):
    def __init__(self) -> None:
        self.samples: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples.append(resident_bytes())


class KeepsGraphs(CausalLM):
    """The classic leak: the loss kept with its graph, so every step's activations stay alive."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.kept.append(loss)
        return loss


def growth_per_step(module: L.LightningModule, adapter) -> float:
    """Resident growth per step over the steps after ``SETTLE``."""
    probe = ResidentProbe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PeftCallback(adapter, learning_rate=1e-3), probe])
    trainer.fit(module, loader(n=64, batch_size=4))
    late = probe.samples[SETTLE:]
    return (late[-1] - late[0]) / (len(late) - 1)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
@pytest.mark.parametrize("adapter", [
    LoraConfig(r=8, target_modules="all-linear", loraplus_lr_ratio=16),
    AdaLoraConfig(init_r=6, target_r=2, tinit=10, tfinal=50, deltaT=5, total_step=STEPS,
                  target_modules=["q_proj", "v_proj"]),
], ids=["lora-plus", "adalora"])
def test_resident_memory_stays_flat_over_hundreds_of_steps(adapter):
    leaky = growth_per_step(KeepsGraphs(), adapter)
    assert leaky > LEAK_LIMIT, f"the measure missed a known leak ({leaky:.0f} B/step)"
    flat = growth_per_step(CausalLM(), adapter)
    assert flat < LEAK_LIMIT, f"resident memory grows {flat:.0f} bytes per step"
