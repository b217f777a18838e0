"""FSDP: PeftFSDPStrategy shards the frozen base over two CPU processes (gloo) and keeps the adapter whole and
identical on both, trained as one process would on the two ranks' batches together, for every method and on a 4-bit
base stored in bfloat16; rank 0 writes full adapters (HF PEFT loads them) and adapter-only checkpoints that resume.
What cannot work under FSDP (Lightning's FSDPStrategy under PeftCallback, a module sharded before, merging,
generating, an 8-bit base) is refused before training, with the fix."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import peft
import pytest
import torch
import transformers
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel

from conftest import METHODS, QUANTIZABLE, batch, make_model
from lightning_helpers import (
    CausalLM,
    PretrainedCausalLM,
    check_every_other_method,
    check_ranks_against_one_process,
    loader,
    rank_records,
    run_two_processes,
    trainer,
)
from lightning_peft import (
    CausalLMModule,
    ConfigError,
    LoraConfig,
    MergeCallback,
    PeftCallback,
    PeftFSDPStrategy,
    PeftStrategy,
    QuantizationConfig,
    load_adapter,
    save_adapter,
)
from lightning_peft.quantization import is_quantized, quantize_model, skip_paths
from tiny_assets import save_tiny_causal_lm, tiny_tokenizer

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
           bnb_4bit_quant_storage="bfloat16")


def _check_run(run: Path, method: str, family: str, nf4: bool = False, tolerance: float = 1e-5
               ) -> dict[str, torch.Tensor]:
    module = CausalLM(family=family, sizes=QUANTIZABLE if nf4 else None)
    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4), gradient_checkpointing=True) if nf4 else "auto"
    saved = check_ranks_against_one_process(run, module, [PeftCallback(METHODS[method]["make"](family))], tolerance,
                                            strategy=strategy, precision="bf16-true" if nf4 else "32-true")
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    held = [record["held"] for record in rank_records(run)]
    assert sum(held) == frozen and max(held) < 0.6 * frozen  # the base is split between the ranks
    return saved


@pytest.mark.slow
def test_lora_shards_the_base_keeps_the_adapter_whole_and_resumes(tmp_path):
    run_two_processes("fsdp", tmp_path / "a", 8)
    run = tmp_path / "a" / "lora-llama"
    saved = _check_run(run, "lora", "llama")
    assert len(saved) == 8
    ours = load_adapter(make_model("llama"), run / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), run / "adapter").eval()
    torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, rtol=1e-5, atol=1e-6)

    ckpts = sorted((run / "ckpt").iterdir())
    assert [p.name for p in ckpts] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    checkpoint = torch.load(ckpts[0], weights_only=True)
    assert len(checkpoint["state_dict"]) == 8 and all(".lora_" in k and "_fsdp" not in k
                                                      for k in checkpoint["state_dict"])
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["params"] == list(range(8))  # one device's format

    # End of epoch 0 (same data order), the model built in configure_model this time.
    run_two_processes("fsdp", tmp_path / "b", 8, "--ckpt", str(ckpts[0]), "--configure-model")
    resumed = load_file(tmp_path / "b" / "lora-llama" / "rank0.safetensors")
    for key in resumed:
        torch.testing.assert_close(resumed[key], saved[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_every_method_trains_under_fsdp(tmp_path):
    check_every_other_method("fsdp", tmp_path, _check_run)


@pytest.mark.slow
def test_lora_on_a_4bit_base_stored_in_bfloat16_with_gradient_checkpointing(tmp_path):
    run_two_processes("fsdp", tmp_path, 4, "--nf4")
    saved = _check_run(tmp_path / "lora-llama", "lora", "llama", nf4=True, tolerance=1e-2)  # bfloat16 sums
    assert all(t.dtype == torch.float32 for t in saved.values())  # the adapter stays float32 under bf16-true
    base = make_model("llama", **QUANTIZABLE)
    quantize_model(base, QuantizationConfig(**NF4), "cpu", skip_paths(base, QuantizationConfig(**NF4)))
    load_adapter(base, tmp_path / "lora-llama" / "adapter")


@pytest.mark.slow
def test_rank_zero_alone_reads_and_quantizes_the_base_the_other_rank_receives_its_shard(tmp_path):
    """The built-in module streams its base in under FSDP: rank 0 reads each tensor of the checkpoint once and
    quantizes it; rank 1 reads nothing and holds no frozen value before the wrap, then its half of the base, sent
    unit by unit from rank 0. The adapter trained is the one a single process trains on both ranks' batches."""
    pretrained = tmp_path / "base"
    make_model("llama", **QUANTIZABLE).to(torch.bfloat16).save_pretrained(pretrained)
    tiny_tokenizer().save_pretrained(pretrained)
    run_two_processes("fsdp", tmp_path, 4, "--nf4", "--pretrained", str(pretrained))
    run = tmp_path / "lora-llama"
    module = PretrainedCausalLM(str(pretrained))
    check_ranks_against_one_process(run, module, [PeftCallback(METHODS["lora"]["make"]("llama"))], 1e-2,
                                    strategy=PeftStrategy(quantization=QuantizationConfig(**NF4),
                                                          gradient_checkpointing=True), precision="bf16-true")
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    reads = [json.loads((run / f"reads{r}.json").read_text()) for r in (0, 1)]
    assert reads[0] == {"tensors_read": len(load_file(pretrained / "model.safetensors")), "held_before_wrap": frozen}
    assert reads[1] == {"tensors_read": 0, "held_before_wrap": 0}
    held = [record["held"] for record in rank_records(run)]
    assert sum(held) == frozen and max(held) < 0.6 * frozen
    assert [record["linear4bit"] for record in rank_records(run)] == [14, 14]


