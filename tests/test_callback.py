"""PeftCallback inside Lightning: injection before optimizers in both creation styles, optimizer hygiene,
adapter-only checkpoints and exact resume."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import AdapterMismatchError, ConfigError, LoraConfig, PeftCallback
from lightning_peft.surgery import adapter_layers

LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("in_init", [True, False])
def test_fit_trains_adapter_only_in_both_creation_styles(in_init):
    module = CausalLM(in_init=in_init)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    if not in_init:
        module = CausalLM(in_init=False)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(module, loader(n=4))  # one batch, seen 4 times
    assert len(adapter_layers(module.model)) == 8
    optimizer = module.trainer.optimizers[0]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert in_optimizer and all(p.requires_grad for p in in_optimizer)
    assert len(in_optimizer) == 16
    if in_init:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                assert torch.equal(param, before[name.replace(".base_layer", "")]), name
    assert module.losses[-1] < module.losses[0]


def test_no_optimizer_from_module_gets_one_over_adapter():
    module = CausalLM(optimizer=None)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA), learning_rate=1e-2, optim="adamw_torch")]).fit(
        module, loader(n=4))
    (optimizer,) = module.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-2
    assert len(optimizer.param_groups[0]["params"]) == 16
    assert module.losses[-1] < module.losses[0]


def test_parameter_counts_are_logged(caplog):
    with caplog.at_level("INFO"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=1).fit(CausalLM(), loader())
    assert "trainable params: 7,168 || all params:" in caplog.text


@pytest.mark.parametrize("strategy", ["auto", "peft"])
def test_configure_model_that_rebuilds_the_model_is_refused_before_any_optimizer(strategy):
    class Rebuilds(CausalLM):
        def configure_model(self):
            from conftest import make_model

            self.model = make_model("llama")

        def configure_optimizers(self):
            raise AssertionError("configure_optimizers ran before the rebuilt model was refused")

    with pytest.raises(ConfigError, match=r"return early.*`if self\.model is not None: return`"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], strategy=strategy).fit(Rebuilds(in_init=False),
                                                                                      loader())


def test_a_model_replaced_in_the_module_setup_hook_is_refused_at_fit_start():
    class ReplacesInSetup(CausalLM):
        def setup(self, stage):
            from conftest import make_model

            self.model = make_model("llama")

    with pytest.raises(ConfigError, match="lost its adapter.*if self.model is not None: return"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(ReplacesInSetup(), loader())


def test_checkpoint_is_adapter_only_and_small(tmp_path):
    module = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ckpt], enable_checkpointing=True).fit(module, loader())
    adapter_bytes = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    path = tmp_path / "last.ckpt"
    assert os.path.getsize(path) <= 3 * adapter_bytes + 2**20
    raw = torch.load(path, weights_only=True)
    assert "state_dict" not in raw and raw["state_dict_safetensors"].dtype == torch.uint8
    from lightning_peft.checkpoint import read_checkpoint

    state = read_checkpoint(path)["state_dict"]
    assert len(state) == 16 and all(".lora_" in k for k in state)
    assert raw["peft"]["adapter_config"]["peft_type"] == "LORA"


def test_resume_continues_with_the_same_losses(tmp_path):
    torch.manual_seed(0)
    straight = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=8).fit(straight, loader(n=16))

    torch.manual_seed(0)
    first = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ckpt], enable_checkpointing=True, max_steps=4).fit(
        first, loader(n=16))
    torch.manual_seed(0)
    second = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=8).fit(
        second, loader(n=16), ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert first.losses == straight.losses[:4]
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(straight.losses[4:]), rtol=1e-6, atol=1e-6)


def test_resume_with_another_adapter_config_is_refused_before_loading(tmp_path):
    module = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            enable_checkpointing=True, max_steps=1).fit(module, loader())
    other = CausalLM()
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        trainer(callbacks=[PeftCallback(LoraConfig(r=8, target_modules=["q_proj"]))]).fit(
            other, loader(), ckpt_path=tmp_path / "last.ckpt")
