"""Every method in practice: trained by PeftCallback through the user's unchanged training_step, with
adapter-only checkpoints; and on a 4-bit base: trains, round-trips, and merges to a dense model or refuses."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import QUANTIZABLE, METHODS, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import MergeError, PeftCallback, QuantizationConfig, load_adapter, merge_adapter, save_adapter
from lightning_peft.quantization import is_quantized, quantize_model, skip_paths
from lightning_peft.surgery import adapter_layers, attach

NEW = ["dora", "ia3", "bottleneck"]


@pytest.mark.parametrize("method", NEW)
def test_fit_trains_the_adapter_and_checkpoints_hold_only_it(tmp_path, method):
    module = CausalLM(lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters()}
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[PeftCallback(METHODS[method]["make"]("llama")), ckpt], enable_checkpointing=True,
            max_steps=4).fit(module, loader(n=4))
    assert module.losses[-1] < module.losses[0]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    for name, param in module.named_parameters():
        if name not in trainable:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert set(state) == trainable


def _four_bit(family: str = "llama"):
    model = make_model(family, **QUANTIZABLE)
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantize_model(model, config, "cpu", skip_paths(model, config))
    return model


@pytest.mark.parametrize("method", NEW)
def test_on_a_4bit_base(tmp_path, method):
    model = _four_bit()
    attach(model, METHODS[method]["make"]("llama"))
    assert any(is_quantized(layer.base_layer) for layer in adapter_layers(model).values())
    model.train()
    ids = batch()["input_ids"]
    model(**batch(), labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    model.eval()
    expected = model(**batch()).logits
    save_adapter(model, tmp_path)
    torch.testing.assert_close(load_adapter(_four_bit(), tmp_path)(**batch()).logits, expected, rtol=0, atol=0)
    if not METHODS[method]["mergeable"]:
        with pytest.raises(MergeError, match="Cannot merge"):
            merge_adapter(model)
        return
    merged = merge_adapter(model)  # dense layers in the compute dtype: no rounding back to 4 bits
    assert not adapter_layers(merged) and not any(is_quantized(m) for m in merged.modules())
    torch.testing.assert_close(merged(**batch()).logits, expected, rtol=0, atol=1e-5)
