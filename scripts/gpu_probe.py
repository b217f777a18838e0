"""Helpers of ``scripts/gpu_check.sh``, the first run on a GPU: a random ~1B Llama to train, the callback that
measures what setting it up costs in GPU memory, and the check that a GPU checkpoint loads on a CPU.

    python scripts/gpu_probe.py build DIR            # random-weight Llama (TinyLlama-1.1B's shape), bfloat16
    python scripts/gpu_probe.py cpu-load DIR CKPT    # the checkpoint's adapter on the CPU model: finite logits
    SetupMemoryProbe(out=FILE)                       # a callback for the CLI (``gpu_probe.SetupMemoryProbe``)

The memory target: the peak GPU memory of setup (quantizing the base, injecting the adapter) is at most the 4-bit
model's footprint plus 10% plus 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ARCH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def cuda_bytes(module: torch.nn.Module) -> int:
    """Bytes the module holds on the GPU: parameters, buffers and the 4-bit layers' quantization statistics."""
    seen: set[int] = set()
    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
            state = state.state2 if getattr(state, "nested", False) else None
    for tensor in tensors:
        if tensor.device.type == "cuda" and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.nbytes
    return total


class SetupMemoryProbe(Callback):
    """Writes to ``out`` (JSON) the peak GPU memory since the process started, taken when ``fit`` starts (the
    model quantized, adapted and on the GPU; no batch and no optimizer state yet), and the model's footprint."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer, pl_module) -> None:
        peak, footprint = torch.cuda.max_memory_allocated(), cuda_bytes(pl_module)
        target = 1.1 * footprint + 2**30
        record = {"setup_peak_bytes": peak, "footprint_bytes": footprint, "target_bytes": target,
                  "ok": peak <= target}
        Path(self.out).write_text(json.dumps(record))


def build(directory: Path) -> None:
    """A random-weight Llama of about 1.1B parameters in bfloat16, with a tiny word-level tokenizer."""
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_assets import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(**ARCH, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 1B values is quicker on the GPU
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e9:.2f}B parameters written to {directory}")


def cpu_load(directory: Path, checkpoint: Path) -> None:
    """Load the adapter of a checkpoint written on the GPU into the base on the CPU, and run it."""
    import transformers

    from lightning_peft import load_adapter

    assert not torch.cuda.is_available(), "run with CUDA_VISIBLE_DEVICES= so that nothing can use the GPU"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model = load_adapter(model, checkpoint)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all(), "non-finite logits"
    print(f"{checkpoint} loaded on the CPU: logits {tuple(logits.shape)}, finite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("directory", type=Path)
    load = sub.add_parser("cpu-load")
    load.add_argument("directory", type=Path)
    load.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.directory)
    else:
        cpu_load(args.directory, args.checkpoint)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
