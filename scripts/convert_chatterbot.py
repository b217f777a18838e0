"""Convert the English part of chatterbot-corpus (BSD-3-Clause) to chat JSONL for the default example, and to
input/target pairs for the encoder-decoder example.

Each YAML conversation (alternating lines) becomes one record ``{"messages": [...], "category": ...}`` with user
and assistant turns; a trailing unanswered line is dropped. Scalars are read as strings (``Yes`` stays "Yes").
Each user turn and the answer to it also become one pair ``{"input": ..., "target": ..., "category": ...}``.
The package is located with importlib and never imported.

    python scripts/convert_chatterbot.py                 # (re)write examples/data/chatterbot_{english,pairs}.jsonl
    python scripts/convert_chatterbot.py --check         # exit 1 if a committed file differs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


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


def pairs(conversations: list[dict]) -> list[dict]:
    """Every user turn with the assistant turn that answers it."""
    out = []
    for record in conversations:
        turns = [m["content"] for m in record["messages"]]
        out += [{"input": question, "target": answer, "category": record["category"]}
                for question, answer in zip(turns[0::2], turns[1::2])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DATA, help="the folder to write the two files in")
    parser.add_argument("--check", action="store_true", help="compare with the existing files instead of writing")
    args = parser.parse_args()
    conversations = records(corpus_dir())
    files = {"chatterbot_english.jsonl": conversations, "chatterbot_pairs.jsonl": pairs(conversations)}
    stale = []
    for name, lines in files.items():
        path, text = args.output / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path} is {'up to date' if same else 'out of date: rerun without --check'}")
            stale += [] if same else [path]
            continue
        args.output.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {len(lines)} records to {path}")
    sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