def test_lightning_fsdp_strategy_is_refused_with_the_fix():
    class Plain(FSDPStrategy):  # Lightning refuses FSDPStrategy itself on CPU before our callback would
        pass

    with pytest.raises(ConfigError, match="peft_fsdp"):
        PeftCallback(LoraConfig(r=4, target_modules=["q_proj"])).setup(trainer(strategy=Plain()), CausalLM(), "fit")


class WrapsItself(CausalLM):
    def configure_model(self):
        if self.model is None:
            super().configure_model()
            layers = self.model.model.layers
            layers[0] = FullyShardedDataParallel(layers[0], device_id=torch.device("cpu"))


@contextlib.contextmanager
def _fits_in_this_process() -> Iterator[None]:
    """Leave no process group and no launcher variables (LOCAL_RANK...) behind for the tests that follow."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def test_a_module_sharded_before_is_refused():
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    with _fits_in_this_process():
        module = CausalLM()
        trainer(strategy=PeftFSDPStrategy(), callbacks=[PeftCallback(lora)]).fit(module, loader(n=4))
        with pytest.raises(ConfigError, match="sharded by FSDP before"):  # each rank holds only its shard
            trainer(strategy=PeftFSDPStrategy(), callbacks=[PeftCallback(lora)]).fit(module, loader(n=4))
        with pytest.raises(ConfigError, match="before the adapter went in"):
            trainer(strategy=PeftFSDPStrategy(), callbacks=[PeftCallback(lora)]).fit(
                WrapsItself(in_init=False), loader(n=4))


def test_merging_and_generating_under_fsdp_are_refused_before_training(tmp_path):
    fsdp = trainer(strategy=PeftFSDPStrategy())
    with pytest.raises(ConfigError, match="MergeCallback cannot export under FSDP"):
        MergeCallback(tmp_path / "merged").setup(fsdp, CausalLM(), "fit")
    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "tiny")), generate_prompts=["Hello"])
    module.trainer = fsdp
    with pytest.raises(ConfigError, match="Generating under FSDP"):
        module.setup("fit")


def test_short_names_and_quantization_checks():
    assert {"peft_fsdp", "qlora_fsdp"} <= set(StrategyRegistry.available_strategies())
    strategy = trainer(strategy="qlora_fsdp", devices=2).strategy
    assert isinstance(strategy, PeftFSDPStrategy)
    assert strategy.quantization.bnb_4bit_quant_storage == "bfloat16"
    with pytest.raises(ConfigError, match="8-bit"):
        PeftFSDPStrategy(quantization=QuantizationConfig(load_in_8bit=True))
    with pytest.raises(ConfigError, match="state_dict_type"):
        PeftFSDPStrategy(state_dict_type="sharded")
    strategy = trainer(strategy=PeftFSDPStrategy(quantization=QuantizationConfig(**NF4))).strategy
    with pytest.raises(ConfigError, match="precision='bf16-true'"):  # the trainer's precision is 32-true
        strategy.prepare_model(CausalLM(sizes=QUANTIZABLE))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_fsdp_on_cuda(tmp_path):
    module = CausalLM(sizes=QUANTIZABLE, optimizer=None)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with _fits_in_this_process():
        trainer(accelerator="cuda", strategy="qlora_fsdp", precision="bf16-true",
                callbacks=[PeftCallback(lora, learning_rate=1e-2)]).fit(module, loader(n=8))
        weight = module.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert type(weight).__name__ == "Params4bit" and weight.device.type == "cuda"
        assert weight.dtype == torch.bfloat16 and module.losses[-1] < module.losses[0]
        save_adapter(module, tmp_path)
    base = make_model("llama", **QUANTIZABLE)
    quantize_model(base, QuantizationConfig(**NF4), "cpu", skip_paths(base, QuantizationConfig(**NF4)))
    load_adapter(base, tmp_path)


def test_built_in_module_streams_its_base_in_under_qlora_fsdp(tmp_path, monkeypatch):
    """Under a quantizing PeftFSDPStrategy, CausalLMModule creates its base on the meta device and each rank streams
    it in (quantizing each weight) before the wrap: from_pretrained never runs."""
    make_model("llama", **QUANTIZABLE).to(torch.bfloat16).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    module = CausalLMModule(str(tmp_path), dtype="bfloat16")
    ids = torch.randint(1, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", None)
    with _fits_in_this_process():
        trainer(strategy=PeftFSDPStrategy(quantization=QuantizationConfig(**NF4)), precision="bf16-true", max_steps=2,
                callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))]).fit(
            module, torch.utils.data.DataLoader(rows, batch_size=2))
    assert sum(is_quantized(m) for m in module.model.modules()) == 14
