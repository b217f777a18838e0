"""save_adapter/load_adapter: the on-disk contract and every way a load can be refused without harm."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import batch, make_model
from lightning_peft import AdapterFileError, AdapterMismatchError, ConfigError, LoraConfig, load_adapter, save_adapter
from lightning_peft.surgery import adapter_layers, attach

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture
def saved(tmp_path):
    model = make_model("llama")
    attach(model, LoraConfig(**LORA))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model(**batch()).logits


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    assert not adapter_layers(model)
    now = dict(model.named_parameters())
    assert now.keys() == snapshot.keys()
    for name, (value, flag) in snapshot.items():
        assert torch.equal(now[name], value) and now[name].requires_grad == flag, name


def test_directory_layout_matches_hf_peft(saved):
    path, _ = saved
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    tensors = load_file(path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    from safetensors import safe_open

    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata().keys() == {"format", "lightning_peft"} and f.metadata()["format"] == "pt"


def test_load_returns_the_same_model_frozen_for_inference(saved):
    path, expected = saved
    model = make_model("llama")
    assert load_adapter(model, path) is model
    assert not any(p.requires_grad for p in model.parameters())
    trainable = load_adapter(make_model("llama"), path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 8


def test_minimal_hf_peft_config_loads(saved, tmp_path):
    path, expected = saved
    minimal = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "base_model_name_or_path": "base"}
    (path / "adapter_config.json").write_text(json.dumps(minimal))
    torch.testing.assert_close(load_adapter(make_model("llama"), path)(**batch()).logits, expected)


def test_adapter_for_another_shape_is_refused_and_model_unchanged(saved):
    path, _ = saved
    other = make_model("llama", hidden_size=64, intermediate_size=64)
    snapshot = _snapshot(other)
    with pytest.raises(AdapterMismatchError, match=r"q_proj\.lora_A.*shape"):
        load_adapter(other, path)
    _assert_unchanged(other, snapshot)


def test_adapter_for_missing_modules_is_refused_and_model_unchanged(saved):
    path, _ = saved
    other = make_model("gpt2")
    snapshot = _snapshot(other)
    with pytest.raises(AdapterMismatchError, match="adapter does not fit GPT2LMHeadModel.*q_proj.*c_attn"):
        load_adapter(other, path)
    _assert_unchanged(other, snapshot)


def test_fewer_layers_than_the_adapter_is_refused(saved):
    path, _ = saved
    shallow = make_model("llama", num_hidden_layers=1)
    snapshot = _snapshot(shallow)
    with pytest.raises(AdapterMismatchError, match="layers.1"):
        load_adapter(shallow, path)
    _assert_unchanged(shallow, snapshot)


def test_missing_tensor_is_refused(saved):
    path, _ = saved
    tensors = load_file(path / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, path / "adapter_model.safetensors")
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterMismatchError, match="missing.*layers.1.self_attn.v_proj.lora_B"):
        load_adapter(model, path)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file_is_named(saved, damage):
    path, _ = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 10, "empty": b""}[damage])
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        load_adapter(model, path)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("content", "error", "match"),
    [("{not json", AdapterFileError, "not valid JSON"),
     ("[1, 2]", ConfigError, "JSON object"),
     ('{"peft_type": "MAGIC"}', ConfigError, "MAGIC"),
     ('{"r": 4}', ConfigError, "peft_type=None"),
     ('{"peft_type": "LORA", "r": "four"}', ConfigError, "r='four' is not of type int"),
     ('{"peft_type": "LORA", "r": 4, "layer_replication": [[0, 2]]}', ConfigError, "layer_replication")],
)
def test_bad_config_file_is_named(saved, content, error, match):
    path, _ = saved
    (path / "adapter_config.json").write_text(content)
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match) as err:
        load_adapter(model, path)
    assert "adapter_config.json" in str(err.value) or error is ConfigError and "MAGIC" not in content
    _assert_unchanged(model, snapshot)


def test_unknown_config_keys_warn_and_load(saved):
    path, expected = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["shiny_new_option"] = 3
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="shiny_new_option"):
        model = load_adapter(make_model("llama"), path)
    torch.testing.assert_close(model(**batch()).logits, expected)


def test_pickle_weights_are_never_loaded(saved):
    path, _ = saved
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(make_model("llama"), path)


def test_missing_directory_and_model_without_adapter(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(make_model("llama"), tmp_path / "nope")
    with pytest.raises(AdapterMismatchError, match="holds no adapter"):
        save_adapter(make_model("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_twice_is_refused(saved):
    path, _ = saved
    model = load_adapter(make_model("llama"), path)
    with pytest.raises(AdapterMismatchError, match="already holds an adapter"):
        load_adapter(model, path)


def test_save_replaces_an_existing_directory_atomically(saved, tmp_path):
    path, _ = saved
    model = make_model("llama")
    attach(model, LoraConfig(**{**LORA, "r": 2}))
    save_adapter(model, path)
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 2
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_another_base_with_the_same_shapes_warns_or_is_refused(saved):
    path, _ = saved
    assert "base_model_fingerprint" not in json.loads((path / "adapter_config.json").read_text())  # in the metadata
    with pytest.warns(UserWarning, match="another base model.*embedding"):
        load_adapter(make_model("llama", seed=1), path)
    stranger = make_model("llama", seed=1)
    snapshot = _snapshot(stranger)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        load_adapter(stranger, path, strict=True)
    _assert_unchanged(stranger, snapshot)


def test_same_base_in_bfloat16_is_recognised(saved, recwarn):
    path, _ = saved
    load_adapter(make_model("llama").to(torch.bfloat16), path, strict=True)
    assert not [w for w in recwarn if "another base" in str(w.message)]


def test_adapter_loads_from_a_lightning_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_helpers import CausalLM, loader, trainer
    from lightning_peft import PeftCallback

    module = CausalLM()
    trainer(callbacks=[PeftCallback(LoraConfig(**LORA)), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            enable_checkpointing=True, max_steps=2).fit(module, loader())
    module.model.eval()
    expected = module.model(**batch()).logits
    model = load_adapter(make_model("llama"), tmp_path / "last.ckpt", strict=True)
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("content", [
    {"state_dict": {"model.lm_head.weight": torch.zeros(2)}},  # a plain Lightning checkpoint: no adapter record
    {"peft": {"adapter_config": {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}}},  # no tensors
    {"peft": {"adapter_config": {"peft_type": "LORA"}}, "state_dict_safetensors": torch.zeros(8, dtype=torch.uint8)},
], ids=["foreign", "no-state-dict", "old-blob"])
def test_checkpoint_without_an_adapter_is_refused_with_the_reason(tmp_path, content):
    torch.save(content, tmp_path / "run.ckpt")
    model = make_model("llama")
    with pytest.raises(AdapterFileError, match="PeftCallback"):
        load_adapter(model, tmp_path / "run.ckpt")
    assert not adapter_layers(model)
