"""Encoder-decoder models (T5, BART) with every weight-adapting method on "all-linear": model code that reads
attributes of the layers an adapter wraps (T5's ``wo.weight.dtype``) keeps working, files interoperate with HF
PEFT (``SEQ_2_SEQ_LM``) both ways and merges are exact. Prompt tuning puts its virtual tokens before the encoder's
input as HF PEFT does (same outputs and generations, files both ways); prefix tuning refuses such models clearly."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers

from conftest import QUANTIZABLE, VOCAB
from lightning_peft import (
    AdaLoraConfig,
    ConfigError,
    IA3Config,
    LoraConfig,
    MergeError,
    PrefixTuningConfig,
    PromptTuningConfig,
    QuantizationConfig,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from lightning_peft.methods.base import WrappingLayer
from lightning_peft.quantization import quantize_model, skip_paths
from lightning_peft.surgery import adapter_layers, attach, detach

SEQ2SEQ = {
    "t5": (transformers.T5Config, dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0), "wo"),
    "bart": (transformers.BartConfig, dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                           max_position_embeddings=64, decoder_start_token_id=2), "fc2"),
}
TASK = "SEQ_2_SEQ_LM"


def make_seq2seq(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    config_class, kwargs, _ = SEQ2SEQ[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, pad_token_id=0, **{**kwargs, **overrides})
    return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()


def make_config(method: str, family: str):
    if method == "ia3":
        ffn = [SEQ2SEQ[family][2]]
        return IA3Config(task_type=TASK, target_modules="all-linear", feedforward_modules=ffn, init_ia3_weights=False)
    if method == "adalora":
        return AdaLoraConfig(task_type=TASK, init_r=4, target_r=2, total_step=10, target_modules="all-linear",
                             init_lora_weights=False)
    return LoraConfig(task_type=TASK, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                      use_dora=method == "dora")


def seq2seq_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)}


CASES = [(m, f) for m in ("lora", "dora", "adalora", "ia3") for f in SEQ2SEQ]


@pytest.mark.parametrize(("method", "family"), CASES)
def test_all_linear_trains_and_layers_stand_in_for_their_base(method, family):
    model = make_seq2seq(family)
    names_before = set(model.state_dict())
    count_before = len(list(model.parameters()))
    attach(model, make_config(method, family))
    layers = adapter_layers(model)
    assert len(layers) > 8
    for layer in layers.values():
        assert isinstance(layer, WrappingLayer)
        base = layer.base_layer
        assert layer.weight is base.weight and layer.bias is base.bias
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    # The forwarded weight is a property, not a second registration: the base's names and tensors are unchanged.
    state = model.state_dict()
    assert not any(key.endswith(f"{path}.weight") for path in layers for key in state)
    assert {k.replace(".base_layer", "") for k in state if "lora_" not in k and "ia3_" not in k} == names_before
    added = sum(len(layer.adapter_parameters()) for layer in layers.values())
    assert len(list(model.parameters())) == count_before + added

    model.train()
    inputs = seq2seq_batch()
    loss = model(**inputs, labels=inputs["decoder_input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("method", "family"), CASES)
def test_hf_peft_loads_ours_we_load_theirs_and_merge_is_exact(tmp_path, method, family):
    peft = pytest.importorskip("peft")
    model = make_seq2seq(family)
    attach(model, make_config(method, family))
    expected = model(**seq2seq_batch()).logits
    save_adapter(model, tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(make_seq2seq(family), tmp_path / "ours").eval()
    assert isinstance(theirs, peft.PeftModelForSeq2SeqLM)
    torch.testing.assert_close(theirs(**seq2seq_batch()).logits, expected, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_seq2seq(family), tmp_path / "theirs")
    torch.testing.assert_close(back(**seq2seq_batch()).logits, expected, rtol=0, atol=1e-5)

    merged = merge_adapter(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(**seq2seq_batch()).logits, expected, rtol=0, atol=1e-5)


def test_a_4bit_base_hands_over_its_quantized_weight():
    model = make_seq2seq("bart", d_model=QUANTIZABLE["hidden_size"], encoder_ffn_dim=QUANTIZABLE["intermediate_size"],
                         decoder_ffn_dim=QUANTIZABLE["intermediate_size"])
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantize_model(model, config, "cpu", skip_paths(model, config))
    attach(model, LoraConfig(task_type=TASK, r=4, target_modules="all-linear", init_lora_weights=False))
    layers = [layer for layer in adapter_layers(model).values() if isinstance(layer.base_layer, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight is layer.base_layer.weight
        assert (layer.in_features, layer.out_features) == (layer.base_layer.in_features, layer.base_layer.out_features)
    inputs = seq2seq_batch()
    model.train()
    model(**inputs, labels=inputs["decoder_input_ids"]).loss.backward()


def test_conv1d_base_reports_its_features_from_the_layer_not_the_weight():
    from conftest import make_model

    model = make_model("gpt2")
    attach(model, LoraConfig(r=4, target_modules=["c_attn"]))
    layer = next(iter(adapter_layers(model).values()))
    assert (layer.in_features, layer.out_features) == (layer.base_layer.nx, layer.base_layer.nf) == (32, 96)
    assert layer.weight is layer.base_layer.weight


def padded_batch() -> dict[str, torch.Tensor]:
    inputs = seq2seq_batch()
    inputs["attention_mask"][0, -3:] = 0  # a padded row: the cross-attention mask must still line up
    return inputs


@pytest.mark.parametrize("family", list(SEQ2SEQ))
def test_prompt_tuning_puts_the_prompt_before_the_encoder_input_as_hf_peft_does_both_ways(tmp_path, family):
    peft = pytest.importorskip("peft")
    model = make_seq2seq(family)
    (encoder,) = attach(model, PromptTuningConfig(task_type=TASK, num_virtual_tokens=3)).values()
    assert encoder.config.num_transformer_submodules == 2 and encoder.prompt_embeddings.shape == (6, 32)
    inputs = padded_batch()
    expected = model(**inputs).logits
    assert expected.shape[1] == inputs["decoder_input_ids"].shape[1]  # the decoder's length is unchanged
    assert not torch.allclose(make_seq2seq(family)(**inputs).logits, expected, atol=1e-4)
    save_adapter(model, tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(make_seq2seq(family), tmp_path / "ours").eval()
    assert isinstance(theirs, peft.PeftModelForSeq2SeqLM)
    torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=0, atol=1e-5)
    generate = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], min_new_tokens=4,
                    max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ours_generated, theirs_generated = model.generate(**generate), theirs.generate(**generate)
    torch.testing.assert_close(ours_generated.sequences, theirs_generated.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(ours_generated.scores), torch.stack(theirs_generated.scores),
                               rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_seq2seq(family), tmp_path / "theirs")
    torch.testing.assert_close(back(**inputs).logits, expected, rtol=0, atol=1e-5)

    with pytest.raises(MergeError):
        merge_adapter(model)
    detach(model)
    torch.testing.assert_close(model(**inputs).logits, make_seq2seq(family)(**inputs).logits, rtol=0, atol=1e-5)


def test_prompt_tuning_reads_the_seq2seq_task_from_the_model_and_refuses_another():
    model = make_seq2seq("t5")
    with pytest.raises(ConfigError, match="encoder-decoder T5ForConditionalGeneration needs task_type='SEQ_2_SEQ_LM'"):
        attach(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not adapter_layers(model)
    (encoder,) = attach(model, PromptTuningConfig(num_virtual_tokens=3)).values()
    assert encoder.config.task_type == TASK


@pytest.mark.parametrize("task_type", [TASK, "CAUSAL_LM"])
def test_prefix_tuning_refuses_encoder_decoders_naming_why(task_type):
    model = make_seq2seq("t5")
    with pytest.raises(ConfigError, match="Prefix tuning does not support encoder-decoder.*PromptTuningConfig"):
        attach(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3))
    assert not adapter_layers(model)
