"""Peak memory of getting a 4-bit model plus LoRA through one training step: transformers + PEFT against
PeftStrategy's streaming quantize-at-setup.

A random Llama of about 0.54B parameters is saved in bfloat16 with ``save_pretrained`` (sharded, like a hub
checkpoint) to a temporary directory. Each side then runs in a fresh subprocess, which records its resident
memory after its imports (the baseline) and its peak resident memory at the end (``VmHWM``):

- transformers: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(4-bit NF4, double quant))``,
  ``peft.get_peft_model`` with LoRA r=16 on q, k, v, o, one AdamW step;
- lightning_peft: a LightningModule that creates the model on the meta device from the directory's config,
  ``Trainer(strategy=PeftStrategy(quantization=...), callbacks=[PeftCallback(...)], max_steps=1)``, its loss
  from ``causal_lm_loss`` (the output head in chunks, no logits for the whole batch), in a process that calls
  ``map_large_allocations()`` first, as docs/qlora.md says to on a CPU and as the command does under a quantizing
  strategy; a third side leaves that call out (glibc's default heap), to show what it saves.

Usage: ``python benchmarks/streaming_memory.py [--repeats N] [--out benchmarks/STREAMING.md]``.

``--cli`` measures the command line instead: ``lightning-peft fit`` with ``CausalLMModule`` on the same
checkpoint (plus a word-level tokenizer trained on the example chat data), one training step of LoRA on the
bfloat16 base, against the same command with ``--trainer.strategy=qlora`` (the module creates the base on the meta
device and the strategy streams it in, quantizing each weight as it arrives). Each run is ``lightning_peft.cli.main``
in a fresh interpreter that records its resident memory after importing it (the baseline) and its peak at the end.
It writes the "Through the CLI" section of ``--out``, leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 2, 64
SIDES = ("transformers", "lightning_peft", "lightning_peft, glibc's default heap")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: a child starts with its parent's resident
    set at fork as its maximum, so it would report the benchmark's own peak (building the model) for every side."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # kilobytes


def build(directory: Path, arch: dict = ARCH) -> int:
    """A random bfloat16 Llama of ``arch`` saved in shards to ``directory``; its parameter count."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="300MB")
    return sum(p.numel() for p in model.parameters())


def batch():
    import torch

    ids = torch.randint(1, ARCH["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return ids


def run_transformers(directory: str) -> dict:
    import bitsandbytes  # noqa: F401  (imported before the baseline on both sides)
    import peft
    import torch
    import transformers

    baseline = rss_bytes()
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = batch()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return {"baseline": baseline, "peak": peak_bytes()}


def run_lightning_peft(directory: str, default_heap: bool) -> dict:
    import bitsandbytes  # noqa: F401  (imported before the baseline on both sides)
    import lightning as L
    import torch
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_peft import LoraConfig, PeftCallback, PeftStrategy, QuantizationConfig, causal_lm_loss

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is None:
                with torch.device("meta"):
                    self.model = transformers.AutoModelForCausalLM.from_config(
                        transformers.AutoConfig.from_pretrained(directory))

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return causal_lm_loss(self.model, {"input_ids": ids, "labels": ids})  # the package's lean loss

        def configure_optimizers(self):
            return None

    from lightning_peft.streaming import map_large_allocations

    if not default_heap:
        map_large_allocations()
    baseline = rss_bytes()
    quantization = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype="bfloat16")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        strategy=PeftStrategy(quantization=quantization),
                        callbacks=[PeftCallback(LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
                                                learning_rate=1e-4, optim="adamw_torch")])
    trainer.fit(Module(), DataLoader(TensorDataset(batch()), batch_size=BATCH))
    return {"baseline": baseline, "peak": peak_bytes()}


CHAT_DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "chatterbot_english.jsonl"
CLI_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_peft.PeftCallback
      init_args:
        adapter:
          class_path: lightning_peft.LoraConfig
          init_args: {{r: 16, lora_alpha: 32, target_modules: {targets}}}
model:
  class_path: lightning_peft.CausalLMModule
  init_args: {{model_name_or_path: {model}, dtype: bfloat16}}
data:
  class_path: lightning_peft.ChatDataModule
  init_args: {{train_file: {data}, max_length: {seq}, batch_size: {batch}, max_train_examples: 64,
               max_val_examples: 4}}
