"""AdaLoRA: config checks, the SVD-form layer, the budget schedule, the regulariser's gradient and the rank
allocation run by PeftCallback, exact resume, HF PEFT files pruned by rank_pattern, and a 4-bit base."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import QUANTIZABLE, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import AdaLoraConfig, ConfigError, PeftCallback, load_adapter, merge_adapter, save_adapter
from lightning_peft.methods.adalora import AdaLoraLayer, RankAllocator
from lightning_peft.surgery import active_config, adapter_layers, attach

QV = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(init_r=0), dict(target_r=16, init_r=8), dict(tinit=-1), dict(deltaT=0), dict(beta1=1.0),
     dict(orth_reg_weight=-0.1), dict(total_step=10, tinit=5, tfinal=5), dict(total_step=0), dict(bias="all")],
)
def test_bad_config_is_refused_at_construction(kwargs):
    with pytest.raises(ConfigError):
        AdaLoraConfig(**kwargs)


def test_forward_is_base_plus_scaled_svd_update():
    base = nn.Linear(6, 5)
    layer = AdaLoraLayer(base, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, init_lora_weights=False),
                         r=3)
    x = torch.randn(2, 4, 6)
    update = x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), base(x) + update * 6 / (3 + 1e-5))
    fresh = AdaLoraLayer(base, AdaLoraConfig(init_r=3, target_r=2), r=3)
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=0)  # E starts at zero: a no-op


def test_budget_follows_the_cubic_schedule(llama):
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, total_step=10, deltaT=2, target_modules=QV)
    attach(llama, config)
    allocator = RankAllocator(llama, active_config(llama))
    assert (allocator.initial_budget, allocator.target_budget) == (16, 8)
    # Between tinit and total_step - tfinal: 8 + 8 · (1 - (step - 2) / 6)³, pruned every deltaT steps.
    assert [allocator.budget(s) for s in (1, 2, 3, 4, 8, 9)] == [
        (16, False), (16, False), (12, False), (10, True), (8, True), (8, True)]


def test_targets_without_gradient_are_named_in_a_warning(llama):
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=2, deltaT=1, total_step=10, target_modules=QV,
                           init_lora_weights=False)
    attach(llama, config)
    allocator = RankAllocator(llama, active_config(llama))
    hidden = llama(**batch(), output_hidden_states=True).hidden_states
    hidden[1].square().sum().backward()  # after the first decoder layer: the second one gets no gradient
    with pytest.warns(UserWarning, match=r"2 of its 4 targets got no gradient.*model\.layers\.1\.self_attn\.q_proj"):
        allocator.after_optimizer_step(1)


def test_regulariser_gradient_is_added_once_per_step():
    def run(weight):
        torch.manual_seed(0)
        module = CausalLM(lr=0.0)  # nothing moves: the gradients left are those of the first batch
        config = AdaLoraConfig(init_r=4, target_r=2, tinit=5, total_step=10, orth_reg_weight=weight,
                               target_modules=QV, init_lora_weights=False)
        trainer(callbacks=[PeftCallback(config)], max_steps=1).fit(module, loader(n=4))
        return module

    module = run(0.5)
    model = module.model
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (ids,) = next(iter(loader(n=4)))
    layers = list(adapter_layers(model).values())
    penalty = 0.5 * sum(layer.orthogonality() for layer in layers) / (2 * len(layers))
    (model(input_ids=ids, labels=ids).loss + penalty).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)
    without = {n: p.grad for n, p in run(0.0).model.named_parameters() if p.requires_grad}
    assert not all(torch.allclose(without[n], grads[n]) for n in grads)


def test_fit_allocates_the_budget_and_hf_peft_loads_the_result(tmp_path):
    module = CausalLM(lr=1e-2)
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, target_modules=QV)  # total_step from Trainer
    trainer(callbacks=[PeftCallback(config)], max_steps=10).fit(module, loader(n=40))
    assert active_config(module.model).total_step == 10
    ranks = [int((layer.lora_E != 0).sum()) for layer in adapter_layers(module.model).values()]
    assert sum(ranks) == 2 * len(ranks)  # the target budget: target_r per layer on average
    module.model.eval()
    expected = module.model(**batch()).logits
    save_adapter(module.model, tmp_path)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    torch.testing.assert_close(theirs(**batch()).logits, expected, rtol=0, atol=1e-5)


def test_resume_continues_the_allocation_exactly(tmp_path):
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=12, target_modules=QV)

    def fit(max_steps, callbacks=(), **fit_kwargs):
        torch.manual_seed(0)
        module, peft_callback = CausalLM(lr=1e-2), PeftCallback(config)
        trainer(callbacks=[peft_callback, *callbacks], max_steps=max_steps, enable_checkpointing=bool(callbacks)).fit(
            module, loader(n=16), **fit_kwargs)
        return module, peft_callback._hooks

    straight, straight_allocator = fit(8)
    fit(4, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4)])
    path = tmp_path / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    assert all(".lora_" in key for key in saved["state_dict"])
    assert any(state.get("training_hooks") for state in saved["callbacks"].values())
    resumed, resumed_allocator = fit(8, ckpt_path=path)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[4:]), rtol=1e-6,
                               atol=1e-6)
    for a, b in zip(adapter_layers(resumed.model).values(), adapter_layers(straight.model).values()):
        torch.testing.assert_close(a.lora_E, b.lora_E, rtol=1e-6, atol=1e-7)
    # The importance averages went on from the checkpoint's, not from zero.
    assert straight_allocator.sensitivity.keys() == resumed_allocator.sensitivity.keys()
    for key, value in straight_allocator.sensitivity.items():
        torch.testing.assert_close(resumed_allocator.sensitivity[key], value, rtol=1e-5, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resumed_allocation_state_is_on_the_training_device(tmp_path):
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=12, target_modules=QV)
    trainer(accelerator="cuda", callbacks=[PeftCallback(config), ModelCheckpoint(dirpath=tmp_path, filename="run")],
            enable_checkpointing=True, max_steps=4).fit(CausalLM(), loader(n=16))
    callback = PeftCallback(config)
    trainer(accelerator="cuda", callbacks=[callback], max_steps=6).fit(CausalLM(), loader(n=16),
                                                                       ckpt_path=tmp_path / "run.ckpt")
    state = callback.state_dict()["training_hooks"]
    assert state["sensitivity"] and all(t.device.type == "cuda" for t in state["sensitivity"].values())


def test_hf_peft_file_pruned_by_rank_pattern_loads_at_the_kept_ranks(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_model("llama"), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=QV, init_lora_weights=False))
    pattern = {f"model.layers.{i}.self_attn.{m}.lora_E.default": [True, False, True, i == 0]
               for i in range(2) for m in QV}
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    ours = load_adapter(make_model("llama"), tmp_path)
    assert sorted(layer.lora_E.shape[0] for layer in adapter_layers(ours).values()) == [2, 2, 3, 3]
    torch.testing.assert_close(ours(**batch()).logits, reference(**batch()).logits, rtol=0, atol=1e-5)


def test_trains_and_merges_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization import QuantizationConfig, quantize_model

    model = make_model("llama", **QUANTIZABLE).train()
    assert quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "cpu",
                          skip={"lm_head"})
    attach(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV, init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()["input_ids"]
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    expected = model(**batch()).logits
    merged = merge_adapter(model)
    assert not adapter_layers(merged)
    torch.testing.assert_close(merged(**batch()).logits, expected, rtol=0, atol=1e-4)
