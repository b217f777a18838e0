"""Packing keeps examples apart (a packed row's loss is its examples' loss run one at a time, for every family that
packing allows, under sdpa and eager attention) or is refused; length-grouped batches."""

from __future__ import annotations

import json

import pytest
import transformers
import torch

from conftest import FAMILIES, METHODS, VOCAB, make_model
from lightning_helpers import trainer
from lightning_peft import CausalLMModule, ChatDataModule, ConfigError, LoraConfig, PeftCallback, PromptTuningConfig
from lightning_peft.data import IGNORE_INDEX, PACKING_FAMILIES, LengthGroupedSampler, check_packing, pack, pad_batch
from lightning_peft.surgery import attach
from tiny_assets import save_tiny_causal_lm, tiny_tokenizer


def examples(lengths=(5, 9, 3, 7, 6), seed=0) -> list[dict[str, list[int]]]:
    """Random examples, each a prompt (labels ignored) then a response; the first has its first token labelled, so
    packing must mask the boundary itself."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = 0 if i == 0 else n // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def one_at_a_time(model, examples) -> torch.Tensor:
    """The token-weighted mean of each example's loss run alone (what one batch of all of them should give)."""
    total, count = torch.zeros(()), 0
    for e in examples:
        labels = torch.tensor([e["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the loss predicts token i + 1 from token i
        total = total + model(input_ids=torch.tensor([e["input_ids"]]), labels=labels).loss * n
        count += n
    return total / count


def tiny_causal_lm(family: str, attention: str):
    """A tiny random model of ``family`` (conftest's sizes where it has them), with weights large enough for
    attention to matter."""
    if family in FAMILIES:
        return make_model(family, attn_implementation=attention, initializer_range=0.3)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, pad_token_id=0, initializer_range=0.3,
                                               attn_implementation=attention)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_a_packed_batch_loses_what_its_examples_lose_one_at_a_time(family, attention):
    model = tiny_causal_lm(family, attention)
    check_packing(model)
    data = examples()
    rows = pack(data, max_length=24)
    assert sorted(len(r["input_ids"]) for r in rows) == [14, 16]  # two even rows, the shorter padded
    batch = pad_batch(rows, pad_token_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch, use_cache=False).loss  # as CausalLMModule.forward calls it
        expected = one_at_a_time(model, data)
        torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
        flat = model(**pad_batch(rows, pad_token_id=0, flatten=True), use_cache=False).loss  # flash attention's layout
        torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)
        # The same rows attending across examples lose something else: the comparison above can fail.
        leaking = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).loss
        assert (leaking - expected).abs() > 1e-4  # ten times the tolerance of the equality above


