"""DDP on CPU: two processes over gloo keep identical adapters, trained as one process would on the two ranks' batches
together, for every method and on a 4-bit base (PeftDDPStrategy); rank 0 writes full adapters and adapter-only
checkpoints, which resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import METHODS, QUANTIZABLE, make_model
from lightning_helpers import (
    CausalLM,
    check_every_other_method,
    check_ranks_against_one_process,
    rank_records,
    run_two_processes,
)
from lightning_peft import PeftCallback, PeftStrategy, QuantizationConfig, load_adapter
from lightning_peft.quantization import quantize_model, skip_paths

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="bfloat16")


def _check_run(run: Path, method: str, family: str, nf4: bool = False, tolerance: float = 1e-5
               ) -> dict[str, torch.Tensor]:
    module = CausalLM(family=family, sizes=QUANTIZABLE if nf4 else None)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4)) if nf4 else "auto"
    return check_ranks_against_one_process(run, module, [PeftCallback(METHODS[method]["make"](family))], tolerance,
                                           strategy=strategy)


def _adapter_only_checkpoints(run: Path, count: int) -> list[Path]:
    ckpts = sorted((run / "ckpt").iterdir())
    assert [p.name for p in ckpts] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    state = torch.load(ckpts[0], weights_only=True)["state_dict"]
    assert len(state) == count and all(".lora_" in k and t.is_floating_point() for k, t in state.items())
    return ckpts


@pytest.mark.slow
def test_ddp_trains_identical_adapters_and_resumes(tmp_path):
    run_two_processes("ddp", tmp_path / "a", 8)
    run = tmp_path / "a" / "lora-llama"
    saved = _check_run(run, "lora", "llama")
    assert len(saved) == 8
    load_adapter(make_model("llama"), run / "adapter")
    ckpts = _adapter_only_checkpoints(run, 8)

    run_two_processes("ddp", tmp_path / "b", 8, "--ckpt", str(ckpts[0]))  # end of epoch 0: same data order
    resumed = load_file(tmp_path / "b" / "lora-llama" / "rank0.safetensors")
    for key in resumed:
        torch.testing.assert_close(resumed[key], saved[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_method_trains_under_ddp(tmp_path):
    check_every_other_method("ddp", tmp_path, _check_run)


@pytest.mark.slow
def test_lora_on_a_4bit_base_under_peft_ddp_strategy_resumes(tmp_path):
    run_two_processes("ddp", tmp_path, 8, "--nf4", "--resume")
    run = tmp_path / "lora-llama"
    assert [record["linear4bit"] for record in rank_records(run)] == [14, 14]  # all but lm_head
    saved = _check_run(run, "lora", "llama", nf4=True, tolerance=2e-3)  # bfloat16 compute
    assert len(saved) == 8
    _adapter_only_checkpoints(run, 8)
    resumed = load_file(run / "resumed" / "rank0.safetensors")  # from epoch=0-step=4.ckpt, in the same processes
    assert resumed.keys() == saved.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], saved[key], rtol=1e-5, atol=1e-6)
    base = make_model("llama", **QUANTIZABLE)
    quantize_model(base, QuantizationConfig(**NF4), "cpu", skip_paths(base, QuantizationConfig(**NF4)))
    load_adapter(base, run / "adapter")
