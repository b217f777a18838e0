"""Every config in examples/ runs for two steps as it stands, on tiny stand-ins for its model (a command-line
override of the model path), plus the Python example of using an adapter downstream."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import launcher_free_env
from lightning_peft.cli import main
from tiny_assets import save_tiny_causal_lm, save_tiny_encoder, save_tiny_seq2seq

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"lightning_peft.CausalLMModule": save_tiny_causal_lm(root / "llama"),
            "lightning_peft.SequenceClassificationModule": save_tiny_encoder(root / "bert"),
            "lightning_peft.Seq2SeqLMModule": save_tiny_seq2seq(root / "t5")}


def overrides(config: dict, tiny: dict[str, Path]) -> list[str]:
    """Two optimizer steps, one validation batch, few examples, and the tiny model in place of the real one."""
    model = config["model"]
    args = [f"--model.init_args.model_name_or_path={tiny[model['class_path']]}",
            "--trainer.limit_train_batches=2", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=1.0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", "--data.init_args.max_train_examples=16",
            "--data.init_args.max_val_examples=4"]
    if "gguf_file" in model.get("init_args", {}):
        args.append("--model.init_args.gguf_file=null")
    if model.get("init_args", {}).get("random_weights"):  # the tiny model's saved weights are loaded instead
        args.append("--model.init_args.random_weights=false")
    if "generate_prompts" in model.get("init_args", {}):
        args.append("--model.init_args.max_new_tokens=2")
    return args


def in_workdir(tmp_path: Path) -> None:
    """Run from a scratch folder holding a link to examples/, so the configs' relative paths resolve there."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    os.chdir(tmp_path)


def test_there_is_a_config_per_task_method_and_strategy():
    names = {path.stem for path in CONFIGS}
    assert {"smollm2_lora", "smollm2_qlora", "smollm2_dora", "smollm2_ia3", "smollm2_prompt_tuning",
            "smollm2_prefix_tuning", "smollm2_bottleneck", "smollm2_galore", "smollm2_lora_ddp",
            "minilm_sentiment_lora", "seq2seq_lora"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if "ddp" not in p.stem], ids=lambda p: p.stem)
def test_config_runs_two_steps(path, tiny, tmp_path, monkeypatch):
    config = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    in_workdir(tmp_path)
    main(["fit", "--config", str(path), *overrides(config, tiny)])
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "val_loss" in metrics[0].read_text()
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"] == "lightning_peft.SaveAdapterCallback":  # into the run's own log directory
            written = metrics[0].parent / "adapter" / "adapter_config.json"
            assert json.loads(written.read_text())["peft_type"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if "ddp" in p.stem], ids=lambda p: p.stem)
def test_ddp_config_runs_two_steps_in_two_processes(path, tiny, tmp_path):
    config = yaml.safe_load(path.read_text())
    in_workdir(tmp_path)
    result = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "fit", "--config", str(path),
                             *overrides(config, tiny)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=launcher_free_env())  # an in-process FSDP/DDP test may have left its rank variables
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "val_loss" in metrics[0].read_text()
    names = {c["class_path"] for c in config["trainer"]["callbacks"]}
    if "lightning_peft.MergeCallback" in names:  # rank 0 merged while the other rank waited
        assert (metrics[0].parent / "merged" / "model.safetensors").is_file()


def test_downstream_example_answers_with_an_adapter_checkpoint(tiny, tmp_path, monkeypatch):
    base = tiny["lightning_peft.CausalLMModule"]
    config = yaml.safe_load((EXAMPLES / "smollm2_lora.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    in_workdir(tmp_path)
    main(["fit", "--config", str(EXAMPLES / "smollm2_lora.yaml"), *overrides(config, tiny)])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    spec = importlib.util.spec_from_file_location("downstream", EXAMPLES / "load_adapter_downstream.py")
    downstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(downstream)
    answers = downstream.main([str(checkpoint), "--base", str(base), "--prompt", "What is AI ?",
                               "--prompt", "Hello", "--max_new_tokens", "3"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_seq2seq_example_runs_as_it_stands_on_the_random_t5_its_config_describes(tmp_path, monkeypatch):
    """No installed package ships an encoder-decoder: the example builds its T5 from examples/t5_tiny/config.json
    with random weights, offline, and writes the adapter (task SEQ_2_SEQ_LM) and the merged model."""
    path = EXAMPLES / "seq2seq_lora.yaml"
    config = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)
    in_workdir(tmp_path)
    args = [a for a in overrides(config, {"lightning_peft.Seq2SeqLMModule": ""}) if "model.init_args" not in a]
    main(["fit", "--config", str(path), *args])
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert "val_perplexity" in metrics.read_text()
    assert json.loads((metrics.parent / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    assert (metrics.parent / "merged" / "model.safetensors").is_file()
