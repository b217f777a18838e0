"""Write the trainable-parameter table of docs/methods.md by building every method on one model and counting.

The model is SmolLM2-135M's architecture (a Llama; the base of ``make demo``) created on the meta device, so the
counts are exact and nothing is downloaded or allocated. Run from the repository root:

    python docs/gen_methods_table.py           # rewrite the table in docs/methods.md
    python docs/gen_methods_table.py --check   # exit 1 if the table is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_peft import (
    AdaLoraConfig,
    BottleneckAdapterConfig,
    GaLoreConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from lightning_peft.methods.base import CONFIG_CLASSES, AdapterConfig
from lightning_peft.surgery import attach, count_parameters

DOC = Path(__file__).resolve().parent / "methods.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# Chosen rows (method, config as written in the table, config); every registered method without one gets a row with
# its defaults. Whether it merges and whether HF PEFT loads it are read from the method itself.
ROWS: list[tuple[str, str, AdapterConfig]] = [
    ("LoRA", 'r=16, target_modules=["q_proj", "v_proj"]', LoraConfig(r=16, target_modules=["q_proj", "v_proj"])),
    ("LoRA", "r=16, q/k/v/o", LoraConfig(r=16, target_modules=ATTENTION)),
    ("LoRA", 'r=16, "all-linear"', LoraConfig(r=16, target_modules="all-linear")),
    ("rsLoRA", 'r=16, "all-linear", use_rslora=True', LoraConfig(r=16, target_modules="all-linear", use_rslora=True)),
    ("LoRA+", 'r=16, "all-linear", loraplus_lr_ratio=16',
     LoraConfig(r=16, target_modules="all-linear", loraplus_lr_ratio=16)),
    ("DoRA", 'r=16, "all-linear", use_dora=True', LoraConfig(r=16, target_modules="all-linear", use_dora=True)),
    ("AdaLoRA", "init_r=12, target_r=8, q/k/v/o",
     AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=ATTENTION)),
    ("IA3", "defaults (k_proj, v_proj, down_proj)", IA3Config()),
    ("Bottleneck", "reduction_factor=16, placement=both", BottleneckAdapterConfig(reduction_factor=16)),
    ("Prompt tuning", "num_virtual_tokens=20", PromptTuningConfig(num_virtual_tokens=20)),
    ("Prefix tuning", "num_virtual_tokens=20", PrefixTuningConfig(num_virtual_tokens=20)),
    # GaLore adds no adapter: it trains the targeted weights themselves (merging has nothing to fold in).
    ("GaLore", "rank=128, q/k/v/o + MLP", GaLoreConfig(target_modules=ATTENTION + MLP, rank=128)),
]


def smollm2_135m() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def table() -> str:
    base_total = count_parameters(smollm2_135m())[1]
    source = f"Measured on SmolLM2-135M's architecture ({base_total / 1e6:.1f}M parameters), by `docs/gen_methods_table.py`."
    lines = [source, "",
             "| Method | Config | Trainable parameters | % of base | Mergeable | HF PEFT loads it |",
             "|---|---|---:|---:|---|---|"]
    shown_types = {type(config).peft_type for _, _, config in ROWS}
    rows = ROWS + [(sys.modules[cls.__module__].__doc__.split(" (")[0], "defaults", cls())
                   for peft_type, cls in sorted(CONFIG_CLASSES.items()) if peft_type not in shown_types]
    for name, shown, config in rows:
        model = smollm2_135m()
        layers = attach(model, config)
        trainable, _ = count_parameters(model)
        mergeable = all(layer.mergeable for layer in layers.values())
        lines.append(f"| {name} | `{shown}` | {trainable:,} | {100 * trainable / base_total:.3f} | {_yes(mergeable)} "
                     f"| {_yes(type(config).known_to_hf_peft)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/methods.md is out of date")
    args = parser.parse_args()
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{table()}\n{END}{tail}"
    if args.check:
        if updated != text:
            print(f"{DOC} is out of date; run python docs/gen_methods_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
