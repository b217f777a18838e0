"""Checkpoint files under PeftCallback hold the adapter and nothing more, however Lightning writes them."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import LoraConfig, PeftCallback

# r=64: the adapter (115 kB) outweighs the few kB of loop state and records, so the size bounds are tight.
LORA = dict(r=64, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
SLACK = 40 * 1024


def _adapter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def test_weights_only_checkpoint_holds_the_adapter_only(tmp_path):
    module = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ckpt], enable_checkpointing=True, max_steps=2).fit(
        module, loader())
    path = tmp_path / "weights.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    assert sorted(state) == sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert os.path.getsize(path) < _adapter_bytes(module) + SLACK


def test_resumable_checkpoint_is_adapter_plus_adam_moments(tmp_path):
    module = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ModelCheckpoint(dirpath=tmp_path, filename="full")],
            enable_checkpointing=True, max_steps=2).fit(module, loader())
    # Adapter plus AdamW's two moments, plus the loop state: the adapter's bytes are stored raw, not as text.
    assert os.path.getsize(tmp_path / "full.ckpt") < 3 * _adapter_bytes(module) + SLACK
