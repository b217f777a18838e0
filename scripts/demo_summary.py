"""Print what `make demo` did: time, validation perplexity before and after, answers before and after, and
where the adapter, the merged model and the curves are."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def last_value(metrics: Path, column: str) -> float:
    values = [row[column] for row in csv.DictReader(metrics.open()) if row.get(column)]
    return float(values[-1])


def answers(run: Path) -> dict[str, str]:
    lines = (run / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    return {record["prompt"]: record["response"] for record in map(json.loads, lines)}


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--seconds", type=int, required=True)
    args = parser.parse_args()
    base, tuned = args.run / "base", args.run / "finetune"
    before, after = last_value(base / "metrics.csv", "val_perplexity"), last_value(tuned / "metrics.csv", "val_perplexity")
    minutes, seconds = divmod(args.seconds, 60)
    print(f"\nDone in {minutes}m{seconds:02d}s.")
    print(f"Validation perplexity (held-out conversations): {before:.2f} before, {after:.2f} after.")
    old, new = answers(base), answers(tuned)
    for prompt in new:
        print(f"\n> {prompt}\n  before: {old.get(prompt, '')}\n  after:  {new[prompt]}")
    adapter, merged = tuned / "adapter", tuned / "merged"
    weights = adapter / "adapter_model.safetensors"
    print(f"\nAdapter:      {adapter}/ ({weights.stat().st_size / 2**20:.1f} MiB, HF PEFT format)")
    print(f"Merged model: {merged}/ ({size_mib(merged):.0f} MiB, loads with AutoModelForCausalLM.from_pretrained)")
    print(f"Curves:       {args.run / 'report.png'}")
    print(f"Try it:       .venv/bin/lightning-peft generate {merged} --prompt 'What do you like to do?'")


if __name__ == "__main__":
    main()
