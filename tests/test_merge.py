"""Merged exports: a plain transformers directory that reproduces the adapted model, written at fit end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from conftest import batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import ConfigError, LoraConfig, MergeCallback, PeftCallback, export_merged
from lightning_peft.surgery import adapter_layers, attach


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_merge_callback_exports_a_plain_model(tmp_path):
    module = CausalLM()
    module.tokenizer = tiny_tokenizer()
    trainer(callbacks=[PeftCallback(LoraConfig(r=4, target_modules="all-linear")),
                       MergeCallback(tmp_path / "merged", dtype="float32")]).fit(module, loader(n=4))
    assert adapter_layers(module.model)  # the training model keeps its adapter
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n or "base_layer" in n for n in load_file(tmp_path / "merged/model.safetensors"))
    module.model.eval()
    torch.testing.assert_close(merged(**batch()).logits, module.model(**batch()).logits, rtol=0, atol=1e-5)
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "merged")("hello world")["input_ids"] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_in_bfloat16_records_the_dtype(tmp_path):
    model = make_model("gpt2")
    attach(model, LoraConfig(r=4, init_lora_weights=False))
    export_merged(model, tmp_path, dtype="bfloat16")
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert merged.dtype == torch.bfloat16
    reference = model(**batch()).logits
    torch.testing.assert_close(merged(**batch()).logits.float(), reference, rtol=0.05, atol=0.05)


def test_export_keeps_the_trained_classification_head(tmp_path):
    model = make_model("bert", "seq_cls")
    attach(model, LoraConfig(r=4, init_lora_weights=False))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    export_merged(model, tmp_path)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(merged(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


def test_bad_dtype_is_refused_before_training():
    with pytest.raises(ConfigError, match="float8"):
        MergeCallback("out", dtype="float8")
