"""Gradient accumulation in the built-in modules: an optimizer step over micro-batches, on one process or several,
is the step one batch of them all takes, the mean over every labelled token, however unevenly the labels fall."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import batch, launcher_free_env
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_peft import AdaLoraConfig, CausalLMModule, LoraConfig, PeftCallback
from lightning_peft.accumulation import TokenWeightedSteps

PROMPTS = (5, 10, 3, 9)  # micro-batches of 2 rows of 12: 14, 4, 18 and 6 labelled targets
SCRIPT = Path(__file__).parent / "scripts" / "token_weighted_ranks.py"


class SGDCausalLM(CausalLMModule):
    """Plain SGD at rate 1: the adapter moves by exactly minus the step's gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


def lora() -> LoraConfig:
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def labelled_batches(vocab: int, prompts: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed, prompt in enumerate(prompts, 1):
        data = batch(2, 12, seed)
        data["input_ids"] %= vocab
        labels = data["input_ids"].clone()
        labels[:, :prompt] = -100
        batches.append({**data, "labels": labels})
    return batches


def concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


class StartFrom(L.Callback):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def on_train_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                if parameter.requires_grad:
                    parameter.copy_(self.tensors[name])


def one_step(path: str, batches: list[dict], accumulate: int, start: dict | None = None,
             adapter=None) -> dict[str, torch.Tensor]:
    """The trained tensors after one optimizer step over ``batches``."""
    L.seed_everything(0, verbose=False)
    module = SGDCausalLM(path)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PeftCallback(adapter or lora()), *([StartFrom(start)] if start else [])])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    logged = {key: value for key, value in trainer.callback_metrics.items() if key == "train_loss"}
    return {**logged, **{name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_assets import save_tiny_causal_lm

    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama"))


def test_accumulated_micro_batches_take_the_step_of_one_batch(tiny, monkeypatch):
    first, second = labelled_batches(len(CausalLMModule(tiny).tokenizer), PROMPTS[:2])
    expected = one_step(tiny, [concatenated([first, second])], accumulate=1)
    accumulated = one_step(tiny, [first, second], accumulate=2)
    assert "train_loss" in expected  # logged: the step's loss, the mean over all its tokens
    for name, tensor in expected.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-6, rtol=1e-5, msg=name)

    # Lightning's own averaging weighs the two micro-batches alike: visibly another step.
    monkeypatch.setattr(TokenWeightedSteps, "weigh", lambda self, loss, tokens, strategy: loss)
    averaged = one_step(tiny, [first, second], accumulate=2)
    assert any(not torch.allclose(averaged[name], tensor, atol=1e-4) for name, tensor in expected.items()
               if name in averaged)


def test_a_per_step_regulariser_is_added_once_and_not_reweighted(tiny):
    """AdaLoRA adds its orthogonality penalty's gradient before the optimizer steps: it belongs to the step, not
    to the tokens, so the token weighting must be done before it is added."""
    adapter = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False, orth_reg_weight=0.5)
    first, second = labelled_batches(len(CausalLMModule(tiny).tokenizer), PROMPTS[:2])
    expected = one_step(tiny, [concatenated([first, second])], accumulate=1, adapter=adapter)
    accumulated = one_step(tiny, [first, second], accumulate=2, adapter=adapter)
    for name, tensor in expected.items():
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "peft_fsdp"])
def test_across_ranks_the_step_is_the_mean_over_every_ranks_tokens(tiny, tmp_path, strategy):
    """Under PeftFSDPStrategy the base is sharded and the head is an FSDP unit of its own, which causal_lm_loss
    calls as the module it is."""
    result = subprocess.run([sys.executable, str(SCRIPT), tiny, str(tmp_path), strategy], capture_output=True,
                            text=True, timeout=300, env=launcher_free_env())
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # Rank 0 held micro-batches 0 and 2 (32 labelled targets), rank 1 micro-batches 1 and 3 (10); each rank logged
    # the loss of the whole step, over all 42.
    batches = labelled_batches(len(CausalLMModule(tiny).tokenizer), PROMPTS)
    expected = one_step(tiny, [concatenated(batches)], accumulate=1, start=load_file(tmp_path / "initial.safetensors"))
    for name, tensor in ranks[0].items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_one_batch_per_step_is_left_as_it_is():
    weights = TokenWeightedSteps()
    strategy = L.Trainer(logger=False).strategy
    loss = torch.tensor(2.5, requires_grad=True)
    assert weights.weigh(loss, torch.tensor(7), strategy).item() == 2.5
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 0.5)
    weights.rescale([parameter], strategy, accumulate=1)
    assert parameter.grad.tolist() == [0.5, 0.5, 0.5]
