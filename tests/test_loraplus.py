"""LoRA+: the B matrices train at ``loraplus_lr_ratio`` times the learning rate of A, in whichever optimizer runs,
with the user's scheduler keeping the ratio."""

from __future__ import annotations

import pytest
import torch

from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import ConfigError, LoraConfig, PeftCallback
from lightning_peft.methods.lora import LoraLayer
from lightning_peft.optim import split_lr_groups

QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("ratio", [0, -1, True, "16"])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        LoraConfig(loraplus_lr_ratio=ratio)


def _b_and_a(module):
    layers = [m for m in module.model.modules() if isinstance(m, LoraLayer)]
    return {id(m.lora_B) for m in layers}, {id(m.lora_A) for m in layers}


class SGDWithSchedule(CausalLM):
    """The user's own optimizer (plain SGD, so an update is exactly -lr · grad) and a decaying schedule."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_users_optimizer_gets_b_at_ratio_times_the_rate_and_keeps_it_under_its_scheduler():
    module = SGDWithSchedule(lr=0.1)
    module.configure_model()
    trainer(callbacks=[PeftCallback(LoraConfig(**QV, loraplus_lr_ratio=16))], max_steps=3).fit(module, loader(n=12))
    (optimizer,) = module.trainer.optimizers
    b_ids, a_ids = _b_and_a(module)
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert a_ids in groups and b_ids in groups  # exactly one group each
    lr_a = next(g["lr"] for g in optimizer.param_groups if {id(p) for p in g["params"]} == a_ids)
    lr_b = next(g["lr"] for g in optimizer.param_groups if {id(p) for p in g["params"]} == b_ids)
    assert lr_a == pytest.approx(0.1 * 0.5 ** 3)  # the schedule moved both groups
    assert lr_b == pytest.approx(16 * lr_a)


def test_one_step_moves_b_sixteen_times_further_per_unit_of_gradient():
    module = SGDWithSchedule(lr=0.1)
    layers = {}
    config = LoraConfig(**QV, init_lora_weights=False, loraplus_lr_ratio=16)

    class Record(PeftCallback):
        def on_train_start(self, trainer, pl_module):
            layers.update({id(m): (m, m.lora_A.detach().clone(), m.lora_B.detach().clone())
                           for m in pl_module.model.modules() if isinstance(m, LoraLayer)})

    trainer(callbacks=[Record(config)], max_steps=1).fit(module, loader(n=4))
    for layer, a_before, b_before in layers.values():  # gradients stay in place until the next step
        torch.testing.assert_close(a_before - layer.lora_A.detach(), 0.1 * layer.lora_A.grad)
        torch.testing.assert_close(b_before - layer.lora_B.detach(), 16 * 0.1 * layer.lora_B.grad)


def test_built_optimizer_has_the_b_group_too():
    module = CausalLM(optimizer=None)
    callback = PeftCallback(LoraConfig(**QV, loraplus_lr_ratio=8), learning_rate=1e-3, optim="adamw_torch")
    trainer(callbacks=[callback], max_steps=1).fit(module, loader(n=4))
    (optimizer,) = module.trainer.optimizers
    b_ids, _ = _b_and_a(module)
    rates = {frozenset(id(p) for p in g["params"]): g["lr"] for g in optimizer.param_groups}
    assert rates[frozenset(b_ids)] == pytest.approx(8e-3) and sorted(rates.values()) == pytest.approx([1e-3, 8e-3])


def test_without_ratio_the_optimizer_is_left_alone():
    module = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**QV))], max_steps=1).fit(module, loader(n=4))
    assert len(module.trainer.optimizers[0].param_groups) == 1


def test_split_keeps_hyper_parameters_and_extends_every_scheduler():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([a, b], lr=1.0, weight_decay=0.1, betas=(0.8, 0.9))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    assert split_lr_groups(optimizer, {id(b): 4.0}, [cosine]) == 1
    first, second = optimizer.param_groups
    assert first["params"] == [a] and second["params"] == [b]
    assert second["weight_decay"] == 0.1 and second["betas"] == (0.8, 0.9) and second["initial_lr"] == 4.0
    for _ in range(2):
        optimizer.step()
        cosine.step()
    assert second["lr"] == pytest.approx(4 * first["lr"]) and first["lr"] < 1.0


def test_resume_restores_the_split_optimizer_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def config():
        return LoraConfig(**QV, loraplus_lr_ratio=16)

    torch.manual_seed(0)
    straight = CausalLM()
    trainer(callbacks=[PeftCallback(config())], max_steps=6).fit(straight, loader(n=12))
    torch.manual_seed(0)
    first = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(callbacks=[PeftCallback(config()), ckpt], enable_checkpointing=True, max_steps=3).fit(first, loader(n=12))
    torch.manual_seed(0)
    second = CausalLM()
    trainer(callbacks=[PeftCallback(config())], max_steps=6).fit(second, loader(n=12),
                                                                 ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert len(second.trainer.optimizers[0].param_groups) == 2
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(straight.losses[3:]), rtol=1e-6, atol=1e-6)
