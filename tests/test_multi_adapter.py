"""NamedAdapters: several adapters (of different methods) on one base, dense or 4-bit; each, when active, gives
exactly the outputs of that adapter loaded alone; disabled gives the bare base; deleting forgets one."""

from __future__ import annotations

import pytest
import torch

from conftest import QUANTIZABLE, METHODS, batch, make_model
from lightning_peft import ConfigError, QuantizationConfig, load_adapter, save_adapter
from lightning_peft.named_adapters import NamedAdapters
from lightning_peft.quantization import quantize_model, skip_paths
from lightning_peft.surgery import active_config, adapter_layers, attach

KINDS = ["lora", "ia3", "bottleneck"]


def _base(family: str, task: str, four_bit: bool):
    model = make_model(family, task, **QUANTIZABLE)
    if four_bit:
        config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        quantize_model(model, config, "cpu", skip_paths(model, config))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One adapter directory per method for llama (causal) and bert (classification, with its own head)."""
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for family, task in (("llama", "causal"), ("bert", "seq_cls")):
        for seed, kind in enumerate(KINDS):
            model = make_model(family, task, **QUANTIZABLE)
            torch.manual_seed(seed)
            attach(model, METHODS[kind]["make"](family))
            if task == "seq_cls":  # the head each adapter trains in full differs from the base's
                with torch.no_grad():
                    model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
            paths[family, kind] = save_adapter(model, root / f"{family}-{kind}")
    return paths


@pytest.mark.parametrize(("family", "task", "four_bit"),
                         [("llama", "causal", False), ("llama", "causal", True), ("bert", "seq_cls", False)])
def test_each_adapter_matches_it_loaded_alone_and_disabled_is_the_base(saved, family, task, four_bit):
    alone = {kind: load_adapter(_base(family, task, four_bit), saved[family, kind])(**batch()).logits
             for kind in KINDS}
    base_logits = _base(family, task, four_bit)(**batch()).logits
    model = _base(family, task, four_bit)
    base_layer_ids = {id(m) for m in model.modules()}
    adapters = NamedAdapters(model)
    for kind in KINDS:
        adapters.load(kind, saved[family, kind])
    assert adapters.names == KINDS and adapters.active == "lora"  # the first loaded stays active
    for kind in ["ia3", "bottleneck", "lora", "bottleneck"]:
        adapters.activate(kind)
        torch.testing.assert_close(model(**batch()).logits, alone[kind], rtol=0, atol=0)
    with adapters.disabled():
        assert not adapter_layers(model)
        torch.testing.assert_close(model(**batch()).logits, base_logits, rtol=0, atol=0)
    assert adapters.active == "bottleneck"
    torch.testing.assert_close(model(**batch()).logits, alone["bottleneck"], rtol=0, atol=0)
    # Switching never rebuilt the base: with adapters off, the model holds exactly its original modules.
    adapters.activate("lora")
    with adapters.disabled():
        assert {id(m) for m in model.modules()} == base_layer_ids


def test_delete_and_bad_names(saved):
    model = make_model("llama", **QUANTIZABLE)
    adapters = NamedAdapters(model)
    adapters.load("a", saved["llama", "lora"])
    adapters.load("b", saved["llama", "ia3"])
    with pytest.raises(ConfigError, match="already loaded"):
        adapters.load("a", saved["llama", "ia3"])
    with pytest.raises(ConfigError, match="No adapter named 'c'.*'a', 'b'"):
        adapters.activate("c")
    adapters.delete("a")
    assert adapters.names == ["b"] and adapters.active is None and not adapter_layers(model)
    adapters.activate("b")
    assert active_config(model).peft_type == "IA3"


def test_a_trained_adapter_is_adopted_and_keeps_its_changes(saved):
    model = make_model("llama", **QUANTIZABLE)
    attach(model, METHODS["dora"]["make"]("llama"))
    expected = model(**batch()).logits
    adapters = NamedAdapters(model, name="trained")
    adapters.load("other", saved["llama", "lora"])
    assert adapters.active == "trained"
    adapters.activate("other")
    adapters.activate("trained")
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=0)


def test_an_adapter_that_does_not_fit_is_refused_and_the_active_one_stays(saved):
    model = make_model("llama", **QUANTIZABLE)
    adapters = NamedAdapters(model)
    adapters.load("lora", saved["llama", "lora"])
    expected = model(**batch()).logits
    with pytest.raises(Exception, match="does not fit"):
        adapters.load("bert", saved["bert", "lora"])
    assert adapters.names == ["lora"] and adapters.active == "lora"
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=0)
