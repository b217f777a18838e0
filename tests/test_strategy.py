"""PeftStrategy inside Lightning: the base quantized (or streamed in from the meta device) before the adapter
goes on and before the device move or DDP wrap, the optimizer it defaults to, gradient checkpointing,
adapter-only checkpoints that resume exactly, and merged exports from a 4-bit base."""

from __future__ import annotations

import bitsandbytes as bnb
import jsonargparse
import lightning as L
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from conftest import QUANTIZABLE, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import (
    ConfigError,
    LoraConfig,
    MergeCallback,
    PeftCallback,
    PeftDDPStrategy,
    PeftStrategy,
    QuantizationConfig,
    load_adapter,
)
from lightning_peft.methods.lora import LoraLayer
from lightning_peft.quantization import dequantize, is_quantized, quantize_model, skip_paths

pytestmark = pytest.mark.filterwarnings("ignore:optim='paged_adamw_32bit'")
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def qlora(**kwargs) -> PeftStrategy:
    return PeftStrategy(quantization=QuantizationConfig(**NF4), **kwargs)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    make_model("llama", **QUANTIZABLE).save_pretrained(path)
    return path


class FromPretrained(CausalLM):
    """Creates its model on the meta device from a pretrained directory's config, in ``configure_model``."""

    def __init__(self, path, **kwargs):
        super().__init__(in_init=False, **kwargs)
        self.path = path

    def configure_model(self):
        if self.model is None:
            with torch.device("meta"):
                self.model = transformers.AutoModelForCausalLM.from_config(
                    transformers.AutoConfig.from_pretrained(self.path))


def assert_qlora(model: torch.nn.Module) -> None:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 8 and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)  # quantized though not adapted
    assert type(model.lm_head) is torch.nn.Linear and model.model.norm.weight.dtype == torch.float32
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}


def test_qlora_fit_with_the_model_built_in_init():
    module = CausalLM(optimizer=None, sizes=QUANTIZABLE)
    original = module.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match="paging needs CUDA"):
        trainer(strategy=qlora(), callbacks=[PeftCallback(LoraConfig(**LORA), learning_rate=1e-2)]).fit(
            module, loader(n=4))
    assert_qlora(module.model)
    (optimizer,) = module.trainer.optimizers
    assert type(optimizer).__name__ == "AdamW32bit"  # paged AdamW's update; paging itself needs CUDA
    assert len(optimizer.param_groups[0]["params"]) == 16
    error = dequantize(module.model.model.layers[0].self_attn.q_proj.base_layer) - original
    assert error.abs().max() < 0.2 * original.abs().max()  # quantized from the module's own weights
    assert module.losses[-1] < module.losses[0]


def test_frozen_quantized_weights_never_reach_the_module_optimizer():
    module = CausalLM(sizes=QUANTIZABLE)  # configure_optimizers passes every parameter, frozen ones included
    trainer(strategy=qlora(), callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=1).fit(module, loader(n=4))
    (optimizer,) = module.trainer.optimizers
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 16 and all(p.requires_grad and p.is_floating_point() for p in params)


@pytest.mark.parametrize("style", ["configure_model", "init_module"])
def test_meta_model_is_streamed_from_its_pretrained_directory(pretrained, style):
    expected = make_model("llama", **QUANTIZABLE)
    strategy = qlora()
    fit = trainer(strategy=strategy, callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=2)
    if style == "init_module":
        with fit.init_module(empty_init=True):
            module = CausalLM(in_init=False, sizes=QUANTIZABLE)
            module.model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(pretrained))
        assert module.model.lm_head.weight.device.type == "meta"
    else:
        module = FromPretrained(pretrained)
    fit.fit(module, loader(n=4))
    assert_qlora(module.model)
    torch.testing.assert_close(module.model.model.embed_tokens.weight, expected.model.embed_tokens.weight)
    assert not [n for n, t in module.model.state_dict().items() if t.device.type == "meta"]
    reference = make_model("llama", **QUANTIZABLE)
    quantize_model(reference, strategy.quantization, "cpu", skip_paths(reference, strategy.quantization))
    streamed = module.model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(streamed, reference.model.layers[1].mlp.up_proj.weight)  # same bytes as quantizing in memory


