"""Convert the English part of chatterbot-corpus (BSD-3-Clause) to chat JSONL for the default example.

Each YAML conversation (alternating lines) becomes one record ``{"messages": [...], "category": ...}`` with user
and assistant turns; a trailing unanswered line is dropped. Scalars are read as strings (``Yes`` stays "Yes").
The package is located with importlib and never imported.

    python scripts/convert_chatterbot.py                 # (re)write examples/data/chatterbot_english.jsonl
    python scripts/convert_chatterbot.py --check         # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

OUTPUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "chatterbot_english.jsonl"


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus")
    return Path(spec.submodule_search_locations[0]) / "data" / "english"


def records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.yml")):
        content = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        category = path.stem
        for conversation in content.get("conversations", []):
            lines = [" ".join(str(line).split()) for line in conversation]
            lines = lines[: len(lines) - len(lines) % 2]
            if not lines or not all(lines):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(lines)]
            out.append({"messages": messages, "category": category})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(corpus_dir()))
    if args.check:
        same = args.output.is_file() and args.output.read_text(encoding="utf-8") == text
        print(f"{args.output} is {'up to date' if same else 'out of date: rerun without --check'}")
        sys.exit(0 if same else 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} conversations to {args.output}")


if __name__ == "__main__":
    main()
