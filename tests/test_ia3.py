"""IA3: which side each vector scales, HF PEFT's defaults and files, merge and unmerge with biases."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import batch, make_model
from lightning_peft import ConfigError, IA3Config, save_adapter
from lightning_peft.methods.ia3 import IA3Layer
from lightning_peft.surgery import attach


@pytest.mark.parametrize("conv1d", [False, True])
def test_feedforward_scales_the_input_and_others_the_output(conv1d):
    torch.manual_seed(0)
    base = Conv1D(5, 6) if conv1d else nn.Linear(6, 5)
    x = torch.randn(2, 3, 6)
    out_layer = IA3Layer(base, IA3Config(init_ia3_weights=False), is_feedforward=False)
    in_layer = IA3Layer(base, IA3Config(init_ia3_weights=False), is_feedforward=True)
    assert out_layer.ia3_l.shape == (5, 1) and in_layer.ia3_l.shape == (1, 6)
    torch.testing.assert_close(out_layer(x), base(x) * out_layer.ia3_l.flatten())
    torch.testing.assert_close(in_layer(x), base(x * in_layer.ia3_l.flatten()))
    fresh = IA3Layer(base, IA3Config(), is_feedforward=True)
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=0)  # ones: a no-op


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "end no entry of target_modules"),
     (dict(init_ia3_weights="yes"), "init_ia3_weights"), (dict(feedforward_modules=[3]), "feedforward_modules")],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IA3Config(**kwargs)


def test_defaults_follow_hf_peft_and_peft_reads_the_file(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    layers = attach(model, IA3Config(init_ia3_weights=False))
    assert sorted({(p.rsplit(".", 1)[1], layer.is_feedforward) for p, layer in layers.items()}) == [
        ("down_proj", True), ("k_proj", False), ("v_proj", False)]
    expected = model(**batch()).logits
    save_adapter(model, tmp_path)
    shapes = {k.split("layers.0.")[1]: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
              if "layers.0." in k}
    assert shapes == {"mlp.down_proj.ia3_l": (1, 64), "self_attn.k_proj.ia3_l": (16, 1),
                      "self_attn.v_proj.ia3_l": (16, 1)}
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(theirs(**batch()).logits, expected, rtol=0, atol=1e-5)


def test_family_without_default_names_the_fix():
    with pytest.raises(ConfigError, match="feedforward_modules=\\['down_proj'\\]"):
        attach(make_model("distilbert", "seq_cls"), IA3Config())


def test_merge_scales_output_biases_and_unmerge_restores_them():
    model = make_model("gpt2")
    with torch.no_grad():  # GPT-2 starts with zero biases, which any scaling leaves alone
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    layers = attach(model, IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                     init_ia3_weights=False))
    before = {p: (l.base_layer.weight.clone(), l.base_layer.bias.clone()) for p, l in layers.items()}
    expected = model(**batch()).logits
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)
    for path, layer in layers.items():
        weight, bias = before[path]
        assert torch.equal(layer.base_layer.bias, bias) == layer.is_feedforward  # only output vectors touch b
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.bias, bias, rtol=1e-6, atol=1e-6)
