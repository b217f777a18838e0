"""Bottleneck adapters: the residual block's math and identity start, placement per family, files under our own
peft_type, and the merge refusal that says why."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import batch, make_model
from lightning_peft import BottleneckAdapterConfig, ConfigError, MergeError, export_merged, merge_adapter, save_adapter
from lightning_peft.methods.bottleneck import BottleneckLayer
from lightning_peft.surgery import adapter_layers, attach


def test_forward_is_output_plus_residual_mlp_and_starts_as_identity():
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    layer = BottleneckLayer(base, BottleneckAdapterConfig(reduction_factor=4, non_linearity="gelu",
                                                          init_weights=False))
    assert (layer.adapter_down.out_features, layer.adapter_up.out_features) == (2, 8)
    x = torch.randn(3, 6)
    h = base(x)
    expected = h + layer.adapter_up(nn.functional.gelu(layer.adapter_down(h)))
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), h)
    fresh = BottleneckLayer(base, BottleneckAdapterConfig(reduction_factor=4))
    torch.testing.assert_close(fresh(x), h, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "task", "placement", "names"), [
    ("llama", "causal", "both", {"self_attn.o_proj", "mlp.down_proj"}),
    ("llama", "causal", "attention", {"self_attn.o_proj"}),
    ("gpt2", "causal", "feedforward", {"mlp.c_proj"}),
    ("bert", "seq_cls", "feedforward", {"output.dense"}),
    ("bert", "seq_cls", "attention", {"attention.output.dense"}),
])
def test_placement_picks_the_sublayer_outputs(family, task, placement, names):
    layers = attach(make_model(family, task), BottleneckAdapterConfig(placement=placement))
    assert len(layers) == 2 * len(names)  # two transformer layers
    for name in names:  # BERT's feed-forward "output.dense" is not the attention's "attention.output.dense"
        matching = [p for p in layers if p.endswith(name) and (name != "output.dense" or "attention" not in p)]
        assert len(matching) == 2, sorted(layers)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(reduction_factor=0), "reduction_factor"), (dict(non_linearity="softmax"), "non_linearity"),
    (dict(placement="before"), "placement"), (dict(target_modules=["o_proj"], placement="attention"), "only one"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BottleneckAdapterConfig(**kwargs)


def test_target_modules_override_placement(llama):
    layers = attach(llama, BottleneckAdapterConfig(target_modules=["up_proj"]))
    assert sorted(p.rsplit(".", 1)[1] for p in layers) == ["up_proj", "up_proj"]
    assert all(layer.adapter_down.in_features == 64 for layer in layers.values())  # up_proj's output width


def test_saved_under_its_own_peft_type_and_keys(tmp_path, llama):
    attach(llama, BottleneckAdapterConfig(reduction_factor=8))
    save_adapter(llama, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight"].shape == (4, 32)
    assert len(keys) == 2 * 2 * 4  # layers x placements x (down, up) x (weight, bias)


def test_merge_and_export_are_refused_with_the_reason(tmp_path, llama):
    attach(llama, BottleneckAdapterConfig(init_weights=False))
    expected = llama(**batch()).logits
    for action in (lambda: merge_adapter(llama), lambda: export_merged(llama, tmp_path / "merged")):
        with pytest.raises(MergeError, match="non-linearity.*not a linear map"):
            action()
    assert len(adapter_layers(llama)) == 4 and not (tmp_path / "merged").exists()
    torch.testing.assert_close(llama(**batch()).logits, expected, rtol=0, atol=0)
