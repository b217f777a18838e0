"""DataModules for the built-in tasks: chat/instruction tuning, input/target pairs for encoder-decoders, and
labelled-text classification.

Each takes the tokenizer of the module it feeds (``trainer.lightning_module.tokenizer``) in ``setup``, so the
tokenizer is loaded once and always matches the model. The validation split is held out by a hash of the
prompt (or input, or text): every copy of a question lands on the same side, so validation questions are never
trained on.

Chat records, one JSON object per line, in any of three shapes::

    {"instruction": "...", "input": "...", "output": "..."}                          # Alpaca
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}  # ShareGPT
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}  # chat

Training batches are padded to their longest example, optionally in length-grouped order (``group_by_length``), or
packed (``packing``): rows of several examples that each attend only to themselves, which transformers arranges from
``position_ids`` that restart per example. ``ChatDataModule.train_dataloader`` runs once the model is built, so
packing is checked against that model and refused where transformers would let packed examples see each other.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import heapq
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import DataCollatorForSeq2Seq, PreTrainedModel
from transformers.utils.generic import is_flash_attention_requested

from lightning_peft.errors import ConfigError
from lightning_peft.methods.prefix import PrefixEncoder
from lightning_peft.methods.prompt import PromptEncoder
from lightning_peft.resources import resolve_path

IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "model": "assistant", "system": "system"}


def open_text(path: str) -> io.TextIOBase:
    """Open a text file for reading, decompressing ``.bz2`` and ``.gz`` by suffix."""
    path = resolve_path(path)
    if not Path(path).is_file():
        raise ConfigError(f"data file {path} does not exist.")
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a malformed line is refused with its number."""
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number} is not valid JSON ({err}).") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
            yield number, record


