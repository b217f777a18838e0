"""The ``lightning-peft`` command on tiny models: fit/validate/test/predict, typo keys, --print_config round
trip, merge, generate, report and export-adapter, errors in one line, help as plain text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_peft import CausalLMModule, ConfigError, load_adapter
from lightning_peft.cli import main
from tiny_assets import save_tiny_causal_lm, save_tiny_encoder

PROMPTS = ["What is AI ?", "Do you like movies ?"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "llama")


def chat_file(tmp_path: Path, n: int = 48) -> str:
    rows = [{"messages": [{"role": "user", "content": PROMPTS[i % 2] + f" {i}"},
                          {"role": "assistant", "content": "AI is the study of machines ."}]} for i in range(n)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path: Path, model: Path, **trainer) -> Path:
    content = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "val_check_interval": 3, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
            "callbacks": [
                {"class_path": "lightning_peft.PeftCallback",
                 "init_args": {"adapter": {"class_path": "lightning_peft.LoraConfig",
                                           "init_args": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}},
                {"class_path": "lightning_peft.SaveAdapterCallback", "init_args": {"dirpath": str(tmp_path / "adapter")}},
                {"class_path": "lightning_peft.MergeCallback", "init_args": {"dirpath": str(tmp_path / "merged")}},
            ],
            **trainer,
        },
        "model": {"class_path": "lightning_peft.CausalLMModule",
                  "init_args": {"model_name_or_path": str(model), "learning_rate": 1e-2, "generate_prompts": PROMPTS,
                                "max_new_tokens": 4}},
        "data": {"class_path": "lightning_peft.ChatDataModule",
                 "init_args": {"train_file": chat_file(tmp_path), "val_fraction": 0.25, "batch_size": 4}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def run_dir(tmp_path: Path) -> Path:
    return max((tmp_path / "runs" / "tiny").glob("version_*"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def fitted(tiny_lm, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("fit")
    main(["fit", "--config", str(config(tmp_path, tiny_lm))])
    return tmp_path


def test_fit_logs_metrics_generations_adapter_and_merged_model(fitted):
    run = fitted / "runs" / "tiny" / "version_0"  # the fit's own run: tests sharing `fitted` add newer versions
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_loss", "val_perplexity", "val_token_accuracy", "lr"} <= set(header)
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == PROMPTS and all(g["step"] == 3 for g in generations)
    assert (run / "config.yaml").is_file()
    adapter = json.loads((fitted / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert AutoModelForCausalLM.from_pretrained(fitted / "merged") is not None


def test_typo_in_a_nested_key_fails_with_its_name(tiny_lm, tmp_path, capsys):
    path = config(tmp_path, tiny_lm)
    content = yaml.safe_load(path.read_text())
    content["trainer"]["callbacks"][0]["init_args"]["adapter"]["init_args"]["lora_alpah"] = 8
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path)])
    assert "lora_alpah" in capsys.readouterr().err


def test_typo_in_a_command_line_override_fails_with_its_name(tiny_lm, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config(tmp_path, tiny_lm)), "--model.init_args.learning_rat=0.1"])
    assert "learning_rat" in capsys.readouterr().err


def test_print_config_output_runs_unchanged(tiny_lm, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config(tmp_path, tiny_lm)), "--trainer.max_steps=2",
              "--trainer.val_check_interval=2", "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    content = yaml.safe_load(printed.read_text())
    assert content["trainer"]["max_steps"] == 2
    # One learning rate: the module's; PeftCallback's applies only to a module that configures no optimizer.
    assert content["model"]["init_args"]["learning_rate"] == 1e-2
    assert content["trainer"]["callbacks"][0]["init_args"]["learning_rate"] is None
    main(["fit", "--config", str(printed)])
    assert "val_loss" in (run_dir(tmp_path) / "metrics.csv").read_text()


def test_validate_test_and_predict_subcommands(fitted, tiny_lm, tmp_path, capsys):
    base = ["--config", str(fitted / "config.yaml")]
    main(["validate", *base])
    main(["test", *base])
    capsys.readouterr()
    main(["predict", *base, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert "'prompt':" in printed and "'response':" in printed


def test_merge_subcommand_matches_the_merge_callback(fitted, tiny_lm, tmp_path):
    main(["merge", str(fitted / "adapter"), str(tmp_path / "merged"), "--base", str(tiny_lm)])
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    callback = AutoModelForCausalLM.from_pretrained(fitted / "merged")(ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits
    torch.testing.assert_close(ours, callback)
    assert not torch.allclose(ours, base)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_generate_subcommand_answers_every_prompt(fitted, tiny_lm, capsys):
    main(["generate", str(tiny_lm), "--adapter", str(fitted / "adapter"), "--prompt", json.dumps(PROMPTS),
          "--max_new_tokens", "3"])
    out = capsys.readouterr().out
    assert all(f"> {p}" in out for p in PROMPTS)


def test_report_draws_a_png_from_the_run_with_its_baseline(fitted, tmp_path):
    main(["validate", "--config", str(fitted / "config.yaml"), "--trainer.logger.init_args.version=base"])
    main(["report", str(fitted / "runs"), "--baseline", str(fitted / "runs" / "tiny" / "base"),
          "--output", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_our_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("lightning-peft: error:") and "metrics.csv" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("LIGHTNING_PEFT_DEBUG", "1")
    with pytest.raises(ConfigError, match="metrics.csv"):
        main(["report", str(tmp_path), *(["--debug"] if how == "flag" else [])])


def test_refusal_during_fit_is_one_line(tiny_lm, tmp_path, capsys):
    path = config(tmp_path, tiny_lm)
    content = yaml.safe_load(path.read_text())
    content["trainer"]["callbacks"][0]["init_args"]["adapter"]["init_args"]["target_modules"] = ["no_such_proj"]
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("lightning-peft: error:") and "no_such_proj" in err


def test_refusal_while_the_config_is_read_is_one_line(tiny_lm, tmp_path, capsys):
    path = config(tmp_path, tiny_lm)
    content = yaml.safe_load(path.read_text())
    content["trainer"]["callbacks"][0]["init_args"]["adapter"]["init_args"]["r"] = 0
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lightning-peft: error: r ")


def test_export_adapter_writes_the_checkpoint_adapter_as_hf_peft(fitted, tiny_lm, tmp_path):
    (checkpoint,) = (fitted / "runs").rglob("*.ckpt")  # fit's ModelCheckpoint, in the run's log directory
    main(["export-adapter", str(checkpoint), str(tmp_path / "exported")])
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    at_fit_end = load_file(fitted / "adapter" / "adapter_model.safetensors")  # SaveAdapterCallback's
    assert exported.keys() == at_fit_end.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], at_fit_end[key], rtol=0, atol=0)


def test_validate_from_a_checkpoint_without_peft_callback(fitted, tmp_path):
    (checkpoint,) = (fitted / "runs").rglob("*.ckpt")  # fit's ModelCheckpoint, in the run's log directory
    content = yaml.safe_load((fitted / "config.yaml").read_text())
    losses = {}
    for name, callbacks in (("with", content["trainer"]["callbacks"][:1]), ("without", [])):
        content["trainer"]["callbacks"] = callbacks
        content["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), version=name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(content))
        main(["validate", "--config", str(tmp_path / f"{name}.yaml"), "--ckpt_path", str(checkpoint)])
        metrics = (tmp_path / "tiny" / name / "metrics.csv").read_text().splitlines()
        losses[name] = dict(zip(metrics[0].split(","), metrics[1].split(",")))["val_loss"]
    assert losses["with"] == losses["without"]


def test_built_in_module_loads_from_its_checkpoint_alone(fitted, tiny_lm):
    (checkpoint,) = (fitted / "runs").rglob("*.ckpt")
    module = CausalLMModule.load_from_checkpoint(checkpoint)
    reference = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm), fitted / "adapter")
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(ids).logits, reference.eval()(ids).logits)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    for name in ("fit", "validate", "test", "predict", "merge", "generate", "report", "export-adapter"):
        assert name in usage
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "export-adapter" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["fit", "--help"], ["fit", "--model.help", "lightning_peft.CausalLMModule"],
                                  ["fit", "--trainer.callbacks.help", "lightning_peft.PeftCallback"],
                                  ["merge", "--help"], ["export-adapter", "--help"]])
def test_help_is_plain_text(args, capsys):
    with pytest.raises(SystemExit):
        main(args)
    out = capsys.readouterr().out
    assert "--" in out and "``" not in out and ":class:`" not in out


def test_sequence_classification_logs_accuracy_and_f1(tmp_path):
    encoder = save_tiny_encoder(tmp_path / "bert")
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"{t} {i}", "label": lab}) + "\n" for i, (t, lab) in
                            enumerate([("the film is fresh , funny", "fresh"), ("a rotten , dull movie", "rotten")] * 16)))
    main(["fit", "--model=lightning_peft.SequenceClassificationModule", f"--model.model_name_or_path={encoder}",
          "--data=lightning_peft.TextClassificationDataModule", f"--data.train_file={data}", "--data.batch_size=8", "--data.val_fraction=0.3",
          "--trainer.callbacks+=lightning_peft.PeftCallback",
          '--trainer.callbacks.adapter={"class_path": "lightning_peft.LoraConfig", '
          '"init_args": {"target_modules": ["query", "value"]}}',
          "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          f"--trainer.logger.save_dir={tmp_path}"])
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"val_accuracy", "val_f1", "train_loss"} <= set(header)




@pytest.mark.parametrize("strategy, maps", [("auto", False), ("qlora", True)])
def test_large_buffers_are_mapped_only_under_a_quantizing_strategy(tiny_lm, tmp_path, monkeypatch, strategy, maps):
    from lightning_peft.cli import PeftCLI

    calls = []
    monkeypatch.setattr("lightning_peft.cli.map_large_allocations", lambda: calls.append(strategy))
    PeftCLI(args=["--config", str(config(tmp_path, tiny_lm)), f"--trainer.strategy={strategy}"], run=False)
    assert calls == ([strategy] if maps else [])
