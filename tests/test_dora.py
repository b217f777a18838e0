"""The LoRA variants chosen by a LoraConfig flag: DoRA (use_dora) and rsLoRA (use_rslora): their math, gradients,
merges, files, and HF PEFT reading them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import batch, make_model
from lightning_peft import LoraConfig, load_adapter, save_adapter
from lightning_peft.methods.dora import DoraLayer
from lightning_peft.surgery import attach

CONFIG = dict(r=3, lora_alpha=6, init_lora_weights=False, use_dora=True)


def _manual(layer: DoraLayer, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m ⊙ (W + s·BA) / ‖W + s·BA‖_row`` applied to x, the norm treated as a constant."""
    adapted = weight + layer.scaling * layer.lora_B @ layer.lora_A
    norm = adapted.detach().norm(dim=1)
    return x @ ((layer.lora_magnitude_vector / norm)[:, None] * adapted).T + bias


@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_is_magnitude_times_normalised_direction(conv1d):
    torch.manual_seed(0)
    base = Conv1D(5, 6) if conv1d else nn.Linear(6, 5)
    layer = DoraLayer(base, LoraConfig(**CONFIG))
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(5) + 0.5)  # away from its initial value
    weight = base.weight.T if conv1d else base.weight
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), _manual(layer, weight, base.bias, x))


def test_gradients_treat_the_norm_as_a_constant():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = DoraLayer(base, LoraConfig(**CONFIG))
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    ours = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    layer.zero_grad()
    _manual(layer, base.weight, base.bias, x).square().sum().backward()
    for mine, reference in zip(ours, (layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad)):
        torch.testing.assert_close(mine, reference)


def test_magnitude_starts_at_the_row_norm_and_a_default_adapter_is_a_no_op(llama):
    expected = llama(**batch()).logits
    layers = attach(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    torch.testing.assert_close(llama(**batch()).logits, expected, rtol=0, atol=1e-6)
    for layer in layers.values():
        assert isinstance(layer, DoraLayer)
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


def test_merge_unmerge_round_trip_on_conv1d():
    model = make_model("gpt2")
    layers = attach(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, use_dora=True))
    weights = {p: layer.base_layer.weight.clone() for p, layer in layers.items()}
    expected = model(**batch()).logits
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)
    for path, layer in layers.items():
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=0, atol=1e-6)


def test_file_holds_the_magnitude_under_peft_names(tmp_path, llama):
    attach(llama, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    save_adapter(llama, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("use_dora", [False, True])
def test_rslora_scales_by_alpha_over_sqrt_r_and_hf_peft_agrees(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        use_rslora=True, use_dora=use_dora)
    layers = attach(model, config)
    assert all(layer.scaling == 8 / math.sqrt(4) for layer in layers.values())  # 4, not LoRA's 2
    expected = model(**batch()).logits
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()
    assert next(iter(theirs.peft_config.values())).use_rslora is True
    torch.testing.assert_close(theirs(**batch()).logits, expected, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(back(**batch()).logits, expected, rtol=0, atol=1e-5)


def test_dropout_matches_hf_peft_in_training(tmp_path):
    """With dropout, the base path of DoRA's correction sees the dropped input too, as in HF PEFT."""
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj"], init_lora_weights=False,
                             use_dora=True))
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    model.train(), theirs.train()
    torch.manual_seed(5)
    ours = model(**batch()).logits
    torch.manual_seed(5)
    torch.testing.assert_close(theirs(**batch()).logits, ours, rtol=0, atol=1e-5)
