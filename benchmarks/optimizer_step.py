"""Optimizer step time over a LoRA adapter on CUDA: paged AdamW (the default on CUDA) against the alternatives.

bitsandbytes' optimizers synchronize the GPU after every parameter's update, and page only the state of tensors
of 100,000 values or more. This measures what that costs for an adapter's many small tensors: LoRA r=16 on every
linear layer of a Llama-3-8B-shaped model (32 layers x 7 projections x A and B: 448 tensors, 42M values), each
optimizer stepping the same random gradients. Step times are medians over ``--steps`` steps after 5 warm-up steps,
the GPU synchronized around each.

    python benchmarks/optimizer_step.py [--quick] [--out benchmarks/OPTIMIZER-cuda.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

HIDDEN, MLP, LAYERS, RANK = 4096, 14336, 32, 16
SHAPES = [(HIDDEN, HIDDEN)] * 2 + [(HIDDEN, 1024)] * 2 + [(HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]  # (in, out)


def adapter(layers: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = []
    for _ in range(layers):
        for fan_in, fan_out in SHAPES:
            params += [torch.nn.Parameter(torch.randn(RANK, fan_in, device="cuda") * 0.01),
                       torch.nn.Parameter(torch.zeros(fan_out, RANK, device="cuda"))]
    return params


def build(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import bitsandbytes.optim as bnb_optim

    if name == "torch AdamW (foreach)":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "torch AdamW (fused)":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return getattr(bnb_optim, name.split()[-1])(params, lr=1e-4)


OPTIMIZERS = ("torch AdamW (foreach)", "torch AdamW (fused)", "bitsandbytes AdamW32bit",
              "bitsandbytes PagedAdamW32bit", "bitsandbytes PagedAdamW8bit")


def measure(name: str, layers: int, steps: int) -> dict:
    params = adapter(layers)
    optimizer = build(name, params)
    times = []
    for step in range(5 + steps):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    paged = sum(getattr(s.get("state1"), "is_paged", False) for s in optimizer.state.values())
    return {"ms": 1000 * statistics.median(times), "tensors": len(params), "paged": paged,
            "values": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 layers, 10 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("OPTIMIZER-cuda.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("optimizer_step.py measures CUDA optimizers and needs a CUDA GPU.")
    layers, steps = (8, 10) if args.quick else (LAYERS, args.steps or 50)
    results = {name: measure(name, layers, steps) for name in OPTIMIZERS}
    first = next(iter(results.values()))
    lines = [
        "# Optimizer step over a LoRA adapter (CUDA)",
        "",
        f"Produced by `python benchmarks/optimizer_step.py{' --quick' if args.quick else ''}` on "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: LoRA r={RANK} on the 7 projections of "
        f"{layers} Llama-3-8B-shaped layers ({first['tensors']} tensors, {first['values'] / 1e6:.1f}M values), "
        f"median of {steps} steps.",
        "",
        "| optimizer | step (ms) | vs torch AdamW (fused) | state tensors paged |",
        "|---|---|---|---|",
    ]
    fused = results["torch AdamW (fused)"]["ms"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ms']:.2f} | {r['ms'] / fused:.2f}x | {r['paged']} of {r['tensors']} |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
