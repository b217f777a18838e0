"""Where a training step's time goes: the benchmark model's step under ``torch.profiler``, without Lightning.

Runs the same forward, backward and AdamW step for three variants in one process, interleaved: the frozen base
with no adapter (the floor), our LoRA layers and HF PEFT's. Prints CPU seconds per step (less sensitive to a
shared machine than wall time) and the operators that differ most from the floor.

    python benchmarks/profile_step.py --steps 6
    python benchmarks/profile_step.py --steps 6 --nf4    # the same on an NF4 base (QLoRA)
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from compare import LEARNING_RATE, LORA, MODEL, NF4, build_model

VARIANTS = ("floor", "ours", "theirs")


def build(variant: str, nf4: bool):
    model = build_model()
    if nf4:  # the same bitsandbytes layers under both adapters: what differs is the adapter alone
        from lightning_peft import QuantizationConfig
        from lightning_peft.quantization import quantize_model, skip_paths

        config = QuantizationConfig(**NF4, bnb_4bit_compute_dtype="float32")
        quantize_model(model, config, "cpu", skip_paths(model, config))
        model.requires_grad_(False)
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif variant == "ours":
        from lightning_peft import LoraConfig
        from lightning_peft.surgery import attach

        attach(model, LoraConfig(**LORA))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None)


def step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--nf4", action="store_true", help="quantize the base to NF4 first (QLoRA)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    ids = torch.randint(1, MODEL["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    built = {v: build(v, args.nf4) for v in VARIANTS}
    for v in VARIANTS:
        step(*built[v], ids)  # warm-up
    cpu, wall = defaultdict(list), defaultdict(list)
    for _ in range(args.steps):
        for v in VARIANTS:
            c, w = time.process_time(), time.perf_counter()
            step(*built[v], ids)
            cpu[v].append(time.process_time() - c)
            wall[v].append(time.perf_counter() - w)
    med = {v: sorted(cpu[v])[len(cpu[v]) // 2] for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:7s} median CPU {med[v]:.3f} s/step ({med[v] / med['floor'] - 1:+.1%} over floor), "
              f"median wall {sorted(wall[v])[len(wall[v]) // 2]:.3f} s")
    tables = {}
    for v in VARIANTS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(*built[v], ids)
        tables[v] = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
    keys = set().union(*tables.values())
    rows = sorted(keys, key=lambda k: -max(abs(tables[v].get(k, (0, 0))[0] - tables["floor"].get(k, (0, 0))[0])
                                            for v in ("ours", "theirs")))
    print(f"\n{'operator (self CPU ms, calls)':40s}" + "".join(f"{v:>20s}" for v in VARIANTS))
    for key in rows[:args.top]:
        cells = "".join(f"{tables[v].get(key, (0, 0))[0] / 1e3:12.1f} ({tables[v].get(key, (0, 0))[1]:4d})"
                        for v in VARIANTS)
        print(f"{key[:40]:40s}{cells}")
    print(f"{'total':40s}" + "".join(f"{sum(t for t, _ in tables[v].values()) / 1e3:20.1f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
