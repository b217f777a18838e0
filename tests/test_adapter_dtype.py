"""Adapter parameters are float32 whatever the base's dtype (as HF PEFT's default), so AdamW's small updates are
not rounded away on a bfloat16 base; every method trains and round-trips on a float32, a bfloat16 and a 4-bit
base with bfloat16 compute."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import METHODS, QUANTIZABLE, VOCAB, batch, make_model
from lightning_helpers import CausalLM, trainer
from lightning_peft import LoraConfig, PeftCallback, QuantizationConfig, load_adapter, save_adapter
from lightning_peft.quantization import quantize_model, skip_paths
from lightning_peft.surgery import adapter_layers, attach

BASES = ["float32", "bfloat16", "qlora"]


def _base(kind: str):
    model = make_model("llama", **QUANTIZABLE)
    if kind == "bfloat16":
        return model.to(torch.bfloat16)
    if kind == "qlora":
        config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype="bfloat16")  # strategy="qlora"
        quantize_model(model, config, "cpu", skip_paths(model, config))
    return model


def _one_batch_repeated(steps: int) -> DataLoader:
    ids = torch.randint(1, VOCAB, (1, 4, 16), generator=torch.Generator().manual_seed(0)).expand(steps, -1, -1)
    return DataLoader(TensorDataset(ids.reshape(-1, 16)), batch_size=4)


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}": p for path, layer in adapter_layers(model).items()
            for name, p in layer.adapter_parameters().items()}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_in_float32_and_round_trips(tmp_path, method, base):
    module = CausalLM(lr=1e-2, sizes=QUANTIZABLE)
    if base == "bfloat16":
        module.model.to(torch.bfloat16)
    strategy = "qlora" if base == "qlora" else "auto"
    trainer(strategy=strategy, callbacks=[PeftCallback(METHODS[method]["make"]("llama"))],
            max_steps=3).fit(module, _one_batch_repeated(3))
    assert module.losses[-1] < module.losses[0], module.losses
    params = _adapter_params(module.model)
    assert params and {p.dtype for p in params.values()} == {torch.float32}

    module.model.eval()
    inputs = batch()
    expected = module.model(**inputs).logits
    save_adapter(module.model, tmp_path)
    reloaded = load_adapter(_base(base), tmp_path)
    assert {p.dtype for p in _adapter_params(reloaded).values()} == {torch.float32}
    torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=0)


def test_small_updates_are_kept_on_a_bfloat16_base():
    """One AdamW step of lr=1e-6 moves each entry of A by about 1e-6: below bfloat16's resolution at A's magnitude
    (about 1e-3), so bfloat16 adapter weights would not move at all."""
    module = CausalLM(lr=1e-6, sizes=QUANTIZABLE)
    module.model.to(torch.bfloat16)
    attach(module.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.detach().clone() for k, v in _adapter_params(module.model).items()}
    trainer(callbacks=[PeftCallback(LoraConfig())], max_steps=1).fit(module, _one_batch_repeated(1))
    after = _adapter_params(module.model)
    assert all(not torch.equal(after[k], before[k]) for k in before)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype_and_is_not_written(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], autocast_adapter_dtype=False))
    assert {p.dtype for p in _adapter_params(model).values()} == {torch.bfloat16}
    save_adapter(model, tmp_path)
    assert "autocast_adapter_dtype" not in json.loads((tmp_path / "adapter_config.json").read_text())