def test_module_forward_keeps_packed_examples_apart(tmp_path):
    """The whole path: ChatDataModule packs and collates, CausalLMModule.forward passes what it needs."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in [("What is AI ?", "AI is the study ."), ("Hello", "I am fine , thank you ."),
                                                ("Do you like movies ?", "Yes , I like good movies a lot .")]))
    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "llama")))
    module.configure_model()
    module.model.eval()
    plain = ChatDataModule(str(path), val_fraction=0.0)
    packed = ChatDataModule(str(path), val_fraction=0.0, packing=True, max_length=128, batch_size=1)
    for dm in (plain, packed):
        dm.tokenizer = module.tokenizer
        dm.setup("fit")
    batch = packed.collate(packed.train)
    assert batch["input_ids"].shape[0] == 1 and set(batch) == {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        torch.testing.assert_close(module(batch).loss, one_at_a_time(module.model, plain.train), rtol=1e-5, atol=1e-5)


def test_packing_restarts_positions_and_masks_each_boundary():
    rows = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
                 {"input_ids": [6, 7, 8], "labels": [IGNORE_INDEX, 7, 8]}], max_length=5)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2]]
    assert rows[0]["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    batch = pad_batch(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # padding: a sequence of its own
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    flat = pad_batch(rows, pad_token_id=0, flatten=True)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_packing_is_refused_where_examples_would_see_each_other():
    opt = make_opt()
    with pytest.raises(ConfigError, match="'opt'.*packing: false"):
        check_packing(opt)
    llama = make_model("llama")
    llama.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ConfigError, match="'paged\\|sdpa'"):
        check_packing(llama)
    for method in ("prompt", "prefix"):
        model = make_model("llama")
        attach(model, METHODS[method]["make"]("llama"))
        with pytest.raises(ConfigError, match="prompt or prefix tuning"):
            check_packing(model)


def make_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                    init_std=0.3)
    return transformers.OPTForCausalLM(config).eval()


def test_opt_would_leak_packed_examples():
    """Why OPT is refused: given the same packed rows, it attends across examples."""
    model = make_opt()
    data = examples()
    with torch.no_grad():
        packed = model(**pad_batch(pack(data, 24), pad_token_id=0), use_cache=False).loss
        assert (packed - one_at_a_time(model, data)).abs() > 1e-2


def padded_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    real = sum(lengths[i] for i in order)
    return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_order_covers_every_example_and_cuts_padding():
    lengths = torch.randint(2, 300, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and len(sampler) == 1000
    assert first == list(LengthGroupedSampler(lengths, batch_size=8, seed=3))  # deterministic from the seed
    assert first != list(LengthGroupedSampler(lengths, batch_size=8, seed=4))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert padded_share(lengths, first, 8) < 0.05 < 0.3 < padded_share(lengths, list(range(1000)), 8)
    # Batches in shuffled order, not longest first: the first batch is not the longest.
    assert max(lengths[i] for i in first[:8]) < max(lengths)


def test_length_grouped_order_splits_across_ranks_with_grouped_batches():
    lengths = torch.randint(2, 300, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    ranks = [list(LengthGroupedSampler(lengths, batch_size=4, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 102
    assert set(ranks[0]) | set(ranks[1]) == set(range(203))
    for order in ranks:
        assert padded_share(lengths, order, 4) < 0.05
    for b in range(0, 100, 4):  # a step's batches on the two ranks come from the same length group
        assert abs(lengths[ranks[0][b]] - lengths[ranks[1][b]]) <= max(lengths[i] for i in ranks[0][b:b + 4]) * 0.5


def test_chat_datamodule_groups_training_batches_by_length(tmp_path):
    path = tmp_path / "chat.jsonl"
    words = ["a", "lot", "good", "movies"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Hello"},
                                                     {"role": "assistant", "content": " ".join(words * (i % 13))}]})
                            + "\n" for i in range(200)))
    shares = {}
    for group in (False, True):
        dm = ChatDataModule(str(path), val_fraction=0.0, batch_size=8, group_by_length=group)
        dm.tokenizer = tiny_tokenizer()
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, LengthGroupedSampler) == group
        batches = list(loader)
        assert sum(len(b["input_ids"]) for b in batches) == 200
        shares[group] = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel()
                                                                                       for b in batches)
    assert shares[True] < 0.05 < 0.2 < shares[False]


def chat_file(tmp_path, n=24):
    path = tmp_path / "chat.jsonl"
    words = ["a", "lot", "good", "movies"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Hello"},
                                                     {"role": "assistant", "content": " ".join(words * (1 + i % 5))}]})
                            + "\n" for i in range(n)))
    return str(path)


def test_packing_with_prompt_tuning_is_refused_before_training(tmp_path):
    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "llama")))
    fit = trainer(callbacks=[PeftCallback(PromptTuningConfig(num_virtual_tokens=3))], max_steps=1, limit_val_batches=0)
    with pytest.raises(ConfigError, match="prompt or prefix tuning"):
        fit.fit(module, ChatDataModule(chat_file(tmp_path), val_fraction=0.0, packing=True, batch_size=2))
    assert fit.global_step == 0


def test_lightning_keeps_the_length_grouped_sampler_under_ddp(tmp_path):
    """Being a DistributedSampler, it is not wrapped: ranks, seed and epochs stay its own."""
    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "llama")))
    data = ChatDataModule(chat_file(tmp_path), val_fraction=0.0, group_by_length=True, batch_size=2)
    fit = trainer(callbacks=[PeftCallback(LoraConfig(r=2, target_modules=["q_proj"]))], strategy="ddp", max_steps=1,
                  limit_val_batches=0)
    try:
        fit.fit(module, data)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sampler = fit.train_dataloader.sampler
    assert type(sampler) is LengthGroupedSampler and sampler.num_replicas == 1 and fit.global_step == 1


def test_the_data_module_names_the_families_packing_supports():
    assert all(family in ChatDataModule.__doc__ for family in PACKING_FAMILIES)


def test_a_training_step_on_packed_rows_loses_what_the_examples_lose_one_at_a_time(tmp_path):
    """Through Trainer.fit: whatever the training step hands the model must keep packed examples apart."""
    model_dir, path = save_tiny_causal_lm(tmp_path / "llama"), chat_file(tmp_path)
    module = CausalLMModule(str(model_dir))
    packed = ChatDataModule(path, val_fraction=0.0, packing=True, max_length=128, batch_size=8)
    fit = trainer(callbacks=[PeftCallback(LoraConfig(r=2, target_modules=["q_proj"]))], max_steps=1,
                  limit_val_batches=0)
    fit.fit(module, packed)
    assert 1 < len(packed.train) <= 8  # several rows, all in the one batch trained on
    plain = ChatDataModule(path, val_fraction=0.0)
    plain.tokenizer = module.tokenizer
    plain.setup("fit")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # LoRA starts as the identity (B = 0)
    with torch.no_grad():
        expected = one_at_a_time(base, plain.train)
    torch.testing.assert_close(fit.callback_metrics["train_loss"], expected, rtol=1e-5, atol=1e-5)
