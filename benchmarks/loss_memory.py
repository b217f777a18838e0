"""Peak memory and time of one training step's forward and backward: ``model(**batch).loss`` against
``causal_lm_loss`` (the output head only at labelled positions, in chunks).

A random Llama with a large vocabulary next to a small body (width 256, 4 layers, vocab 49,152 as SmolLM2's, an
untied head), LoRA r=8 on q and v; batch 8 × 256 with 32% of the targets labelled (the end of every row, as the
answers of the default run's chat data). Each variant runs in a fresh subprocess: build, one warm-up step, then
the peak resident memory of one step above the memory before it (Linux's high-water mark, reset through
``/proc/self/clear_refs``), then the median wall time of the following steps. The variants take turns going
first, round after round; ratios are taken within a round.

Usage: ``python benchmarks/loss_memory.py [--rounds 3] [--steps 4] [--out benchmarks/LOSS.md]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARCH = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=False)
BATCH, SEQ, LABELLED = 8, 256, 0.32
VARIANTS = {"full": None, "chunk 1024": 1024, "chunk 256": 256}  # None: model(**batch).loss


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def run(variant: str, steps: int) -> dict:
    import torch
    import transformers

    from lightning_peft import LoraConfig, causal_lm_loss
    from lightning_peft.surgery import attach

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH)).train()
    attach(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(1, ARCH["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :SEQ - round(LABELLED * (SEQ - 1))] = -100  # 82 of the 255 targets of each row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    chunk = VARIANTS[variant]

    def step() -> None:
        loss = model(**batch).loss if chunk is None else causal_lm_loss(model, batch, chunk_size=chunk)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: one-time allocations of the kernels and the autograd engine
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    before = status_kib("VmRSS")
    start = time.perf_counter()
    step()
    times = [time.perf_counter() - start]
    peak = status_kib("VmHWM") - before
    for _ in range(steps - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak / 1024, "step_s": statistics.median(times),
            "labelled": int((labels[:, 1:] != -100).sum()), "positions": BATCH * SEQ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "LOSS.md")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.steps)))
        return
    names = list(VARIANTS)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        results = {}
        for name in order:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            print(f"round {r + 1} {name}: {results[name]}", file=sys.stderr)
        rounds.append(results)
    import torch

    first = rounds[0]["full"]
    lines = [
        "# Benchmark: `causal_lm_loss` against `model(**batch).loss` (CPU)",
        "",
        f"Written by `python benchmarks/loss_memory.py`: {args.rounds} rounds, {args.steps} timed steps per run. "
        f"Llama width {ARCH['hidden_size']}, {ARCH['num_hidden_layers']} layers, vocab {ARCH['vocab_size']:,}, "
        f"LoRA r=8 on q and v; batch {BATCH} × {SEQ}, {first['labelled']} of {BATCH * (SEQ - 1)} targets labelled. "
        "One training step's forward and backward, no optimizer. Medians over rounds; each ratio is the median of "
        "the per-round ratios against `full`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"Python {platform.python_version()}. Load average (1, 5, 15 min) before: {', '.join(load_before)}; "
        f"after: {', '.join(Path('/proc/loadavg').read_text().split()[:3])}.",
        "",
        "| loss | peak memory above the step's start (MB) | step (s) | memory ratio | time ratio |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        peak = statistics.median(r[name]["peak_mb"] for r in rounds)
        step = statistics.median(r[name]["step_s"] for r in rounds)
        memory = statistics.median(r[name]["peak_mb"] / r["full"]["peak_mb"] for r in rounds)
        speed = statistics.median(r[name]["step_s"] / r["full"]["step_s"] for r in rounds)
        label = "`model(**batch).loss`" if VARIANTS[name] is None else f"`causal_lm_loss(chunk_size={VARIANTS[name]})`"
        lines.append(f"| {label} | {peak:.0f} | {step:.3f} | **{memory:.3f}** | **{speed:.3f}** |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
