"""Resident-memory growth per step of a few hundred training steps under PeftCallback, measured in a process of its
own so that no heap left by earlier work can absorb (and hide) a leak; used by tests/test_resources.py.

usage: resident_growth.py ADAPTER MODULE      (ADAPTER: lora-plus | adalora; MODULE: clean | keeps-graphs)
prints {"bytes_per_step": ...} as JSON on its last line
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_helpers import CausalLM, loader  # noqa: E402
from lightning_peft import AdaLoraConfig, LoraConfig, PeftCallback  # noqa: E402

STEPS, SETTLE = 300, 100  # steps run, and the first steps left out (allocator and caches warming up)
ADAPTERS = {
    "lora-plus": lambda: LoraConfig(r=8, target_modules="all-linear", loraplus_lr_ratio=16),
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=2, tinit=10, tfinal=50, deltaT=5, total_step=STEPS,
                                     target_modules=["q_proj", "v_proj"]),
}


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


def main() -> None:
    adapter, kind = sys.argv[1], sys.argv[2]
    module = KeepsGraphs() if kind == "keeps-graphs" else CausalLM()
    probe = ResidentProbe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PeftCallback(ADAPTERS[adapter]()), probe])
    trainer.fit(module, loader(n=64, batch_size=4))
    late = probe.samples[SETTLE:]
    print(json.dumps({"bytes_per_step": (late[-1] - late[0]) / (len(late) - 1)}))


if __name__ == "__main__":
    main()
