"""Seq2SeqLMModule and Seq2SeqDataModule: a T5 and a BART fit with LoRA, IA3 and prompt tuning (the loss falls);
the adapter a fit leaves loads in HF PEFT with identical outputs and back, and LoRA and IA3 merge exactly. The data
module's fields, truncation, padding and split; the base streamed in under a quantizing strategy; a base built
with random weights from a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers

from conftest import QUANTIZABLE
from lightning_helpers import trainer
from lightning_peft import (
    ConfigError,
    IA3Config,
    LoraConfig,
    MergeError,
    PeftCallback,
    PeftFSDPStrategy,
    PeftStrategy,
    PromptTuningConfig,
    QuantizationConfig,
    Seq2SeqDataModule,
    Seq2SeqLMModule,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_peft.quantization import is_quantized
from lightning_peft.streaming import meta_tensor_names
from lightning_peft.surgery import adapter_layers
from tiny_assets import save_tiny_seq2seq

TASK = "SEQ_2_SEQ_LM"
PAIRS = [("What is AI?", "The study of machines that think."), ("Do you like movies?", "Yes, good ones."),
         ("Hello, how are you?", "Fine, thank you."), ("What language are you written in?", "Python."),
         ("Tell me a joke.", "Not today."), ("Who made you?", "People who like to tinker.")]
FEED_FORWARD = {"t5": "wo", "bart": "fc2"}  # IA3 scales the input of these
ADAPTERS = {
    "lora": (lambda family: LoraConfig(task_type=TASK, r=2, lora_alpha=4, target_modules="all-linear"), 1e-2),
    "ia3": (lambda family: IA3Config(task_type=TASK, target_modules="all-linear",
                                     feedforward_modules=[FEED_FORWARD[family]]), 3e-2),
    "prompt": (lambda family: PromptTuningConfig(task_type=TASK, num_virtual_tokens=4), 1e-1),
}


def write_pairs(path: Path, pairs: list[tuple[str, str]], input_field: str = "input",
                target_field: str = "target") -> Path:
    path.write_text("".join(json.dumps({input_field: a, target_field: b}) + "\n" for a, b in pairs))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq")
    return {family: save_tiny_seq2seq(root / family, family) for family in ("t5", "bart")}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def byt5_data(tmp_path: Path, **kwargs) -> Seq2SeqDataModule:
    data = Seq2SeqDataModule(str(write_pairs(tmp_path / "pairs.jsonl", PAIRS)), **kwargs)
    data.tokenizer = transformers.ByT5Tokenizer()
    return data


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_fits_with_a_falling_loss_and_hf_peft_reads_the_adapter_both_ways(bases, tmp_path, method, family):
    peft = pytest.importorskip("peft")
    make_config, learning_rate = ADAPTERS[method]
    module = Seq2SeqLMModule(str(bases[family]), learning_rate=learning_rate)
    data = Seq2SeqDataModule(str(write_pairs(tmp_path / "pairs.jsonl", PAIRS)), val_fraction=0.0,
                             batch_size=len(PAIRS))  # one batch: every step sees the same examples
    recorder = LossRecorder()
    torch.manual_seed(0)
    trainer(max_steps=3, limit_val_batches=0, callbacks=[PeftCallback(make_config(family)), recorder]).fit(module, data)
    assert len(recorder.losses) == 3 and recorder.losses[2] < recorder.losses[1] < recorder.losses[0]

    model = module.model.eval()
    batch = data.collate(data.train[:4])
    expected = model(**batch).logits
    assert expected.shape[1] == batch["labels"].shape[1]  # prompt tuning lengthens the encoder's input only
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(bases[family]).eval()
    assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)  # the adapter changed the model
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    assert isinstance(theirs, peft.PeftModelForSeq2SeqLM)
    torch.testing.assert_close(theirs(**batch).logits, expected, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(transformers.AutoModelForSeq2SeqLM.from_pretrained(bases[family]), tmp_path / "theirs")
    torch.testing.assert_close(back.eval()(**batch).logits, expected, rtol=0, atol=1e-5)

    if method == "prompt":
        with pytest.raises(MergeError, match="virtual tokens"):
            merge_adapter(model)
        return
    merged = merge_adapter(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_validation_logs_loss_perplexity_and_token_accuracy_and_predict_generates(bases, tmp_path):
    module = Seq2SeqLMModule(str(bases["t5"]), max_new_tokens=3)
    data = Seq2SeqDataModule(str(write_pairs(tmp_path / "pairs.jsonl", PAIRS)), val_file=str(
        write_pairs(tmp_path / "val.jsonl", PAIRS[:3])), batch_size=2)
    fit = trainer(max_steps=1, limit_train_batches=1, callbacks=[PeftCallback(ADAPTERS["lora"][0]("t5"))])
    fit.fit(module, data)
    metrics = fit.callback_metrics
    assert torch.isclose(metrics["val_perplexity"], metrics["val_loss"].exp(), rtol=0.05)  # one epoch, two batches
    assert 0 <= metrics["val_token_accuracy"] <= 1
    (predicted,) = [fit.predict(module, data.predict_dataloader())]
    assert [len(b) for b in predicted] == [2, 1] and all(isinstance(t, str) for b in predicted for t in b)
    assert len(module.generate(["What is AI?", "Hi"])) == 2


def test_pairs_are_read_from_the_configured_fields_truncated_and_padded(tmp_path):
    pairs = [("a much longer question than the rest", "and its long answer"), ("hi", "yo")]
    path = write_pairs(tmp_path / "qa.jsonl", pairs, input_field="question", target_field="answer")
    data = Seq2SeqDataModule(str(path), input_field="question", target_field="answer", val_fraction=0.0,
                             max_length=8, max_target_length=5, batch_size=2)
    tokenizer = data.tokenizer = transformers.ByT5Tokenizer()
    data.setup("fit")
    long, short = data.train
    assert len(long["input_ids"]) == 8 and len(long["labels"]) == 5  # truncated, the EOS kept last
    assert long["input_ids"][-1] == long["labels"][-1] == tokenizer.eos_token_id
    assert short["input_ids"] == tokenizer("hi")["input_ids"] and short["labels"] == tokenizer("yo")["input_ids"]
    batch = data.collate(data.train)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 5)  # the longest of the batch
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["input_ids"][1, 3:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][1].tolist() == short["labels"] + [-100, -100]


def test_validation_split_is_by_input_and_repeatable(tmp_path):
    pairs = [(f"question {i}", f"answer {j}") for i in range(40) for j in range(2)]  # each input twice
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    train, val = Seq2SeqDataModule(str(path), val_fraction=0.3).pairs()
    assert len(train) + len(val) == 80 and 0 < len(val) < 40
    assert not {a for a, _ in train} & {a for a, _ in val}
    assert (train, val) == Seq2SeqDataModule(str(path), val_fraction=0.3).pairs()


@pytest.mark.parametrize("record", [{"input": "only an input"}, {"input": "x", "target": 3}, {"text": "a"}])
def test_a_record_without_both_texts_is_refused_with_its_line(tmp_path, record):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input": "fine", "target": "too"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: .*'input' and 'target'.*input_field"):
        Seq2SeqDataModule(str(path)).pairs()


def test_the_base_is_streamed_in_under_a_quantizing_strategy_as_loading_it_whole_then_quantizing(tmp_path,
                                                                                                  monkeypatch):
    base = save_tiny_seq2seq(tmp_path / "t5", "t5", d_model=QUANTIZABLE["hidden_size"], d_kv=16,
                             d_ff=QUANTIZABLE["intermediate_size"])
    strategy = dict(quantization=QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    lora = LoraConfig(task_type=TASK, r=4, target_modules=["q", "v"])

    def set_up(module: Seq2SeqLMModule, on_meta: bool) -> Seq2SeqLMModule:
        fit = trainer(strategy=PeftStrategy(**strategy))
        module.trainer = fit
        torch.manual_seed(0)
        module.configure_model()
        assert all(t.device.type == "meta" for t in module.model.parameters()) == on_meta
        PeftCallback(lora).setup(fit, module, "fit")
        return module

    def refuse(cls, *args, **kwargs):
        raise AssertionError("from_pretrained would materialize the full-precision base")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
        streamed = set_up(Seq2SeqLMModule(str(base)), on_meta=True)
    whole = Seq2SeqLMModule(str(base))
    whole.configure_model()  # no trainer yet: from_pretrained
    whole = set_up(whole, on_meta=False)
    assert not meta_tensor_names(streamed.model)
    assert sum(is_quantized(m) for m in streamed.model.modules()) > 0
    for key, value in whole.model.state_dict().items():
        assert torch.equal(streamed.model.state_dict()[key], value), key
    batch = byt5_data(tmp_path, val_fraction=0.0)
    batch.setup("fit")
    inputs = batch.collate(batch.train[:3])
    torch.testing.assert_close(streamed.model(**inputs).logits, whole.model(**inputs).logits, rtol=0, atol=0)


def test_random_weights_build_the_model_from_its_config_alone(tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    transformers.T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                          decoder_start_token_id=0).save_pretrained(folder)
    transformers.ByT5Tokenizer().save_pretrained(folder)
    module = Seq2SeqLMModule(str(folder), random_weights=True)
    module.configure_model()
    assert isinstance(module.model, transformers.T5ForConditionalGeneration) and module.model.training
    with pytest.raises(OSError):  # nothing to load without it
        Seq2SeqLMModule(str(folder)).configure_model()
    streaming = Seq2SeqLMModule(str(folder), random_weights=True)
    streaming.trainer = trainer(strategy=PeftStrategy(quantization=QuantizationConfig(load_in_4bit=True)))
    with pytest.raises(ConfigError, match="random_weights.*stream"):
        streaming.configure_model()


def test_predicting_under_fsdp_is_refused_before_any_work(bases):
    module = Seq2SeqLMModule(str(bases["t5"]))
    module.trainer = trainer(strategy=PeftFSDPStrategy())
    with pytest.raises(ConfigError, match="Generating under FSDP"):
        module.setup("predict")
    module.setup("validate")  # validating (and training) under FSDP go ahead
