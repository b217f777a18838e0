"""Host memory of exporting a merged model from a 4-bit base: the streaming export against building the whole
merged state dict first.

A random Llama of about 0.54B parameters (the architecture of ``streaming_memory.py``) is built in bfloat16,
quantized to 4-bit NF4 (bfloat16 compute) with LoRA r=16 on q, k, v, o on top, on the CPU (or on the GPU with
``--accelerator cuda``, where the merge runs too). Each side then exports it merged in bfloat16, in a fresh
subprocess, and reports the host's resident set before the export and its peak during the export (the kernel's
high-water mark, reset just before with ``/proc/self/clear_refs``):

- ``streaming``: ``export_merged`` (one layer merged at a time, each tensor written as it comes);
- ``whole dict``: the same merged tensors gathered in one state dict, then written with safetensors'
  ``save_file`` into the same atomic directory, which is what ``save_pretrained(state_dict=...)`` amounts to.

Before the baseline is read, ``malloc_trim`` returns to the system the heap that building and quantizing the
model freed, so the export cannot hide its working set in memory the process already held.

Usage: ``python benchmarks/merge_memory.py [--accelerator cuda] [--quick] [--out FILE]`` (default
``benchmarks/MERGE.md``, ``MERGE-cuda.md`` on CUDA; ``--quick``: 8 layers).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCH = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIDES = ("streaming", "whole dict")


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(side: str, out: str, device: str, layers: int) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    from lightning_peft import LoraConfig, QuantizationConfig, export_merged
    from lightning_peft.atomic import atomic_directory
    from lightning_peft.merge import merged_tensors
    from lightning_peft.quantization import quantize_model, skip_paths
    from lightning_peft.surgery import attach

    torch.manual_seed(0)
    architecture = transformers.LlamaConfig(**{**ARCH, "num_hidden_layers": layers})
    model = transformers.AutoModelForCausalLM.from_config(architecture, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    quantize_model(model, config, device, skip_paths(model, config))
    model.to(device)  # what stays unquantized (embeddings, norms, head)
    attach(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back the heap that building the model freed: no hidden reserve
    before = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current set
    start = time.perf_counter()
    if side == "streaming":
        export_merged(model, out, dtype="bfloat16")
    else:
        with atomic_directory(out) as tmp:  # written as durably as export_merged writes (fsync, rename)
            save_file(dict(merged_tensors(model, torch.bfloat16)), tmp / "model.safetensors", metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"params": params, "before": before, "peak": status_bytes("VmHWM"), "file": size, "seconds": seconds,
            "device": str(next(model.parameters()).device)}


def measure(side: str, out: Path, device: str, layers: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--side", side, "--accelerator", device, "--layers",
                             str(layers), str(out)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("output", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="8 layers instead of 28")
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    layers = args.layers or (8 if args.quick else ARCH["num_hidden_layers"])
    if args.side:
        print(json.dumps(run(args.side, args.output, args.accelerator, layers)))
        return
    out = args.out or Path(__file__).with_name("MERGE-cuda.md" if args.accelerator == "cuda" else "MERGE.md")

    import importlib.metadata as md

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = {side: measure(side, Path(tmp) / side.replace(" ", "_"), args.accelerator, layers) for side in SIDES}
    mb = 2**20
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "bitsandbytes", "safetensors"))
    params = results["streaming"]["params"]
    lines = [
        "# Merged export from a 4-bit base: host memory",
        "",
        f"Produced by `python benchmarks/merge_memory.py{' --accelerator cuda' if args.accelerator == 'cuda' else ''}"
        f"{' --quick' if args.quick else ''}`.",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}, torch {torch.__version__}, "
        f"{versions}.",
        f"- Model: random Llama, {params / 1e9:.2f}B parameters ({layers} layers, hidden "
        f"{ARCH['hidden_size']}, MLP {ARCH['intermediate_size']}, vocab {ARCH['vocab_size']}), 4-bit NF4 with "
        f"bfloat16 compute, LoRA r=16 on {', '.join(TARGETS)}, on {results['streaming']['device']}; exported "
        f"merged in bfloat16.",
        "- Memory: the peak resident set during the export (kernel high-water mark, reset just before) minus the "
        "resident set before it, each side in a fresh process.",
        "",
        "| side | exported files (MiB) | resident before (MiB) | peak during export (MiB) | above before (MiB) "
        "| above before / file size | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in results.items():
        extra = r["peak"] - r["before"]
        lines.append(f"| {side} | {r['file'] / mb:.0f} | {r['before'] / mb:.0f} | {r['peak'] / mb:.0f} | "
                     f"{extra / mb:.0f} | {extra / r['file']:.2f} | {r['seconds']:.1f} |")
    lines += ["", f"Load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on "
              f"{os.cpu_count()} cores: on a shared machine the seconds carry other work's noise; the memory does "
              f"not.", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