def test_bfloat16_checkpoint_trains_with_float32_norms_and_bfloat16_activations(tmp_path):
    make_model("llama", **QUANTIZABLE).to(torch.bfloat16).save_pretrained(tmp_path)
    module = FromPretrained(tmp_path)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype="bfloat16"))
    trainer(strategy=strategy, callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=2).fit(module, loader(n=4))
    model = module.model
    # What stays unquantized keeps the checkpoint's dtype; the norms compute in float32 but hand on bfloat16.
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    hidden = model(**batch(), output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.bfloat16 for h in hidden)
    assert all(torch.isfinite(torch.tensor(module.losses)))
    norm = model.model.norm
    x = torch.randn(3, norm.weight.shape[0]).to(torch.bfloat16)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    expected = (norm.weight * (x.float() * torch.rsqrt(variance + norm.variance_epsilon)).to(torch.bfloat16))
    torch.testing.assert_close(norm(x), expected.to(torch.bfloat16), rtol=0, atol=0)


class Holder(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def test_head_trained_in_full_on_a_bfloat16_base_holds_float32_weights(tmp_path):
    make_model("bert", "seq_cls", **QUANTIZABLE).to(torch.bfloat16).save_pretrained(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype="bfloat16"))
    strategy.prepare_model(Holder(model), LoraConfig(r=4, target_modules=["query", "value"]))
    assert model.classifier.weight.dtype == torch.float32 and not is_quantized(model.classifier)
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model(**batch()).logits.dtype == torch.float32