def to_messages(record: dict, where: str = "record") -> list[dict[str, str]]:
    """Normalize an Alpaca, ShareGPT or chat record to ``[{"role", "content"}, ...]``."""
    if "messages" in record:
        turns = [(m.get("role"), m.get("content")) for m in record["messages"] if isinstance(m, dict)]
    elif "conversations" in record:
        turns = [(m.get("from"), m.get("value")) for m in record["conversations"] if isinstance(m, dict)]
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        turns = ([("system", record["system"])] if record.get("system") else []) + [
            ("user", prompt), ("assistant", record["output"])]
    else:
        raise ConfigError(
            f"{where}: expected 'messages' (role/content), 'conversations' (from/value) or "
            f"'instruction'/'output' (Alpaca); got keys {sorted(record)}."
        )
    messages = []
    for role, content in turns:
        if role not in _ROLES or not isinstance(content, str):
            raise ConfigError(f"{where}: a turn has role {role!r} and content {content!r}; roles are {sorted(_ROLES)}.")
        messages.append({"role": _ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn to learn from.")
    return messages


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans of the assistant turns (what the loss covers).

    With a chat template, each assistant span runs from the end of the prompt the template builds for it to the
    end of the turn, so it includes the template's end-of-turn marker: the model learns to stop. Without one, a
    plain ``User:``/``Assistant:`` layout is used, each answer ended by the EOS token.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (text.startswith(prompt) and text.startswith(turn)):
                raise ConfigError(
                    "The tokenizer's chat template renders earlier turns differently once later ones follow, so "
                    "response tokens cannot be located; set chat_template to a template without that behaviour."
                )
            spans.append((len(prompt), len(turn)))
        return text, spans
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for message in messages:
        if message["role"] == "assistant":
            text += "Assistant: "
            spans.append((len(text), len(text) + len(message["content"]) + len(eos)))
            text += message["content"] + eos + "\n"
        else:
            text += f"{message['role'].capitalize()}: {message['content']}\n"
    return text, spans


def prompt_text(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The text a model continues to answer ``messages`` (which end with a user turn)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels (``-100`` outside the assistant turns), truncated to ``max_length``."""
    text, spans = render_chat(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None),
                        return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [
        token if end > begin and any(first <= begin < last for first, last in spans) else IGNORE_INDEX
        for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return {"input_ids": list(encoded["input_ids"]), "labels": labels}


def held_out(key: str, fraction: float) -> bool:
    """Deterministic split by content: the same key always lands on the same side, on every machine."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return digest / 2**64 < fraction


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Put the examples into as few rows of at most ``max_length`` tokens as hold them, rows of even length, each
    example whole and kept apart.

    Even rows matter because a batch is padded to its longest row: packing consecutive examples until the next one
    does not fit leaves rows part-empty (measured on the default chat data, 8 examples a step: 24% of the computed
    positions were padding; with even rows, 4%). Examples go largest first to the shortest row (longest processing
    time first); should a row then exceed ``max_length``, one more row is taken. An example longer than
    ``max_length`` gets a row of its own.

    Each row carries ``position_ids`` that restart at 0 with every example. Given those and no ``attention_mask``,
    transformers' mask builders (``masking_utils.find_packed_sequence_indices``) make attention block-diagonal
    causal for sdpa, eager and flex attention, and flash attention runs varlen: an example attends only to itself, at
    the positions it has when alone, as at inference. The loss predicts ``labels[i + 1]`` from token ``i``, so each
    example's first label is ignored: it would be the target of the previous example's last token.
    """
    fitting = [e for e in examples if len(e["input_ids"]) <= max_length]
    groups = [[e] for e in examples if len(e["input_ids"]) > max_length]
    if fitting:
        groups += _even_rows(fitting, max_length)
    rows = []
    for group in groups:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for example in group:
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
            row["position_ids"] += range(len(example["input_ids"]))
        rows.append(row)
    return rows


def _even_rows(examples: list[dict[str, list[int]]], max_length: int) -> list[list[dict[str, list[int]]]]:
    """The fewest rows of even length that hold ``examples`` (each at most ``max_length`` long)."""
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    for count in range(max(math.ceil(sum(len(e["input_ids"]) for e in examples) / max_length), 1), len(examples)):
        lengths = [(0, row) for row in range(count)]  # a heap: the shortest row first
        rows: list[list[dict[str, list[int]]]] = [[] for _ in range(count)]
        for example in by_length:
            length, row = heapq.heappop(lengths)
            rows[row].append(example)
            heapq.heappush(lengths, (length + len(example["input_ids"]), row))
        if max(length for length, _ in lengths) <= max_length:
            return rows
    return [[e] for e in by_length]


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int,
              flatten: bool = False) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest example (or packed row) of the batch, on the right.

    Packed rows (they have ``position_ids``) get no ``attention_mask``: one would turn transformers' packed-sequence
    masks off. Their padding is one more sequence (positions from 0, labels ignored) that no example attends to.
    ``flatten`` puts packed rows end to end in a single row instead, unpadded: flash attention finds packed
    sequences from ``position_ids`` only in a batch of one row.
    """
    packed = "position_ids" in examples[0]
    if packed and flatten:
        return {key: torch.tensor([[v for e in examples for v in e[key]]])
                for key in ("input_ids", "labels", "position_ids")}
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
             "position_ids" if packed else "attention_mask": torch.zeros((len(examples), length), dtype=torch.long)}
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(example["input_ids"])
        batch["labels"][row, :n] = torch.tensor(example["labels"])
        if packed:
            batch["position_ids"][row] = torch.tensor(example["position_ids"] + list(range(length - n)))
        else:
            batch["attention_mask"][row, :n] = 1
    return batch


# Model families whose transformers code builds its attention masks from packed position_ids (tested for each in
# tests/test_packing.py). Others, e.g. OPT, Falcon or BLOOM, leave position_ids out of their masks and would let
# packed examples see each other.
PACKING_FAMILIES = ("gemma", "gemma3_text", "gpt2", "llama", "mistral", "phi3", "qwen2", "qwen3", "smollm3")


def check_packing(model: Any) -> None:
    """Refuse packing where transformers would not keep packed examples apart in ``model``: a family whose masks
    ignore ``position_ids``, an attention implementation without packed-sequence support, or prompt or prefix tuning
    (the first drops ``position_ids``, the second adds a cache, and either turns the packed masks off)."""
    fix = "Set packing: false (group_by_length: true also cuts padding)."
    family = model.config.model_type
    if family not in PACKING_FAMILIES:
        raise ConfigError(f"Packing keeps examples apart only in model families whose transformers code builds "
                          f"per-example masks from position_ids ({', '.join(PACKING_FAMILIES)}), not {family!r}. {fix}")
    attention = model.config._attn_implementation
    if attention not in ("sdpa", "eager", "flex_attention") and not is_flash_attention_requested(model.config):
        raise ConfigError(f"Packing needs sdpa, eager, flex or flash attention to keep examples apart, not "
                          f"{attention!r}. Load the model with one of those, or: {fix}")
    tuned = next((type(m).__name__ for m in model.modules() if isinstance(m, (PromptEncoder, PrefixEncoder))), None)
    if tuned is not None:
        raise ConfigError(f"Packing cannot keep examples apart with a {tuned} (prompt or prefix tuning): it changes "
                          f"the positions or adds a cache, and transformers then masks packed rows as one sequence. "
                          f"{fix}")


class LengthGroupedSampler(DistributedSampler):
    """A training order whose batches hold examples of similar length, so padding each to its longest costs little.

    Every epoch, from ``seed + epoch`` (the same on every rank): shuffle, sort each mega-batch of ``mega_batches``
    batches by length, cut it into groups of one batch per rank, and shuffle the order of the groups. Rank ``r``
    takes every ``num_replicas``-th example of a group, so each rank's batches are length-grouped too. Being a
    ``DistributedSampler``, it is used by Lightning as it is (not wrapped), and Lightning calls its ``set_epoch``.
    (transformers' ``LengthGroupedSampler`` would be wrapped under DDP, which interleaves its batches and never
    advances its epoch, and it keeps the batches of a mega-batch in length order.)
    """

    def __init__(self, lengths: list[int], batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 mega_batches: int = 50) -> None:
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.mega_batches = lengths, batch_size, mega_batches

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # as many on every rank
        group = self.batch_size * self.num_replicas
        span = group * self.mega_batches
        groups = []
        for start in range(0, len(order), span):
            mega = sorted(order[start:start + span], key=lambda i: self.lengths[i], reverse=True)
            groups += [mega[i:i + group] for i in range(0, len(mega), group)]
        last = [groups.pop()] if len(groups[-1]) < group else []  # stays last, so later batches stay aligned
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()] + last
        return iter([i for g in groups for i in g[self.rank::self.num_replicas]])


class _TokenizerDataModule(L.LightningDataModule):
    """Takes its tokenizer from the module it feeds, unless one was assigned to ``self.tokenizer``; holds what
    every data module is configured with (its files, the validation split, batching)."""

    def __init__(self, train_file: str, val_file: str | None, val_fraction: float, batch_size: int,
                 max_train_examples: int | None, max_val_examples: int | None, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.tokenizer: Any = None
        self.train: list[dict] = []
        self.val: list[dict] = []

    def _held_out(self, rows: list, key: Callable[[Any], str]) -> tuple[list, list]:
        """(train, validation) of ``rows``: ``val_fraction`` of them held out by a hash of ``key(row)``."""
        held = [held_out(key(row), self.val_fraction) for row in rows]
        return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise ConfigError(f"{type(self).__name__} needs a tokenizer: use it with a module that has a "
                              f"`tokenizer` attribute, or assign datamodule.tokenizer before fitting.")
        return self.tokenizer

    def _loader(self, dataset: list, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        """Batches padded by the subclass's ``collate``."""
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self.collate)

    def test_examples(self) -> list:
        """What ``test`` and ``predict`` run on: the validation split, unless the data module has a test split."""
        return self.val

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_examples(), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_examples(), shuffle=False)


class ChatDataModule(_TokenizerDataModule):
    """Instruction or chat data from JSONL (Alpaca, ShareGPT or messages records), loss on responses only.

    Args:
        train_file: JSONL file (``.gz``/``.bz2`` accepted, ``package:NAME/path`` for a file inside a package).
        val_file: held-out JSONL; when absent, ``val_fraction`` of ``train_file`` is held out by prompt.
        val_fraction: share of distinct prompts held out for validation when there is no ``val_file``.
        max_length: examples are truncated to this many tokens.
        packing: concatenate short training examples into rows of up to ``max_length`` tokens. Each example keeps
            its positions (from 0) and attends only to itself, as at inference. For the gemma, gemma3_text, gpt2,
            llama, mistral, phi3, qwen2, qwen3 and smollm3 families with sdpa, eager, flex or flash attention;
            refused for others and with prompt or prefix tuning.
        group_by_length: batch training examples of similar length together (mega-batches of 50 batches sorted
            by length, batch order shuffled every epoch from the run's seed), so padding each batch to its longest
            costs little. Works under DDP and FSDP.
        max_train_examples, max_val_examples: keep only the first N (quick runs).

    Unpacked batches are padded, on the right, to their longest example. Validation batches are never packed.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 512,
        batch_size: int = 8,
        packing: bool = False,
        group_by_length: bool = False,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(train_file, val_file, val_fraction, batch_size, max_train_examples, max_val_examples,
                         num_workers)
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {max_length}.")
        self.max_length, self.packing, self.group_by_length = max_length, packing, group_by_length
        self.flatten_packed = False  # set from the model when the training loader is built
        self.val_prompts: list[list[dict[str, str]]] = []

    def conversations(self) -> tuple[list[list[dict]], list[list[dict]]]:
        """(train, validation) conversations, before tokenization."""
        rows = [to_messages(r, f"{self.train_file}:{n}") for n, r in read_jsonl(self.train_file)]
        if self.val_file is None:
            train, val = self._held_out(rows, lambda m: next((t["content"] for t in m if t["role"] == "user"), ""))
        else:
            train, val = rows, [to_messages(r, f"{self.val_file}:{n}") for n, r in read_jsonl(self.val_file)]
        return train[: self.max_train_examples], val[: self.max_val_examples]

    def setup(self, stage: str) -> None:
        if self.train or self.val:
            return
        tokenizer = self._tokenizer()
        train, val = self.conversations()
        if not train:
            raise ConfigError(f"{self.train_file} holds no training examples after the validation split.")
        self.train = self.tokenize(train, tokenizer)
        self.val = self.tokenize(val, tokenizer)
        self.val_prompts = [m[: max(i for i, t in enumerate(m) if t["role"] == "assistant")] for m in val]
        if self.packing:
            self.train = pack(self.train, self.max_length)
        rank_zero_info(f"{type(self).__name__}: {len(self.train)} training rows, {len(self.val)} validation examples.")

    def tokenize(self, conversations: list[list[dict]], tokenizer: Any) -> list[dict[str, list[int]]]:
        """The examples ``setup`` trains and validates on (before packing): each conversation through the chat
        template, truncated to ``max_length``, labelled on the answers; those with no answer left are dropped."""
        examples = [tokenize_chat(m, tokenizer, self.max_length) for m in conversations]
        kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
        if len(kept) < len(examples):
            rank_zero_info(f"Dropped {len(examples) - len(kept)} examples whose response starts after "
                           f"max_length={self.max_length} tokens.")
        return kept

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        tokenizer = self._tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return pad_batch(examples, pad, flatten=self.flatten_packed)

    def train_dataloader(self) -> DataLoader:
        """Called once the model is built and adapted, so packing is checked against the model it feeds."""
        trainer = self.trainer
        if self.packing:
            model = getattr(trainer.lightning_module, "model", None) if trainer is not None else None
            if isinstance(model, PreTrainedModel):
                check_packing(model)
                self.flatten_packed = is_flash_attention_requested(model.config)
            else:
                rank_zero_warn("ChatDataModule(packing=True) finds no transformers model at `lightning_module.model` "
                               "to check: packed rows keep examples apart only if the module passes their "
                               "position_ids, no attention_mask and use_cache=False to a model that supports it.")
        if not self.group_by_length:
            return self._loader(self.train, shuffle=True)
        ranks = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = LengthGroupedSampler([len(e["input_ids"]) for e in self.train], self.batch_size,
                                       seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), **ranks)
        return self._loader(self.train, shuffle=False, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        """The held-out prompts (their answers removed), for ``predict`` to answer."""
        return DataLoader(self.val_prompts, batch_size=self.batch_size, collate_fn=list)


class Seq2SeqDataModule(_TokenizerDataModule):
    """Input/target text pairs from JSONL (``.gz``/``.bz2`` accepted), for encoder-decoders (``Seq2SeqLMModule``).

    One JSON object a line, e.g. ``{"input": "translate English to German: Thank you", "target": "Danke"}``. Inputs
    are tokenized with the tokenizer's special tokens and targets as its ``text_target`` (T5 and BART end both with
    ``</s>``, so the model learns where to stop), each truncated. Batches are padded to their longest input and
    their longest target: inputs with the pad token (``attention_mask`` 0), labels with -100, so the loss skips the
    padding; the model builds its decoder inputs from the labels.

    Args:
        train_file: JSONL file (``package:NAME/path`` for a file inside a package).
        input_field, target_field: the keys of the input and target texts in each record.
        val_file: held-out JSONL; when absent, ``val_fraction`` of ``train_file`` is held out by input.
        val_fraction: share of distinct inputs held out for validation when there is no ``val_file``.
        max_length: inputs are truncated to this many tokens.
        max_target_length: targets are truncated to this many tokens.
        max_train_examples, max_val_examples: keep only the first N (quick runs).

    ``test`` and ``predict`` use the validation pairs (``predict`` generates from their inputs).
    """

    def __init__(
        self,
        train_file: str,
        input_field: str = "input",
        target_field: str = "target",
        val_file: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 512,
        max_target_length: int = 128,
        batch_size: int = 8,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(train_file, val_file, val_fraction, batch_size, max_train_examples, max_val_examples,
                         num_workers)
        if max_length < 1 or max_target_length < 1:
            raise ConfigError(f"max_length and max_target_length must be at least 1, got {max_length} and "
                              f"{max_target_length}.")
        self.input_field, self.target_field = input_field, target_field
        self.max_length, self.max_target_length = max_length, max_target_length

    def read(self, path: str) -> list[tuple[str, str]]:
        """(input, target) pairs of ``path``; a record without both texts is refused with its line."""
        pairs = []
        for number, record in read_jsonl(path):
            source, target = record.get(self.input_field), record.get(self.target_field)
            if not isinstance(source, str) or not isinstance(target, str):
                raise ConfigError(f"{path}:{number}: expected text under '{self.input_field}' and "
                                  f"'{self.target_field}'; the record has keys {sorted(record)}. Set input_field and "
                                  f"target_field to the keys of your data.")
            pairs.append((source, target))
        return pairs

    def pairs(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(train, validation) pairs, before tokenization."""
        rows = self.read(self.train_file)
        if self.val_file is None:
            train, val = self._held_out(rows, lambda r: r[0])
        else:
            train, val = rows, self.read(self.val_file)
        return train[: self.max_train_examples], val[: self.max_val_examples]

    def setup(self, stage: str) -> None:
        if self.train or self.val:
            return
        tokenizer = self._tokenizer()
        train, val = self.pairs()
        if not train:
            raise ConfigError(f"{self.train_file} holds no training pairs after the validation split.")
        self.train, self.val = self.tokenize(train, tokenizer), self.tokenize(val, tokenizer)
        rank_zero_info(f"{type(self).__name__}: {len(self.train)} training, {len(self.val)} validation pairs.")

    def tokenize(self, pairs: list[tuple[str, str]], tokenizer: Any) -> list[dict[str, list[int]]]:
        """The examples ``setup`` trains and validates on: inputs and targets, each truncated to its length."""
        if not pairs:
            return []
        sources, targets = zip(*pairs)
        inputs = tokenizer(list(sources), truncation=True, max_length=self.max_length)
        labels = tokenizer(text_target=list(targets), truncation=True, max_length=self.max_target_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": target}
                for ids, mask, target in zip(inputs["input_ids"], inputs["attention_mask"], labels["input_ids"])]

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        collator = DataCollatorForSeq2Seq(self._tokenizer(), label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
        return dict(collator(examples))


class TextClassificationDataModule(_TokenizerDataModule):
    """Labelled text from CSV or JSONL (``.gz``/``.bz2`` accepted).

    Args:
        train_file: the data; ``package:NAME/path`` names a file inside an installed package.
        labels: label values in class-index order; rows with any other label are skipped. ``None``: the sorted
            distinct values found.
        text_field, label_field: column (CSV) or key (JSONL) names.
        val_file, val_fraction: held-out data, or the share of distinct texts held out.
        test_file: data for ``test``; the validation split when absent.
    """

    def __init__(
        self,
        train_file: str,
        labels: list[str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
        val_file: str | None = None,
        val_fraction: float = 0.1,
        test_file: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(train_file, val_file, val_fraction, batch_size, max_train_examples, max_val_examples,
                         num_workers)
        self.test_file, self.labels, self.text_field, self.label_field = test_file, labels, text_field, label_field
        self.max_length = max_length
        self.test: list[dict] = []

    def read(self, path: str) -> list[tuple[str, str]]:
        """(text, label) rows of ``path``, labels as strings."""
        if ".jsonl" in Path(path).name or ".json" in Path(path).name:
            records = [r for _, r in read_jsonl(path)]
        else:
            with open_text(path) as f:
                records = list(csv.DictReader(f))
        rows = []
        for number, record in enumerate(records, 1):
            if self.text_field not in record or self.label_field not in record:
                raise ConfigError(f"{path}: row {number} lacks '{self.text_field}' or '{self.label_field}'; it has "
                                  f"{sorted(record)}. Set text_field and label_field.")
            rows.append((str(record[self.text_field]).strip(), str(record[self.label_field])))
        return rows

    def setup(self, stage: str) -> None:
        if self.train or self.val:
            return
        tokenizer = self._tokenizer()
        rows = self.read(self.train_file)
        if self.labels is None:
            self.labels = sorted({label for _, label in rows})
        index = {label: i for i, label in enumerate(self.labels)}
        kept = [(text, index[label]) for text, label in rows if label in index and text]
        if not kept:
            raise ConfigError(f"{self.train_file}: no row has a label in {self.labels}.")
        if self.val_file is None:
            train, val = self._held_out(kept, lambda r: r[0])
        else:
            train, val = kept, [(t, index[lab]) for t, lab in self.read(self.val_file) if lab in index]
        test = val if self.test_file is None else [(t, index[lab]) for t, lab in self.read(self.test_file)
                                                   if lab in index]
        self.train = self._encode(train[: self.max_train_examples], tokenizer)
        self.val = self._encode(val[: self.max_val_examples], tokenizer)
        self.test = self._encode(test[: self.max_val_examples], tokenizer)
        rank_zero_info(f"{type(self).__name__}: labels {self.labels}; {len(self.train)} training, "
                       f"{len(self.val)} validation examples ({len(rows) - len(kept)} rows skipped).")

    def _encode(self, rows: list[tuple[str, int]], tokenizer: Any) -> list[dict]:
        return [{**tokenizer(text, truncation=True, max_length=self.max_length), "labels": label}
                for text, label in rows]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self._tokenizer().pad(examples, return_tensors="pt"))

    def test_examples(self) -> list:
        return self.test
