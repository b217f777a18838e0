"""Lightning's precision plugins on a 4-bit base: under ``bf16-true`` (which converts the whole module to bfloat16
after the strategy prepared it) what the strategy holds in float32 stays float32 (the adapter, norms, a head
trained in full), and every method trains under ``bf16-mixed`` and ``bf16-true``, for a causal LM and a
classifier."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import METHODS, QUANTIZABLE, make_model
from lightning_helpers import loader, trainer
from lightning_peft import LoraConfig, PeftCallback, PeftStrategy, QuantizationConfig
from lightning_peft.quantization import dequantize, is_quantized
from lightning_peft.surgery import adapter_layers

pytestmark = pytest.mark.filterwarnings("ignore:optim='paged_adamw_32bit'")
FAMILY = {"bottleneck": "qwen2"}  # every other method adapts llama


class Tiny(L.LightningModule):
    """A 4-bit-friendly tiny model of ``family``; one fixed batch, so three steps must lower the loss."""

    def __init__(self, family: str, task: str) -> None:
        super().__init__()
        self.task = task
        self.model = make_model(family, task, **QUANTIZABLE).train()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        labels = ids if self.task == "causal" else ids[:, 0] % 2
        loss = self.model(input_ids=ids, labels=labels).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return None  # PeftCallback builds the strategy's default over the adapter


def nf4(**kwargs) -> PeftStrategy:
    return PeftStrategy(quantization=QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype="bfloat16", **kwargs))


def float32_parameters(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.dtype == torch.float32}


@pytest.mark.parametrize("task", ["causal", "seq_cls"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_a_4bit_base_under_bfloat16(method, precision, task):
    family = FAMILY.get(method, "llama")
    module = Tiny(family, task)
    adapter = METHODS[method]["make"](family)
    trainer(strategy=nf4(), precision=precision, max_steps=3,
            callbacks=[PeftCallback(adapter, learning_rate=1e-2)]).fit(module, loader(n=4))
    model = module.model
    assert any(is_quantized(m) for m in model.modules())
    adapter_params = {f"{path}.{name}" for path, layer in adapter_layers(model).items()
                      for name in layer.adapter_parameters()}
    norms = {n for n, _ in model.named_parameters() if "norm" in n and "layers.1" in n}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_params and norms and adapter_params | norms | trained <= float32_parameters(model)
    if precision == "bf16-true":
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # the base was converted
    assert all(torch.isfinite(torch.tensor(module.losses))) and module.losses[-1] < module.losses[0]


def test_bf16_true_keeps_the_float32_values_bit_for_bit():
    module = Tiny("llama", "seq_cls")
    before = {}

    class Record(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # after strategy.setup: converted, restored, moved
            before.update({n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                           if p.dtype == torch.float32})

    expected = {}

    class Snapshot(L.Callback):
        def setup(self, trainer, pl_module, stage):  # runs after PeftCallback's setup: adapter in, base prepared
            expected.update({n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                             if p.dtype == torch.float32})

    callbacks = [PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
                 Snapshot(), Record()]
    trainer(strategy=nf4(), precision="bf16-true", max_steps=0, callbacks=callbacks).fit(module, loader(n=4))
    assert {"score.weight", "model.norm.weight"} <= before.keys() and any(".lora_A" in n for n in before)
    assert "model.embed_tokens.weight" in expected.keys() - before.keys()  # the frozen base was converted
    for name, value in before.items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_float_storage_other_than_the_precision_dtype_is_kept_as_bytes(storage):
    module = Tiny("llama", "causal")
    strategy = nf4(bnb_4bit_quant_storage=storage)

    class Dense(L.Callback):
        def setup(self, trainer, pl_module, stage):
            self.weight = dequantize(pl_module.model.model.layers[0].mlp.up_proj)

    dense = Dense()
    trainer(strategy=strategy, precision="bf16-true", max_steps=3,
            callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), learning_rate=1e-2),
                       dense]).fit(module, loader(n=4))
    up = module.model.model.layers[0].mlp.up_proj
    assert up.weight.dtype == getattr(torch, storage)
    assert torch.equal(dequantize(up), dense.weight)
    assert module.losses[-1] < module.losses[0]
