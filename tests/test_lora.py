"""LoraConfig validation, target selection and the LoRA layer's math."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import batch, make_model
from lightning_peft import ConfigError, LoraConfig, TargetModulesError
from lightning_peft.methods.lora import LoraLayer
from lightning_peft.surgery import adapter_layers, attach


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=0), dict(r=-2), dict(r=2.5), dict(lora_alpha=0), dict(lora_alpha=-1), dict(lora_dropout=1.0),
     dict(lora_dropout=-0.1), dict(bias="some"), dict(init_lora_weights="orthogonal"), dict(target_modules=[1]),
     dict(target_modules="(unclosed"), dict(task_type="TRANSLATION"), dict(modules_to_save="score")],
)
def test_bad_config_is_refused_at_construction(kwargs):
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)


def test_targets_that_match_nothing_list_the_candidates(llama):
    before = {n: p.clone() for n, p in llama.state_dict().items()}
    with pytest.raises(TargetModulesError, match=r"q_proj.*v_proj|k_proj") as err:
        attach(llama, LoraConfig(target_modules=["qproj"]))
    assert "lm_head" in str(err.value) and "qproj" in str(err.value)
    assert not adapter_layers(llama)
    assert all(torch.equal(before[n], p) for n, p in llama.state_dict().items())
    assert all(p.requires_grad for p in llama.parameters())


def test_target_of_wrong_type_is_named(llama):
    with pytest.raises(TargetModulesError, match="self_attn.*LlamaAttention"):
        attach(llama, LoraConfig(target_modules=["self_attn"]))


def test_all_linear_skips_the_output_head(llama):
    layers = attach(llama, LoraConfig(target_modules="all-linear"))
    assert len(layers) == 2 * 7 and not any("lm_head" in p for p in layers)


def test_regex_and_exclude_modules(llama):
    layers = attach(llama, LoraConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=["layers.1.self_attn.v_proj"]))
    assert sorted(layers) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                              "model.layers.1.self_attn.q_proj"]


def test_default_targets_follow_the_family():
    layers = attach(make_model("gpt2"), LoraConfig())
    assert sorted(p.rsplit(".", 1)[1] for p in layers) == ["c_attn", "c_attn"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank_update(use_rslora):
    base = nn.Linear(6, 5)
    layer = LoraLayer(base, LoraConfig(r=3, lora_alpha=6, use_rslora=use_rslora, init_lora_weights=False))
    x = torch.randn(2, 4, 6)
    scaling = 6 / (math.sqrt(3) if use_rslora else 3)
    expected = base(x) + scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


def test_new_adapter_starts_as_a_no_op(llama):
    expected = llama(**batch()).logits
    attach(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(llama(**batch()).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(family):
    model = make_model(family)
    layers = attach(model, LoraConfig(r=4, target_modules=["q_proj"] if family == "llama" else ["c_attn"],
                                      init_lora_weights=False))
    weights = {p: layer.base_layer.weight.clone() for p, layer in layers.items()}
    expected = model(**batch()).logits
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)
    for path, layer in layers.items():
        assert not torch.equal(layer.base_layer.weight, weights[path])
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("bias", "count"), [("none", 0), ("all", 6), ("lora_only", 2)])
def test_bias_modes_train_and_save_the_right_biases(tmp_path, bias, count):
    from safetensors.torch import load_file

    from lightning_peft import save_adapter

    model = make_model("gpt2")
    attach(model, LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    trained_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert len(trained_biases) >= count
    save_adapter(model, tmp_path)
    saved_biases = [k for k in load_file(tmp_path / "adapter_model.safetensors") if k.endswith("bias")]
    assert len(saved_biases) == len(trained_biases)
    if bias == "lora_only":
        assert all(k.endswith("c_attn.base_layer.bias") for k in saved_biases) and len(saved_biases) == count
    if bias == "none":
        assert saved_biases == []


def test_dropout_is_active_only_in_training():
    layer = LoraLayer(nn.Linear(8, 8), LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
