"""Merged exports: a plain transformers directory that reproduces the adapted model, written at fit end."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from conftest import QUANTIZABLE, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import (
    ConfigError,
    LoraConfig,
    MergeCallback,
    PeftCallback,
    PeftStrategy,
    QuantizationConfig,
    SaveAdapterCallback,
    export_merged,
)
from lightning_peft.shards import DEFAULT_SHARD_SIZE, write_sharded
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


def test_sharded_export_loads_like_one_file(tmp_path):
    model = make_model("llama")
    attach(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    export_merged(model, tmp_path / "one")
    export_merged(model, tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    whole = load_file(tmp_path / "one" / "model.safetensors")
    assert index["weight_map"].keys() == whole.keys() and set(index["weight_map"].values()) == set(files)
    parts = {k: v for f in files for k, v in load_file(tmp_path / "sharded" / f).items()}
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    model.eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)


def test_merge_runs_before_teardown_and_says_where_it_wrote(tmp_path, caplog):
    module = CausalLM()
    seen = {}

    class AtTeardown(Callback):  # the strategy's teardown has run when on_fit_end comes
        def on_fit_end(self, trainer, pl_module):
            seen["files"] = sorted(p.name for p in (tmp_path / "merged").iterdir())

    trainer(callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj"])), AtTeardown(),
                       MergeCallback(tmp_path / "merged")], max_steps=1).fit(module, loader(n=4))
    assert "model.safetensors" in seen["files"]
    assert f"Merged model written to {tmp_path / 'merged'}" in caplog.text


@pytest.mark.parametrize("callback", [SaveAdapterCallback, MergeCallback])
def test_outputs_go_to_the_run_log_directory_and_are_never_replaced_by_accident(tmp_path, callback):
    def fit(**kwargs):
        module = CausalLM()
        logger = CSVLogger(tmp_path, name="run", version="v")
        trainer(logger=logger, callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj"])),
                                          callback(**kwargs)], max_steps=1).fit(module, loader(n=4))
        return module

    name = "adapter" if callback is SaveAdapterCallback else "merged"
    fit()
    written = tmp_path / "run" / "v" / name
    first = sorted(p.name for p in written.iterdir())
    assert first
    with pytest.raises(ConfigError, match="overwrite=True") as error:
        fit()
    assert str(written) in str(error.value)
    fit(overwrite=True)
    assert sorted(p.name for p in written.iterdir()) == first
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]


def test_a_taken_directory_is_refused_before_training(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    module = CausalLM()
    with pytest.raises(ConfigError, match="already holds files"):
        trainer(callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj"])),
                           MergeCallback(tmp_path / "merged")], max_steps=1).fit(module, loader(n=4))
    assert module.losses == []  # refused at setup: not one step was spent
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_merges_on_the_gpu_before_teardown(tmp_path, bits):
    module = CausalLM(sizes=QUANTIZABLE, optimizer=None)
    quantization = (QuantizationConfig(load_in_8bit=True) if bits == 8 else
                    QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"))

    class Expected(Callback):  # runs just before MergeCallback, on the same weights, on the GPU
        def on_train_end(self, trainer, pl_module):
            layer = pl_module.model.model.layers[0].self_attn.q_proj
            self.device = layer.lora_A.device
            self.weight = layer.merged_state_dict()["weight"].float().cpu()

    expected = Expected()
    trainer(accelerator="cuda", strategy=PeftStrategy(quantization=quantization), max_steps=2,
            callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), expected,
                       MergeCallback(tmp_path / "merged", dtype="float32")]).fit(module, loader(n=4))
    assert expected.device.type == "cuda"
    exported = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], expected.weight)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.isfinite(merged(**batch()).logits).all()


def test_shard_writer_refuses_a_tensor_the_header_did_not_plan(tmp_path):
    plan = [("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))]
    tensors = [("a", torch.ones(2, 3)), ("b", torch.ones(4, dtype=torch.float32))]  # b: not the planned dtype
    with pytest.raises(RuntimeError, match="does not match the planned"):
        write_sharded(tmp_path, plan, tensors, DEFAULT_SHARD_SIZE)
    write_sharded(tmp_path, plan, [tensors[0], ("b", torch.arange(4).to(torch.bfloat16))], DEFAULT_SHARD_SIZE)
    written = load_file(tmp_path / "model.safetensors")
    assert torch.equal(written["a"], torch.ones(2, 3)) and written["b"].tolist() == [0, 1, 2, 3]
