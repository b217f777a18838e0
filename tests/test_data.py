"""The DataModules: record formats, response-only labels, held-out split by prompt, packing, padding, CSV/JSONL."""

from __future__ import annotations

import bz2
import json

import pytest
import torch

from lightning_peft import ChatDataModule, ConfigError, TextClassificationDataModule
from lightning_peft.data import IGNORE_INDEX, held_out, pack, pad_batch, to_messages, tokenize_chat
from tiny_assets import tiny_tokenizer

CHAT = [{"role": "user", "content": "What is AI ?"}, {"role": "assistant", "content": "AI is the study ."}]


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


@pytest.mark.parametrize("record", [
    {"messages": CHAT},
    {"conversations": [{"from": "human", "value": "What is AI ?"}, {"from": "gpt", "value": "AI is the study ."}]},
    {"instruction": "What is AI", "input": "?", "output": "AI is the study ."},
])
def test_three_record_formats_normalize_to_messages(record):
    messages = to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "AI is the study ."
    assert messages[0]["content"].startswith("What is AI")


@pytest.mark.parametrize("record, words", [
    ({"prompt": "x"}, "'messages'"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "narrator"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
])
def test_bad_records_are_refused_by_name(record, words):
    with pytest.raises(ConfigError, match=words):
        to_messages(record, "f.jsonl:3")


def test_loss_covers_only_the_responses_with_a_chat_template():
    tokenizer = tiny_tokenizer()
    two_turns = CHAT + [{"role": "user", "content": "Do you like movies ?"},
                        {"role": "assistant", "content": "Yes , I like good movies ."}]
    example = tokenize_chat(two_turns, tokenizer, max_length=200)
    assert len(example["labels"]) == len(example["input_ids"])
    assert labelled_text(tokenizer, example) == "AI is the study . <|im_end|> Yes , I like good movies . <|im_end|>"
    labelled = [i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX]
    assert all(example["input_ids"][i] == example["labels"][i] for i in labelled)


def test_loss_covers_only_the_response_without_a_chat_template():
    tokenizer = tiny_tokenizer(chat_template=None)
    example = tokenize_chat(CHAT, tokenizer, max_length=200)
    assert labelled_text(tokenizer, example) == "AI is the study . <|im_end|>"
    assert "What" in tokenizer.decode(example["input_ids"])


def test_truncation_keeps_max_length():
    example = tokenize_chat(CHAT, tiny_tokenizer(), max_length=5)
    assert len(example["input_ids"]) == 5 and all(t == IGNORE_INDEX for t in example["labels"])


def test_held_out_is_deterministic_and_close_to_the_fraction():
    keys = [f"question {i}" for i in range(2000)]
    picked = [held_out(k, 0.1) for k in keys]
    assert picked == [held_out(k, 0.1) for k in keys]
    assert 150 < sum(picked) < 250


def test_packing_fills_few_even_rows_without_splitting_examples():
    examples = [{"input_ids": [i] * n, "labels": [IGNORE_INDEX] * (n - 1) + [i]} for i, n in enumerate([3, 4, 5, 2, 6], 1)]
    rows = pack(examples, max_length=8)
    assert sorted(len(r["input_ids"]) for r in rows) == [6, 7, 7]  # consecutive filling gives 7, 7, 6 padded to 8
    assert sorted(r["input_ids"] for r in rows) == [[2] * 4 + [1] * 3, [3] * 5 + [4] * 2, [5] * 6]
    by_first = {r["input_ids"][0]: r for r in rows}
    assert by_first[2]["labels"] == [IGNORE_INDEX] * 3 + [2] + [IGNORE_INDEX] * 2 + [1]  # each example's last label
    assert len(pack(examples, max_length=20)) == 1 and len(pack(examples, max_length=6)) == 4
    assert [r["input_ids"] for r in pack([{"input_ids": [], "labels": []}] * 2, max_length=8)] == [[]]


def test_packing_evens_rows_out_where_filling_in_order_would_leave_one_short():
    lengths = [136, 129, 58, 50, 48, 47, 47, 47]  # 8 chat examples of a step: in order, rows of 244, 224 and 94
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    rows = pack(examples, max_length=256)
    assert sorted(len(r["input_ids"]) for r in rows) == [176, 183, 203]
    assert sorted(len(r["input_ids"]) for r in pack([*examples, {"input_ids": [2] * 300, "labels": [2] * 300}],
                                                      max_length=256)) == [176, 183, 203, 300]  # too long: alone


def test_dynamic_padding_pads_to_the_longest_in_the_batch():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                      pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chat_records(n=60):
    return [{"messages": [{"role": "user", "content": f"question {i // 3}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]


def test_chat_datamodule_holds_out_whole_prompts(tmp_path):
    dm = ChatDataModule(write_jsonl(tmp_path / "chat.jsonl", chat_records()), val_fraction=0.3, batch_size=4)
    dm.tokenizer = tiny_tokenizer(extra=[f"question {i} answer {i}" for i in range(60)])
    train, val = dm.conversations()
    train_prompts = {m[0]["content"] for m in train}
    val_prompts = {m[0]["content"] for m in val}
    assert val_prompts and train_prompts and not train_prompts & val_prompts
    assert len(train) + len(val) == 60
    dm.setup("fit")
    assert dm.val_prompts == [m[:1] for m in val]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_chat_datamodule_packing_reduces_rows(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    plain, packed = ChatDataModule(path, val_fraction=0.0), ChatDataModule(path, val_fraction=0.0, packing=True,
                                                                            max_length=64)
    for dm in (plain, packed):
        dm.tokenizer = tiny_tokenizer()
        dm.setup("fit")
    assert len(packed.train) < len(plain.train) // 2
    assert all(len(r["input_ids"]) <= 64 for r in packed.train)
    labelled = lambda rows: sum(t != IGNORE_INDEX for r in rows for t in r["labels"])  # noqa: E731
    assert labelled(packed.train) == labelled(plain.train)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat_records(1)[0]) + "\n{not json\n")
    dm = ChatDataModule(str(path))
    dm.tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"chat.jsonl:2"):
        dm.setup("fit")


def test_datamodule_without_tokenizer_says_how_to_give_one(tmp_path):
    dm = ChatDataModule(write_jsonl(tmp_path / "chat.jsonl", chat_records()))
    with pytest.raises(ConfigError, match="tokenizer"):
        dm.setup("fit")


def test_classification_from_compressed_csv_skips_other_labels(tmp_path):
    path = tmp_path / "reviews.csv.bz2"
    rows = [("fresh", "the film is fresh"), ("rotten", "a dull movie"), ("plot", "a plot summary")] * 20
    with bz2.open(path, "wt") as f:
        f.write("category,text\n" + "".join(f"{label},{text} {i}\n" for i, (label, text) in enumerate(rows)))
    dm = TextClassificationDataModule(str(path), labels=["rotten", "fresh"], label_field="category", batch_size=8)
    dm.tokenizer = tiny_tokenizer(chat_template=None)
    dm.setup("fit")
    assert len(dm.train) + len(dm.val) == 40
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}


def test_classification_from_jsonl_with_inferred_labels_and_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"movie {i}", "label": i % 3} for i in range(30)])
    dm = TextClassificationDataModule(path)
    dm.tokenizer = tiny_tokenizer(chat_template=None)
    dm.setup("fit")
    assert dm.labels == ["0", "1", "2"]
    bad = TextClassificationDataModule(path, text_field="sentence")
    bad.tokenizer = dm.tokenizer
    with pytest.raises(ConfigError, match="'sentence'"):
        bad.setup("fit")