"""
CLI_SIDES = {"lora": [], "qlora": ["--trainer.strategy=qlora"],
             "qlora, glibc's default heap": ["--trainer.strategy=qlora"]}


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of the example chat data, with a ChatML template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for line in CHAT_DATA.read_text().splitlines() for m in json.loads(line)["messages"]]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=ARCH["vocab_size"],
                                                                   special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="<|im_end|>", model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(directory)


def cli_args(directory: Path, side: str) -> list[str]:
    config = directory / "fit.yaml"
    return ["fit", f"--config={config}", *CLI_SIDES[side]]


def run_cli(directory: str, side: str) -> dict:
    import bitsandbytes  # noqa: F401  (imported before the baseline on both sides)

    from lightning_peft import cli

    if "default heap" in side:  # what the command's allocator setting saves, measured by leaving it out
        cli.map_large_allocations = lambda: None
    baseline = rss_bytes()
    cli.main(cli_args(Path(directory), side))
    return {"baseline": baseline, "peak": peak_bytes()}


def measure(side: str, directory: Path) -> dict:
    """Run one side in a fresh interpreter, so neither sees the other's allocations."""
    out = subprocess.run([sys.executable, __file__, "--side", side, str(directory)], capture_output=True, text=True,
                         check=False, cwd=directory)  # the command saves its config.yaml there
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=[*SIDES, *CLI_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("directory", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cli", action="store_true", help="measure lightning-peft fit, LoRA against QLoRA")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("STREAMING.md"))
    args = parser.parse_args()
    if args.side in CLI_SIDES:
        print(json.dumps(run_cli(args.directory, args.side)))
        return
    if args.side:
        result = (run_transformers(args.directory) if args.side == "transformers" else
                  run_lightning_peft(args.directory, default_heap="default heap" in args.side))
        print(json.dumps(result))
        return
    if args.cli:
        main_cli(args.repeats, args.out)
        return

    import importlib.metadata as md

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        params = build(directory)
        disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        results = {side: [measure(side, directory) for _ in range(args.repeats)]
                   for side in SIDES}
    mb = 2**20
    over = {side: [(r["peak"] - r["baseline"]) / mb for r in runs] for side, runs in results.items()}
    ratio = max(over["lightning_peft"]) / min(over["transformers"])
    typical = statistics.median(over["lightning_peft"]) / statistics.median(over["transformers"])
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "peft", "bitsandbytes", "lightning"))
    lines = [
        "# Streaming quantize-at-setup: peak memory",
        "",
        f"Produced by `python benchmarks/streaming_memory.py --repeats {args.repeats}`.",
        "",
        f"- Machine: {machine()}; {versions}.",
        f"- Model: random Llama, {params / 1e9:.2f}B parameters ({ARCH['num_hidden_layers']} layers, hidden "
        f"{ARCH['hidden_size']}, MLP {ARCH['intermediate_size']}, vocab {ARCH['vocab_size']}), saved in bfloat16 "
        f"with `save_pretrained` ({disk / mb:.0f} MiB of safetensors shards).",
        f"- Both: 4-bit NF4, double quantization, bfloat16 compute; LoRA r=16 on {', '.join(TARGETS)}; one "
        f"training step on a batch of {BATCH}x{SEQ} tokens (forward, backward, AdamW step); CPU.",
        "- Memory: peak resident set (`VmHWM`) minus the resident set after imports, each side in a fresh "
        "process.",
        "",
        "| side | baseline after imports (MiB) | peak (MiB) | peak above baseline (MiB) |",
        "|---|---|---|---|",
    ]
    for side, runs in results.items():
        for r, extra in zip(runs, over[side]):
            lines.append(f"| {side} | {r['baseline'] / mb:.0f} | {r['peak'] / mb:.0f} | {extra:.0f} |")
    lines += [
        "",
        f"**Ratio** (worst lightning_peft run over best transformers run, above baseline): **{ratio:.2f}x** "
        f"(target: at most 0.4x); median over median: **{typical:.2f}x**. The peaks vary from run to run with how "
        f"the C allocator reuses freed blocks, on both sides. With glibc's default heap: "
        f"**{statistics.median(over[SIDES[2]]) / statistics.median(over['transformers']):.2f}x** (median over "
        f"median).",
        "",
    ]
    write_head(args.out, lines)
    print("\n".join(lines))


