"""GaLore: the targeted weights train in full under AdamW in a low-rank projection of their gradients; the rest of
the pipeline (checkpoints, exact resume, export, save/load of the trained weights) works as for an adapter.

GaLore is not in conftest.METHODS: the shared checks exercise adapter layers (their forward, merge, HF PEFT
interop), and GaLore has none; what it changes is the optimizer, checked here."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import make_model
from lightning_helpers import CausalLM, check_ranks_against_one_process, loader, run_two_processes, trainer
from lightning_peft import (
    ConfigError,
    GaLoreConfig,
    MergeCallback,
    PeftCallback,
    PeftStrategy,
    QuantizationConfig,
    load_adapter,
    save_adapter,
)
from lightning_peft.methods.galore import GaLoreAdamW
from lightning_peft.surgery import attach

TARGETS = ["q_proj", "v_proj", "up_proj"]  # square, wide (32 -> 16 under GQA) and tall (32 -> 64) weights


def galore(**kwargs) -> GaLoreConfig:
    return GaLoreConfig(**{"target_modules": TARGETS, "rank": 4, "update_proj_gap": 2, "scale": 0.5, **kwargs})


def reference_adamw_in_projection(weight, grads, rank, gap, scale, lr, eps=1e-8, betas=(0.9, 0.999)):
    """GaLore written out: SVD of the gradient every ``gap`` steps, Adam on the projected gradient, update projected
    back and scaled."""
    w, m, v = weight.clone(), None, None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank] if g.shape[0] >= g.shape[1] else u[:, :rank]
        r = g @ p.T if g.shape[0] >= g.shape[1] else p.T @ g
        m = (1 - betas[0]) * r if m is None else betas[0] * m + (1 - betas[0]) * r
        v = (1 - betas[1]) * r * r if v is None else betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        w = w - lr * scale * (n @ p if g.shape[0] >= g.shape[1] else p @ n)
    return w


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
def test_steps_and_projection_refresh_match_the_algorithm_written_out(shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    grads = [torch.randn(shape) for _ in range(3)]  # steps 1 and 3 compute a projection (gap 2), step 2 reuses it
    expected = reference_adamw_in_projection(weight.detach(), grads, rank=3, gap=2, scale=0.5, lr=0.1)
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3}], lr=0.1, update_proj_gap=2, scale=0.5)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    state = optimizer.state[weight]
    assert state["exp_avg"].shape == ((12, 3) if shape == (12, 8) else (3, 12))  # moments in the low-rank space
    assert state["projection"].shape == ((3, 8) if shape == (12, 8) else (8, 3))


def test_only_the_targeted_weights_train():
    model = make_model("llama")
    attach(model, galore())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{kind}.{t}.weight" for i in range(2)
                         for kind, t in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "up_proj")]}


def test_all_linear_trains_every_projection_but_the_output_head():
    model = make_model("llama")
    attach(model, galore(target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert trainable == linear - {"lm_head.weight"} and len(trainable) == 14


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"), (dict(scale=-1.0), "scale"),
    (dict(target_modules=None), "target_modules"), (dict(optim="sgd"), "optim"), (dict(proj_type="left"), "proj_type"),
])
def test_bad_config_is_refused(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        galore(**kwargs)


def _fit(steps, callbacks=(), ckpt_path=None, optim_on_callback=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = CausalLM(optimizer=None)
    peft = PeftCallback(galore(), learning_rate=1e-2, optim=optim_on_callback)
    trainer(callbacks=[peft, *callbacks], max_steps=steps,
            **trainer_kwargs).fit(module, loader(n=16), ckpt_path=ckpt_path)
    return module


def test_fit_trains_the_targets_with_galore_and_leaves_the_rest_bit_identical():
    before = make_model("llama").state_dict()  # CausalLM's model, same seed
    module = _fit(4)
    (optimizer,) = module.trainer.optimizers
    assert isinstance(optimizer, GaLoreAdamW)
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {n for n, p in module.model.named_parameters() if p.requires_grad} and len(changed) == 6


def test_checkpoint_holds_the_trained_weights_and_projected_state_and_resume_is_exact(tmp_path):
    straight = _fit(8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _fit(4, [ckpt], enable_checkpointing=True)
    raw = torch.load(tmp_path / "epoch=0-step=4.ckpt", weights_only=True)  # plain tensors, nothing pickled
    assert len(raw["state_dict"]) == 6 and all(k.endswith("_proj.weight") for k in raw["state_dict"])
    assert raw["peft"]["adapter_config"]["peft_type"] == "GALORE"
    states = raw["optimizer_states"][0]["state"].values()
    assert len(states) == 6 and all("projection" in s for s in states)
    assert all(s["exp_avg"].numel() < 32 * 32 for s in states)  # rank 4: never a full-size moment
    resumed = _fit(8, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_ranks_train_the_weights_one_process_trains_on_their_batches_together(tmp_path):
    run_two_processes("ddp", tmp_path, 4, "galore:llama")
    run = tmp_path / "galore-llama"
    saved = check_ranks_against_one_process(run, CausalLM(optimizer=None), [PeftCallback(galore())])
    assert len(saved) == 6 and all(k.endswith("_proj.weight") for k in saved)
    initial = make_model("llama").state_dict()
    assert all(not torch.equal(saved[k], initial[k.removeprefix("base_model.model.")]) for k in saved)


def test_a_module_with_its_own_optimizer_is_refused_with_how_to_choose_it():
    module = CausalLM()  # configure_optimizers returns AdamW
    with pytest.raises(ConfigError, match=r"GaLoreConfig trains with its own optimizer.*Return None"):
        trainer(callbacks=[PeftCallback(galore())], max_steps=1).fit(module, loader(n=4))
    assert module.trainer.global_step == 0


def test_an_optim_on_the_callback_is_refused_as_galore_chooses_its_own():
    with pytest.raises(ConfigError, match=r"optim='adamw_torch'.*GaLoreConfig\(optim=...\)"):
        _fit(1, optim_on_callback="adamw_torch")


def test_merge_callback_exports_the_trained_model(tmp_path):
    module = _fit(2, [MergeCallback(tmp_path / "merged")])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(exported, "galore")
    trained = {k: v for k, v in module.model.state_dict().items()}
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_save_adapter_writes_the_trained_weights_and_load_adapter_puts_them_back(tmp_path):
    module = _fit(2)
    save_adapter(module.model, tmp_path / "weights")
    restored = load_adapter(make_model("llama"), tmp_path / "weights")
    trained = module.model.state_dict()
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_a_quantized_base_is_refused_before_quantizing():
    module = CausalLM(optimizer=None)
    strategy = PeftStrategy(quantization=QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(ConfigError, match="trains the base weights themselves"):
        trainer(strategy=strategy, callbacks=[PeftCallback(galore())], max_steps=1).fit(module, loader(n=4))
    assert all(type(p) is torch.nn.Parameter for p in module.model.parameters())


def test_causal_lm_module_builds_galore_under_its_schedule(tmp_path):
    from torch.utils.data import DataLoader

    from lightning_peft import CausalLMModule
    from tiny_assets import save_tiny_causal_lm

    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "llama")), warmup_steps=1)
    vocab = module.tokenizer.vocab_size
    ids = torch.randint(1, vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    trainer(callbacks=[PeftCallback(galore())], max_steps=2).fit(module, DataLoader(rows, batch_size=2))
    (optimizer,) = module.trainer.optimizers
    assert isinstance(optimizer, GaLoreAdamW) and len(optimizer.state) == 6
    assert module.trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer


def test_8bit_steps_are_bitsandbytes_adamw8bit_in_the_projection():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 40))  # 300 x 3 projected moments: two 8-bit blocks
    grads = [torch.randn(300, 40) for _ in range(3)]
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 3}], lr=0.1, update_proj_gap=2, scale=0.5, eight_bit=True)
    expected = weight.detach().clone()
    low = torch.nn.Parameter(torch.zeros(300, 3))  # bitsandbytes' own AdamW8bit on the projected gradients
    reference = bnb.optim.AdamW8bit([low], lr=1.0, weight_decay=0.0, eps=1e-8, min_8bit_size=0)
    for t, grad in enumerate(grads):
        if t % 2 == 0:
            proj = torch.linalg.svd(grad, full_matrices=False)[2][:3]
        low.data.zero_()
        low.grad = grad @ proj.T
        reference.step()
        expected += 0.1 * 0.5 * (low.detach() @ proj)  # low holds minus the direction
        weight.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert optimizer.state[weight]["state1"].dtype == torch.uint8


def test_resume_keeps_float32_state_of_a_bfloat16_weight():
    weight = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    fresh = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1)
    fresh.load_state_dict(optimizer.state_dict())
    assert {k: v.dtype for k, v in fresh.state[weight].items() if k != "step"} == dict.fromkeys(
        ["projection", "exp_avg", "exp_avg_sq"], torch.float32)
