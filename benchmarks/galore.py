"""GaLore against AdamW full fine-tuning of the same weights and against LoRA r=16: optimizer state, peak memory
and loss after the same steps.

The model, data, batch and learning rate are those of ``benchmarks/compare.py`` (a random Llama, hidden 512, 8
layers, vocab 32k: about 58M parameters; random token rows of 128, batch 4). Every contender targets all attention
and MLP projections (q, k, v, o, gate, up, down) and freezes the rest:

- ``adamw``: the targeted weights train in full under torch's AdamW (plain Lightning, no PeftCallback);
- ``galore``: ``GaLoreConfig(rank=128, update_proj_gap=200, scale=0.25)``, and its 8-bit variant;
- ``lora``: ``LoraConfig(r=16, lora_alpha=32)``.

Each runs in a fresh process, all side by side (peak RSS is each process's high-water mark), for the same steps
from the same initial weights; the training loss is the mean of the last 5 steps, the evaluation loss the mean over
8 held-out batches after training. Everything is deterministic, so one round suffices; memory and loss are the
measures, not time (the machine is shared).

Run from the repository root::

    python benchmarks/galore.py              # 20 steps, writes benchmarks/GALORE.md
    python benchmarks/galore.py --steps 4    # a quick look, prints only (fewer than 10 steps)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import BATCH_SIZE, LEARNING_RATE, MODEL, SEQ_LEN, build_model, data_loader  # noqa: E402

OUT = HERE / "GALORE.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("adamw", "galore", "galore8bit", "lora")


def eval_loss(model) -> float:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, MODEL["vocab_size"], (8 * BATCH_SIZE, SEQ_LEN), generator=generator)
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=rows, labels=rows).loss.item() for rows in ids.split(BATCH_SIZE)]
    return sum(losses) / len(losses)


def run(contender: str, steps: int) -> dict:
    import lightning as L

    from lightning_peft import GaLoreConfig, LoraConfig, PeftCallback

    L.seed_everything(0, verbose=False)
    losses: list[float] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model()

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids).loss
            losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            if contender != "adamw":
                return None  # PeftCallback builds GaLore's optimizer, or AdamW over LoRA's tensors
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LEARNING_RATE)

    module = Module()
    callbacks = []
    if contender == "adamw":
        module.model.requires_grad_(False)
        for name, param in module.model.named_parameters():
            if any(f".{t}." in name for t in TARGETS):
                param.requires_grad_(True)
    elif contender.startswith("galore"):
        config = GaLoreConfig(target_modules=TARGETS, rank=128, update_proj_gap=200, scale=0.25,
                              optim="adamw8bit" if contender == "galore8bit" else "adamw")
        callbacks.append(PeftCallback(config, learning_rate=LEARNING_RATE))
    else:
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        callbacks.append(PeftCallback(config, learning_rate=LEARNING_RATE, optim="adamw_torch"))
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=callbacks)
    trainer.fit(module, data_loader(steps))
    (optimizer,) = trainer.optimizers
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.dim() > 0)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"optimizer": type(optimizer).__name__, "state_bytes": state_bytes, "trained": trained,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_loss": sum(losses[-5:]) / len(losses[-5:]), "eval_loss": eval_loss(module.model)}


def table(results: dict[str, dict], steps: int) -> str:
    base = results["adamw"]
    rows = ["| contender | optimizer | trained params | optimizer state | vs AdamW | peak RSS | vs AdamW | "
            f"train loss (last 5 of {steps}) | eval loss | eval vs AdamW |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['optimizer']} | {r['trained'] / 1e6:.1f}M | {r['state_bytes'] / 2**20:.1f} MiB | "
                    f"{r['state_bytes'] / base['state_bytes']:.3f}x | {r['peak_rss_mb']:.0f} MiB | "
                    f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | "
                    f"{r['eval_loss'] / base['eval_loss']:.4f}x |")
    return "\n".join(rows)


def report(results: dict[str, dict], steps: int) -> str:
    cpu = platform.processor() or platform.machine()
    return ("# GaLore: optimizer state, memory and loss\n\n"
            "Written by `python benchmarks/galore.py` (see its docstring for the set-up): the 58M Llama of "
            f"`benchmarks/compare.py`, all attention and MLP projections targeted, {steps} steps of batch "
            f"{BATCH_SIZE} x {SEQ_LEN} random tokens at lr {LEARNING_RATE}, float32, CPU ({cpu}, torch "
            f"{torch.__version__}). GaLore: rank 128, update_proj_gap 200, scale 0.25. Optimizer state counts every "
            "state tensor the optimizer holds (GaLore: projection and projected moments); peak RSS is the whole "
            "process's (model, activations, gradients, state).\n\n"
            f"{table(results, steps)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=CONTENDERS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.steps)))
        return
    # Side by side: each process has its own peak RSS and the losses are deterministic; time is not measured.
    children = {c: subprocess.Popen([sys.executable, __file__, "--child", c, "--steps", str(args.steps)],
                                    stdout=subprocess.PIPE, text=True) for c in CONTENDERS}
    results = {}
    for contender, child in children.items():
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"{contender} failed (exit {child.returncode})")
        results[contender] = json.loads(out.strip().splitlines()[-1])
    text = report(results, args.steps)
    print(text)
    if args.steps >= 10:
        OUT.write_text(text)


if __name__ == "__main__":
    main()