def main_cli(repeats: int, out: Path) -> None:
    import importlib.metadata as md

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        params = build(directory / "model")
        save_tokenizer(directory / "model")
        (directory / "fit.yaml").write_text(CLI_CONFIG.format(targets=json.dumps(TARGETS), model=directory / "model",
                                                              data=CHAT_DATA, seq=SEQ, batch=BATCH))
        command = " ".join(["lightning-peft", *cli_args(directory, "qlora")]).replace(tmp, "$TMP")
        config = (directory / "fit.yaml").read_text().replace(tmp, "$TMP").replace(f"{CHAT_DATA.parents[2]}/", "")
        results = {side: [measure(side, directory) for _ in range(repeats)] for side in CLI_SIDES}
    mb = 2**20
    over = {side: [(r["peak"] - r["baseline"]) / mb for r in runs] for side, runs in results.items()}
    ratio = max(over["qlora"]) / min(over["lora"])
    typical = statistics.median(over["qlora"]) / statistics.median(over["lora"])
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "bitsandbytes", "lightning", "gguf"))
    lines = [
        "## Through the CLI: `lightning-peft fit`, LoRA on the bfloat16 base against QLoRA",
        "",
        f"Produced by `python benchmarks/streaming_memory.py --cli --repeats {repeats}`.",
        "",
        f"- Machine: {machine()}; {versions}.",
        f"- Model: the same random Llama ({params / 1e9:.2f}B parameters, bfloat16 safetensors shards), with a "
        f"word-level tokenizer of the example chat data; `CausalLMModule(dtype=bfloat16)`.",
        f"- Both: LoRA r=16 on {', '.join(TARGETS)}, one training step on a batch of {BATCH} chat examples of at "
        f"most {SEQ} tokens, no validation, the optimizer each side gets by default (torch AdamW; bitsandbytes' "
        f"AdamW32bit under QLoRA on a CPU).",
        "- QLoRA: `--trainer.strategy=qlora` (NF4, double quantization, bfloat16 compute). `CausalLMModule` creates "
        "the base on the meta device and the strategy streams it in from the safetensors files, quantizing each "
        "weight as it arrives.",
        "- Memory: peak resident set (`VmHWM`) minus the resident set after importing `lightning_peft.cli`, each "
        "run `lightning_peft.cli.main([...])` (what the `lightning-peft` command runs) in a fresh process. The "
        "command has glibc map allocations of 1 MiB and more on their own (`streaming.map_large_allocations`); the "
        "last side leaves that out, to show what it saves.",
        "",
        "Command (QLoRA side; the LoRA side leaves out the last option):",
        "",
        "```",
        command,
        "```",
        "",
        "`$TMP/fit.yaml`:",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
        "| side | baseline after imports (MiB) | peak (MiB) | peak above baseline (MiB) |",
        "|---|---|---|---|",
    ]
    for side, runs in results.items():
        for r, extra in zip(runs, over[side]):
            lines.append(f"| {side} | {r['baseline'] / mb:.0f} | {r['peak'] / mb:.0f} | {extra:.0f} |")
    heap = statistics.median(over["qlora, glibc's default heap"]) / statistics.median(over["lora"])
    lines += [
        "",
        f"**Ratio** (worst QLoRA run over best LoRA run, above baseline): **{ratio:.2f}x** (target: at most 0.5x); "
        f"median over median: **{typical:.2f}x**; with glibc's default heap: **{heap:.2f}x** (median over median).",
        "",
    ]
    write_section(out, lines)
    print("\n".join(lines))


def write_head(path: Path, lines: list[str]) -> None:
    """Put ``lines`` in place of what ``path`` holds before its first ``## `` section."""
    text = path.read_text() if path.exists() else ""
    following = text.find("\n## ")
    path.write_text("\n".join(lines) + ("\n" + text[following + 1:] if following >= 0 else ""))


def write_section(path: Path, lines: list[str]) -> None:
    """Put ``lines`` (a ``## `` section) in place of the section of ``path`` with the same heading, or at its end."""
    text = path.read_text() if path.exists() else ""
    heading = lines[0]
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" if text else ""
        path.write_text(text + "\n".join(lines))
        return
    following = text.find("\n## ", start + len(heading))
    rest = text[following + 1:] if following >= 0 else ""
    path.write_text(text[:start] + "\n".join(lines) + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
