"""PeftCallback inside Lightning: injection before optimizers in both creation styles, optimizer hygiene,
adapter-only checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import AdapterMismatchError, ConfigError, LoraConfig, PeftCallback, restore_adapter
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA), learning_rate=1e-2, optim="adamw_torch")]).fit(
            module, loader(n=4))
    assert not [w for w in caught if "run with no optimizer" in str(w.message)]  # Lightning's, untrue here
    (optimizer,) = module.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-2
    assert len(optimizer.param_groups[0]["params"]) == 16
    assert module.losses[-1] < module.losses[0]


def test_built_optimizer_takes_the_module_learning_rate_when_the_callback_names_none():
    module = CausalLM(optimizer=None, lr=3e-3)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=1).fit(module, loader(n=4))
    (optimizer,) = module.trainer.optimizers
    assert optimizer.param_groups[0]["lr"] == 3e-3


class OptimizesEmbeddings(CausalLM):
    def configure_optimizers(self):
        return torch.optim.SGD(self.model.get_input_embeddings().parameters(), lr=0.1)


def test_module_optimizer_without_adapter_parameters_is_refused_not_replaced():
    module = OptimizesEmbeddings()
    with pytest.raises(ConfigError, match="self.parameters()") as err:
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(module, loader(n=4))
    assert "return None" in str(err.value)
    assert module.losses == []  # refused before the first step


def test_callback_optimizer_settings_beside_a_module_optimizer_are_refused():
    module = CausalLM()
    with pytest.raises(ConfigError, match="learning_rate=0.1"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA), learning_rate=0.1)]).fit(module, loader(n=4))
    assert module.losses == []


def test_parameter_counts_are_logged(caplog):
    module = CausalLM()
    with caplog.at_level("INFO"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], max_steps=1).fit(module, loader())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    assert trainable == 7_168 and f"{trainable:,}" in caplog.text and f"{total:,}" in caplog.text


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


@pytest.mark.parametrize("strategy", ["auto", "peft"])
def test_configure_model_is_called_once_by_the_callback_and_once_by_lightning(strategy):
    class Counts(CausalLM):
        calls = 0

        def configure_model(self):
            Counts.calls += 1
            super().configure_model()

    module = Counts(in_init=False)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA))], strategy=strategy, max_steps=1).fit(module, loader())
    assert Counts.calls == 2 and adapter_layers(module.model)


def test_a_model_replaced_in_the_module_setup_hook_is_refused_at_fit_start():
    class ReplacesInSetup(CausalLM):
        def setup(self, stage):
            from conftest import make_model

            self.model = make_model("llama")

    with pytest.raises(ConfigError, match="lost its adapter.*if self.model is not None: return"):
        trainer(callbacks=[PeftCallback(LoraConfig(**LORA))]).fit(ReplacesInSetup(), loader())


class Restoring(CausalLM):
    """A user's module with the documented one-line hook, and evaluation steps that record their logits."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def on_load_checkpoint(self, checkpoint):
        restore_adapter(self, checkpoint)

    def _record(self, batch, batch_idx):
        self.outputs.append(self.model(input_ids=batch[0]).logits.detach())

    validation_step = test_step = predict_step = _record


def _fit_and_checkpoint(module, tmp_path) -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="run")
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ckpt], enable_checkpointing=True).fit(module, loader())
    return tmp_path / "run.ckpt"


def test_checkpoint_is_a_plain_lightning_checkpoint_of_the_adapter(tmp_path):
    module = CausalLM()
    path = _fit_and_checkpoint(module, tmp_path)
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    adapter_bytes = sum(p.numel() * p.element_size() for p in trained.values())
    assert os.path.getsize(path) <= 3 * adapter_bytes + 2**20
    raw = torch.load(path, weights_only=True)
    assert raw["state_dict"].keys() == trained.keys()
    for name, value in raw["state_dict"].items():
        assert torch.equal(value, trained[name]), name
    assert json.loads(json.dumps(raw["peft"])) == raw["peft"]  # plain JSON types, nothing of ours to unpickle
    saved = LoraConfig.from_dict(raw["peft"]["adapter_config"])
    assert (saved.r, saved.lora_alpha, sorted(saved.target_modules)) == (16, 32, sorted(LORA["target_modules"]))


def _logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        return module.model.eval()(input_ids=ids).logits


def test_load_from_checkpoint_without_a_trainer_injects_the_recorded_adapter(tmp_path):
    trained = Restoring()
    path = _fit_and_checkpoint(trained, tmp_path)
    ids = loader(n=4).dataset.tensors[0]
    loaded = Restoring.load_from_checkpoint(path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(trained, ids))
    assert not torch.allclose(_logits(loaded, ids), _logits(CausalLM(), ids))


@pytest.mark.parametrize("with_callback", [True, False], ids=["with-callback", "without-callback"])
def test_validate_test_and_predict_from_a_checkpoint(tmp_path, with_callback):
    trained = Restoring()
    path = _fit_and_checkpoint(trained, tmp_path)
    data = loader(n=4)
    expected = _logits(trained, data.dataset.tensors[0])
    for run in ("validate", "test", "predict"):
        fresh = Restoring()
        callbacks = [PeftCallback(LoraConfig(**LORA))] if with_callback else []
        getattr(trainer(callbacks=callbacks), run)(fresh, data, ckpt_path=path)
        torch.testing.assert_close(fresh.outputs[0], expected, msg=run)


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