def test_checkpoint_dir_argument_and_a_meta_model_without_one(tmp_path, pretrained):
    module = FromPretrained(pretrained)
    module.configure_model()
    module.model.name_or_path = ""
    strategy = PeftStrategy(checkpoint_dir=pretrained)  # streaming without quantization works too
    trainer(strategy=strategy, callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=1).fit(module, loader())
    assert not any(is_quantized(m) for m in module.model.modules())
    orphan = FromPretrained(pretrained)
    orphan.configure_model()
    orphan.model.name_or_path = ""
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        trainer(strategy=qlora(), callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(orphan, loader())


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        module = CausalLM(sizes=QUANTIZABLE)
        strategy = qlora(gradient_checkpointing=checkpointing,
                         gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        PeftCallback(LoraConfig(**LORA, init_lora_weights=False)).setup(
            trainer(strategy=strategy), module, "fit")
        assert module.model.is_gradient_checkpointing is checkpointing
        grads.append(lora_grads(module.model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_checkpoints_hold_no_base_weight_and_resume_exactly(tmp_path, pretrained):
    def run(max_steps, **kwargs):
        torch.manual_seed(0)
        module = FromPretrained(pretrained)
        callbacks = [PeftCallback(LoraConfig(**LORA)), *kwargs.pop("callbacks", [])]
        ckpt_path = kwargs.pop("ckpt_path", None)
        trainer(strategy=qlora(), callbacks=callbacks, max_steps=max_steps, **kwargs).fit(
            module, loader(n=8), ckpt_path=ckpt_path)
        return module

    straight = run(4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = run(2, callbacks=[ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    assert len(state) == 16 and all(".lora_" in k and t.is_floating_point() for k, t in state.items())
    second = run(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert first.losses == straight.losses[:2]
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(straight.losses[2:]), rtol=1e-6, atol=1e-6)


def test_merge_callback_exports_a_plain_model_from_a_4bit_base(tmp_path):
    module = CausalLM(sizes=QUANTIZABLE)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype="float32"))
    trainer(strategy=strategy, callbacks=[PeftCallback(LoraConfig(**LORA)),
                                          MergeCallback(tmp_path / "merged", dtype="float32")],
            max_steps=2).fit(module, loader(n=4))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(is_quantized(m) for m in merged.modules()) and merged.dtype == torch.float32
    module.model.eval()
    torch.testing.assert_close(merged(**batch()).logits, module.model(**batch()).logits, rtol=0, atol=1e-3)


class RecordWrapped(Callback):
    def on_train_start(self, trainer, pl_module):
        self.wrapped = trainer.strategy.model


def test_ddp_variant_quantizes_before_the_wrap(tmp_path):
    module = CausalLM(sizes=QUANTIZABLE)
    record = RecordWrapped()
    fit = trainer(strategy=PeftDDPStrategy(quantization=QuantizationConfig(load_in_8bit=True)),
                  callbacks=[PeftCallback(LoraConfig(**LORA)), record], max_steps=2)
    try:
        fit.fit(module, loader(n=4))
        wrapped = record.wrapped
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        in_ddp = {id(p) for p in wrapped.parameters() if p.requires_grad}
        adapter = {id(p) for n, p in module.named_parameters() if ".lora_" in n}
        assert in_ddp == adapter and len(adapter) == 16
        assert isinstance(module.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_short_names_and_yaml_build_the_strategy():
    assert {"peft", "peft_ddp", "qlora", "qlora_ddp"} <= set(StrategyRegistry.available_strategies())
    strategy = trainer(strategy="qlora").strategy
    assert isinstance(strategy, PeftStrategy) and strategy.quantization.bnb_4bit_quant_type == "nf4"
    assert isinstance(trainer(strategy="peft_ddp").strategy, PeftDDPStrategy)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--strategy", type=PeftStrategy)
    config = parser.parse_string("""
strategy:
  class_path: lightning_peft.PeftStrategy
  init_args:
    quantization: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}
    gradient_checkpointing: true
""")
    strategy = parser.instantiate_classes(config).strategy
    assert strategy.quantization == QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype="bfloat16")
    assert strategy.gradient_checkpointing


def test_the_trainer_devices_choose_the_device_and_several_are_refused():
    strategy = qlora()
    trainer(strategy=strategy)
    assert strategy.parallel_devices == [torch.device("cpu")] and strategy.root_device == torch.device("cpu")
    module = CausalLM(sizes=QUANTIZABLE)
    with pytest.raises(ConfigError, match="peft_ddp"):
        trainer(strategy=qlora(), devices=2, callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(module, loader(n=4))
    assert module.losses == []


class DuringTraining(Callback):
    """Records where the 4-bit weights and the optimizer state are while training runs (teardown moves the
    module to the CPU afterwards)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        q_proj = pl_module.model.model.layers[0].self_attn.q_proj
        self.weight_device = q_proj.base_layer.weight.device
        self.adapter_device = q_proj.lora_A.device
        self.compute_dtype = q_proj.base_layer.compute_dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_cuda_quantizes_on_the_chosen_gpu_and_pages_the_optimizer(pretrained):
    module = FromPretrained(pretrained, optimizer=None)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype="bfloat16"),
                            gradient_checkpointing=True)
    index = torch.cuda.device_count() - 1  # the last GPU: devices=[N] must be honoured, not the current device
    during = DuringTraining()
    trainer(accelerator="cuda", devices=[index], strategy=strategy,
            callbacks=[PeftCallback(LoraConfig(**LORA)), during]).fit(module, loader(n=4))
    assert during.weight_device == during.adapter_device == torch.device("cuda", index)
    assert during.compute_dtype == torch.bfloat16
    assert type(module.trainer.optimizers[0]).__name__ == "PagedAdamW32bit"
    assert module.losses[-1] < module.losses[0]


def paged_state(optimizer) -> list[bool]:
    """For each parameter whose state bitsandbytes pages (100,000 values or more): whether it is paged now."""
    return [getattr(optimizer.state[p]["state1"], "is_paged", False) for group in optimizer.param_groups
            for p in group["params"] if p in optimizer.state and p.numel() >= 100_000]


class PagedState(Callback):
    def on_train_start(self, trainer, pl_module):  # after a resume restored the optimizer state
        self.at_start = paged_state(trainer.optimizers[0])

    def on_train_end(self, trainer, pl_module):
        self.at_end = paged_state(trainer.optimizers[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resumed_paged_optimizer_keeps_its_state_paged_and_the_checkpoint_loads_on_the_cpu(tmp_path):
    sizes = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    lora = LoraConfig(r=128, lora_alpha=256, target_modules=["q_proj", "o_proj"])  # 131,072 values per matrix

    def run(max_steps, **kwargs):
        torch.manual_seed(0)
        module = CausalLM(optimizer=None, sizes=sizes)
        paged = PagedState()
        strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype="bfloat16"))
        trainer(accelerator="cuda", strategy=strategy, max_steps=max_steps, enable_checkpointing=True,
                callbacks=[PeftCallback(lora), paged, ModelCheckpoint(dirpath=tmp_path, save_top_k=-1,
                                                                      every_n_train_steps=2)]
                ).fit(module, loader(n=16), ckpt_path=kwargs.get("ckpt_path"))
        return module, paged

    _, first = run(2)
    assert first.at_end and all(first.at_end)
    _, resumed = run(4, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert resumed.at_start and all(resumed.at_start) and all(resumed.at_end)
    cpu = load_adapter(make_model("llama", **sizes), tmp_path / "epoch=0-step=4.ckpt")  # no GPU needed to read it
    state = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
    assert state and all(t.device.type == "cpu" for t in state.values())
    assert torch.isfinite(cpu(**batch()).logits).all()
