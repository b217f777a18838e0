"""Training step time of LoRA on a Mixtral-shaped MoE model (experts as fused 3-D parameters): this package
against HF PEFT, side by side, and the frozen base without an adapter as the floor.

Both adapt what HF PEFT's ``"all-linear"`` adapts on Mixtral (attention, the fused ``gate_up_proj`` at twice the
rank, ``down_proj``, the router) at r=16, from the same random base, on the same batches; a step is forward,
backward and an AdamW step over the adapter. Rounds alternate the three setups so a busy machine slows all alike;
each figure is the median step time over the rounds (after 2 warm-up steps per round).

    python benchmarks/moe_step.py [--rounds 3] [--steps 6] [--out benchmarks/MOE.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from lightning_peft import LoraConfig
from lightning_peft.surgery import attach

SIZES = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
BATCH, LENGTH = 4, 128


def build(setup: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**SIZES)).train()
    if setup == "lightning_peft":
        attach(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    elif setup == "HF PEFT":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        model.requires_grad_(False)
        model.model.norm.weight.requires_grad_(True)  # something to step, so the floor runs backward too
    return model


def step_times(setup: str, steps: int) -> list[float]:
    model = build(setup)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(2 + steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("MOE.md"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setups = ("frozen base (floor)", "lightning_peft", "HF PEFT")
    times: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(args.rounds):
        for setup in setups:
            times[setup] += step_times(setup, args.steps)
    median = {s: statistics.median(t) for s, t in times.items()}
    ours, theirs = median["lightning_peft"], median["HF PEFT"]
    lines = [
        "# LoRA on fused MoE experts: step time against HF PEFT", "",
        f"Mixtral-shaped model ({SIZES['num_hidden_layers']} layers, hidden {SIZES['hidden_size']}, "
        f"{SIZES['num_local_experts']} experts of {SIZES['intermediate_size']}, top-{SIZES['num_experts_per_tok']}), "
        f"batch {BATCH} x {LENGTH} tokens, CPU, {torch.get_num_threads()} threads; r=16 on HF PEFT's \"all-linear\" "
        f"targets. Median of {args.rounds} rounds x {args.steps} steps (`python benchmarks/moe_step.py`); load "
        f"average {os.getloadavg()[0]:.1f} at the end (a shared machine slows the three setups alike: read the "
        f"ratios).", "",
        "| setup | step time (ms) |", "|---|---|",
        *(f"| {s} | {1000 * median[s]:.1f} |" for s in setups), "",
        f"lightning_peft / HF PEFT: **{ours / theirs:.2f}x** the step time; adapter overhead above the floor "
        f"{(ours - median[setups[0]]) / max(theirs - median[setups[0]], 1e-9):.2f}x HF PEFT's.", "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
