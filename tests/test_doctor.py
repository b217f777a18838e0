"""The doctor: each common PEFT mistake is found (and a correct setup is not flagged), by ``lightning-peft check`` on
a model built on the meta device, and at the start of ``fit`` by PeftCallback, before any step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psutil
import pytest
import torch
import transformers
import yaml

from conftest import make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import CausalLMModule, ChatDataModule, ConfigError, GaLoreConfig, LoraConfig, PeftCallback, QuantizationConfig
from lightning_peft import doctor
from lightning_peft.cli import main
from lightning_peft.doctor import Run
from lightning_peft.surgery import adapter_layers, attach
from tiny_assets import save_tiny_causal_lm, tiny_tokenizer


def adapted(family: str = "llama", **lora) -> torch.nn.Module:
    model = make_model(family)
    attach(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}))
    return model


def levels(findings: list[doctor.Finding]) -> list[str]:
    return [f.level for f in findings]


def write_chat(tmp_path: Path, n: int, answer: str = "AI is the study of machines .") -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "What is AI ?"},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for _ in range(n)))
    return str(path)


# --- targets ---------------------------------------------------------------------------------------------------------


def test_a_misspelt_target_among_matching_ones_is_an_error_naming_the_closest_name():
    config = LoraConfig(target_modules=["q_proj", "vproj"])
    model = make_model("llama")
    attach(model, config)  # adapts q_proj alone, silently
    (finding,) = doctor.target_findings(Run(model, config))
    assert finding.level == "error" and "'vproj'" in finding.what and "target_modules: [q_proj, v_proj]" in finding.fix
    assert doctor.target_findings(Run(adapted(), LoraConfig(target_modules=["q_proj", "v_proj"]))) == []


def test_llama_names_on_gpt2_suggest_gpt2_names():
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    findings = doctor.target_findings(Run(make_model("gpt2"), config))
    assert levels(findings) == ["error", "error"] and "LLaMA layer name" in findings[0].what
    assert "c_attn" in findings[0].fix
    assert doctor.target_findings(Run(make_model("gpt2"), LoraConfig(target_modules=["c_attn"]))) == []


def test_targets_in_only_some_blocks_are_flagged():
    regex = LoraConfig(target_modules=r".*layers\.0\.self_attn\.q_proj")
    model = make_model("llama")
    attach(model, regex)
    (finding,) = doctor.partial_block_findings(Run(model, regex))
    assert finding.level == "warning" and "1 of the 2 blocks" in finding.what
    assert doctor.partial_block_findings(Run(adapted(), LoraConfig())) == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "distilbert"])
def test_family_tables_select_attention_and_mlp_exactly(family):
    """Each table entry, used as target_modules, adapts every linear layer of its part of the block, and only those."""
    task = "seq_cls" if family in ("bert", "distilbert") else "causal"
    model = make_model(family, task)
    linear = {p for p, m in model.named_modules() if doctor._adaptable(m) and re.search(r"\.\d+\.", p)}
    attention = {p for p in linear if re.search(r"attn|attention", p)}
    for part, expected in (("attention", attention), ("mlp", linear - attention)):
        fresh = make_model(family, task)
        layers = attach(fresh, LoraConfig(target_modules=doctor.FAMILY_TARGETS[family][part]))
        assert set(layers) == expected, part


# --- sizes and hyper-parameters --------------------------------------------------------------------------------------


def meta_llama(vocab_size: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_trainable_share_too_low_or_too_high_warns():
    model = meta_llama(2000)
    attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert doctor.share_findings(Run(model, LoraConfig())) == []  # 0.27%
    big = meta_llama(60000)
    attach(big, LoraConfig(r=1, target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    assert "Only" in doctor.share_findings(Run(big, LoraConfig()))[0].what
    tiny = make_model("llama")
    attach(tiny, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert "close to a full fine-tune" in doctor.share_findings(Run(tiny, LoraConfig()))[0].why
    galore = make_model("llama")
    config = GaLoreConfig(target_modules="all-linear")  # training the weights in full is GaLore's point
    attach(galore, config)
    assert doctor.share_findings(Run(galore, config)) == []


@pytest.mark.parametrize(("lr", "expected"), [(1e-7, ["warning"]), (2e-4, []), (1e-2, ["warning"]), (1.0, ["error"])])
def test_learning_rate_outside_the_methods_range(lr, expected):
    assert levels(doctor.learning_rate_findings(Run(adapted(), LoraConfig(), learning_rate=lr))) == expected


def test_learning_rate_range_is_not_applied_to_sgd():
    assert doctor.learning_rate_findings(Run(adapted(), LoraConfig(), learning_rate=1.0, optimizer="SGD")) == []


def test_alpha_over_r_far_from_one_to_four_warns():
    (finding,) = doctor.alpha_findings(Run(adapted(), LoraConfig(r=64, lora_alpha=1)))
    assert finding.fix == "lora_alpha: 128"
    assert doctor.alpha_findings(Run(adapted(), LoraConfig(r=16, lora_alpha=32))) == []


def test_rank_above_the_layer_width_warns():
    (finding,) = doctor.rank_findings(Run(adapted(r=32), LoraConfig(r=32)))  # k_proj/v_proj are 16 wide
    assert "r=32" in finding.what and finding.fix == "r: 4"  # a quarter of the narrowest
    assert doctor.rank_findings(Run(adapted(), LoraConfig(r=4))) == []


def test_dropout_on_tiny_data_warns():
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 10
    assert levels(doctor.dropout_findings(Run(adapted(), LoraConfig(lora_dropout=0.1),
                                              conversations=conversations))) == ["warning"]
    assert doctor.dropout_findings(Run(adapted(), LoraConfig(), conversations=conversations)) == []


# --- tokenizer and data ----------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_is_an_error():
    tokenizer = tiny_tokenizer()
    assert doctor.tokenizer_findings(Run(adapted(), LoraConfig(), tokenizer=tokenizer)) == []
    tokenizer.pad_token = None
    assert levels(doctor.tokenizer_findings(Run(adapted(), LoraConfig(), tokenizer=tokenizer))) == ["error"]


def test_chat_data_without_chat_template_warns():
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    plain = Run(adapted(), LoraConfig(), tokenizer=tiny_tokenizer(chat_template=None), conversations=conversations)
    assert "no chat template" in doctor.chat_template_findings(plain)[0].what
    assert doctor.chat_template_findings(Run(adapted(), LoraConfig(), tokenizer=tiny_tokenizer(),
                                             conversations=conversations)) == []


def test_max_length_cutting_most_responses_is_an_error(tmp_path):
    path = write_chat(tmp_path, 8, answer=" ".join(["AI is the study of machines that think ."] * 6))
    tokenizer = tiny_tokenizer()
    for max_length, expected in ((16, ["error"]), (256, [])):
        data = ChatDataModule(path, max_length=max_length)
        run = Run(adapted(), LoraConfig(), tokenizer=tokenizer, datamodule=data, conversations=data.conversations()[0])
        findings = doctor.truncation_findings(run)
        assert levels(findings) == expected
    assert "data.init_args.max_length:" in doctor.truncation_findings(
        Run(adapted(), LoraConfig(), tokenizer=tokenizer, datamodule=ChatDataModule(path, max_length=16),
            conversations=ChatDataModule(path).conversations()[0]))[0].fix


def test_packing_on_a_family_that_cannot_keep_examples_apart_is_an_error(tmp_path):
    packed = ChatDataModule(write_chat(tmp_path, 4), packing=True)
    bert = make_model("bert")
    attach(bert, LoraConfig(target_modules=["query"]))
    assert levels(doctor.packing_findings(Run(bert, LoraConfig(), datamodule=packed))) == ["error"]
    assert doctor.packing_findings(Run(adapted(), LoraConfig(), datamodule=packed)) == []


def test_labels_copying_the_inputs_of_a_chat_model_warn():
    ids = torch.tensor([[2, 5, 6, 3]])
    assert levels(doctor.label_findings({"input_ids": ids, "labels": ids.clone()}, tiny_tokenizer())) == ["warning"]
    masked = torch.tensor([[-100, -100, 6, 3]])
    assert doctor.label_findings({"input_ids": ids, "labels": masked}, tiny_tokenizer()) == []
    assert doctor.label_findings({"input_ids": ids, "labels": ids.clone()}, tiny_tokenizer(chat_template=None)) == []


# --- base, optimizer, memory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reentrant", "input_grads", "expected"),
                         [(True, False, ["error"]), (True, True, []), (False, False, [])])
def test_reentrant_checkpointing_with_a_frozen_embedding_is_an_error(reentrant, input_grads, expected):
    model = adapted()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not input_grads:  # transformers turns them on with checkpointing; a later call (or older version) drops them
        model.disable_input_require_grads()
    assert levels(doctor.gradient_checkpointing_findings(Run(model, LoraConfig()))) == expected


@pytest.mark.parametrize("works", [False, True])
def test_4bit_base_on_a_cpu_that_cannot_quantize_some_rows_warns(monkeypatch, works):
    monkeypatch.setattr(doctor, "cpu_4bit_row_length_works", lambda *args: works)
    run = Run(adapted(), LoraConfig(), quantization=QuantizationConfig(load_in_4bit=True), device_type="cpu")
    assert levels(doctor.quantization_findings(run)) == ([] if works else ["warning"])
    run.device_type = "cuda"
    assert doctor.quantization_findings(run) == []


def test_frozen_tensors_in_the_optimizer_warn():
    model = adapted()
    everything = torch.optim.AdamW(model.parameters())
    assert levels(doctor.optimizer_findings(model, [everything])) == ["warning"]
    trainable = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert doctor.optimizer_findings(model, [trainable]) == []


def test_groups_fold_block_numbers():
    assert doctor.group_paths([f"model.layers.{i}.self_attn.q_proj" for i in (0, 1, 2, 5)] + ["lm_head"]) == [
        "model.layers.{0..2,5}.self_attn.q_proj", "lm_head"]


# --- at fit time -----------------------------------------------------------------------------------------------------


def test_a_model_wrapped_by_hf_peft_is_refused_before_training():
    import peft

    class Wrapped(CausalLM):
        def __init__(self):
            super().__init__()
            self.model = peft.get_peft_model(self.model, peft.LoraConfig(r=2, target_modules=["k_proj"]))

    with pytest.raises(ConfigError, match="already wrapped by HF PEFT"):
        trainer(callbacks=[PeftCallback(LoraConfig(target_modules=["q_proj"]))]).fit(Wrapped(), loader())
    assert doctor.wrapped_findings(make_model("llama")) == []


def test_a_builtin_module_without_peft_callback_is_refused(tmp_path):
    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "llama")))
    data = ChatDataModule(write_chat(tmp_path, 8), val_fraction=0.0, batch_size=4)
    fit = trainer(callbacks=[], max_steps=1, limit_val_batches=0)
    with pytest.raises(ConfigError, match=r"without PeftCallback.*--trainer.callbacks\+="):
        fit.fit(module, data)
    assert fit.global_step == 0 and module.model is None  # refused before the weights were loaded
    fit = trainer(callbacks=[PeftCallback(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))], max_steps=1,
                  limit_val_batches=0)
    fit.fit(module, data)
    assert fit.global_step == 1


@pytest.mark.parametrize("mistake", ["returns_none", "loss_times_zero"])
def test_a_first_step_that_reaches_no_adapter_stops_before_the_optimizer_steps(mistake):
    class Broken(CausalLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if mistake == "returns_none" else loss * 0

    module = Broken(optimizer=None)
    fit = trainer(callbacks=[PeftCallback(LoraConfig(target_modules=["q_proj"]))])
    with pytest.raises(ConfigError, match="no backward pass" if mistake == "returns_none" else "non-zero gradient"):
        fit.fit(module, loader())
    assert fit.global_step == 0
    assert all(not p.detach().any() for layer in adapter_layers(module.model).values() for p in [layer.lora_B])


def test_an_error_finding_stops_fit_before_any_step_and_warnings_are_logged():
    fit = trainer(callbacks=[PeftCallback(LoraConfig(target_modules=["q_proj", "vproj"]))])
    with pytest.raises(ConfigError, match="'vproj'"):
        fit.fit(CausalLM(), loader())
    assert fit.global_step == 0
    with pytest.warns(UserWarning, match="lora_alpha / r"):
        trainer(callbacks=[PeftCallback(LoraConfig(r=16, lora_alpha=1, target_modules=["q_proj"]))],
                max_steps=1).fit(CausalLM(), loader())


# --- the commands ----------------------------------------------------------------------------------------------------


def run_config(tmp_path: Path, model_dir: Path, targets: list[str], r: int = 4) -> Path:
    content = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False, "callbacks": [
            {"class_path": "lightning_peft.PeftCallback",
             "init_args": {"adapter": {"class_path": "lightning_peft.LoraConfig",
                                       "init_args": {"r": r, "lora_alpha": 2 * r, "target_modules": targets}}}}]},
        "model": {"class_path": "lightning_peft.CausalLMModule",
                  "init_args": {"model_name_or_path": str(model_dir), "dtype": "bfloat16"}},
        "data": {"class_path": "lightning_peft.ChatDataModule",
                 "init_args": {"train_file": write_chat(tmp_path, 300), "batch_size": 4, "max_length": 64}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_check_prints_groups_counts_sizes_and_memory(tmp_path, capsys):
    path = run_config(tmp_path, save_tiny_causal_lm(tmp_path / "llama"), ["q_proj", "v_proj"])
    main(["check", "--config", str(path)])
    out = capsys.readouterr().out
    assert "model.layers.{0..1}.self_attn.q_proj  LoRA r=4" in out
    assert "trainable parameters: 896 of 22,304" in out  # 2 layers × (4·(32+32) + 4·(32+16))
    assert "adapter file:         3.5 KiB" in out and "resumable checkpoint: 10.5 KiB" in out
    assert "activations (256 tokens a step)" in out and "findings: 0 errors, 0 warnings" in out


def test_check_exits_1_on_an_error_and_names_the_fix(tmp_path, capsys):
    path = run_config(tmp_path, save_tiny_causal_lm(tmp_path / "llama"), ["q_proj", "vproj"])
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(path)])
    assert exit_info.value.code == 1
    assert "fix: target_modules: [q_proj, v_proj]" in capsys.readouterr().out


def test_check_sizes_a_70b_config_without_memory(tmp_path, capsys):
    directory = tmp_path / "llama-70b"
    tokenizer = tiny_tokenizer()
    transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                             num_key_value_heads=8, vocab_size=128256).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    rss = psutil.Process().memory_info().rss
    main(["check", "--config", str(run_config(tmp_path, directory, ["q_proj", "v_proj"], r=16))])
    assert psutil.Process().memory_info().rss - rss < 2**30  # the bfloat16 weights alone are 131 GiB
    out = capsys.readouterr().out
    assert "model.layers.{0..79}.self_attn.q_proj  LoRA r=16" in out
    assert "of 70,586,474,496" in out and "base weights:                        131.4 GiB" in out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_modules_lists_layers_and_target_values(tmp_path, capsys, family):
    make_model(family).save_pretrained(tmp_path / family)
    targets = main(["modules", str(tmp_path / family)])
    out = capsys.readouterr().out
    assert targets is None and "target_modules:" in out
    row = r"model\.layers\.\{0\.\.1\}\.self_attn\.q_proj +Linear" if family == "llama" else (
        r"transformer\.h\.\{0\.\.1\}\.attn\.c_attn +Conv1D")
    assert re.search(row, out)
    assert ("[c_attn, attn.c_proj]" if family == "gpt2" else "[gate_proj, up_proj, down_proj]") in out


def test_unknown_family_targets_are_read_from_the_first_block():
    model = make_model("llama")
    model.config.model_type = "somethingnew"
    targets = doctor.family_targets(model)
    assert targets["attention"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert targets["mlp"] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_memory_estimate_counts_quantized_layers_at_4_bits_and_the_head_in_full():
    model = meta_llama(2000)
    attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    full = doctor.memory_estimate(model, None, torch.bfloat16, 100, False)
    quantized = doctor.memory_estimate(model, QuantizationConfig(load_in_4bit=True), torch.bfloat16, 100, False)
    blocks = sum(m.weight.numel() for p, m in model.named_modules() if type(m) is torch.nn.Linear and ".layers." in p)
    assert full["base weights"] - quantized["base weights"] == blocks * (2 - doctor._BYTES_4BIT)
    assert full["AdamW moments"] == 8 * 896 and full["activations (100 tokens a step)"] == 100 * full[
        "activations per token"]


def test_check_without_peft_callback_is_refused_in_one_line(tmp_path, capsys):
    path = run_config(tmp_path, save_tiny_causal_lm(tmp_path / "llama"), ["q_proj"])
    content = yaml.safe_load(path.read_text())
    content["trainer"]["callbacks"] = []
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(path)])
    assert exit_info.value.code == 2 and "no lightning_peft.PeftCallback" in capsys.readouterr().err


def test_meta_model_of_a_classifier_has_its_labels_and_no_weights(tmp_path):
    from lightning_peft import SequenceClassificationModule
    from tiny_assets import save_tiny_encoder

    model = SequenceClassificationModule(str(save_tiny_encoder(tmp_path / "bert")), num_labels=3).meta_model()
    assert model.classifier.out_features == 3 and {p.device.type for p in model.parameters()} == {"meta"}
