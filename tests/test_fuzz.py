"""Fuzz: random bytes and random JSON as adapter files, random field values for every config class. Whatever
comes in, the only exceptions are our documented ones (``PeftError`` and its subclasses) and a failed load
leaves the model as it was."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import batch, make_model, targets
from lightning_peft import LoraConfig, PeftError, QuantizationConfig, load_adapter, save_adapter
from lightning_peft.methods.base import CONFIG_CLASSES as METHOD_CONFIGS
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.surgery import attach, detach

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CONFIG_CLASSES = [*sorted(METHOD_CONFIGS.values(), key=lambda c: c.peft_type), QuantizationConfig]

JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    """A tiny Llama, its logits, and a valid LoRA adapter directory for it."""
    directory = tmp_path_factory.mktemp("valid")
    trained = make_model("llama")
    attach(trained, LoraConfig(r=4, target_modules=targets("llama"), init_lora_weights=False))
    save_adapter(trained, directory)
    model = make_model("llama")
    return model, model(**batch()).logits.detach(), directory


def assert_unchanged(model: torch.nn.Module, logits: torch.Tensor) -> None:
    assert not any("lora" in name for name, _ in model.named_modules())
    torch.testing.assert_close(model(**batch()).logits, logits, rtol=0, atol=0)


def try_load(model, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys and a different base warn; the errors are what counts
        try:
            load_adapter(model, path)
        except PeftError:
            return
    detach(model)  # a load that succeeded put an adapter on the model; take it off for the next example


def copy_adapter(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@FUZZ
@given(data=st.binary(max_size=512), keep_header=st.booleans())
def test_random_bytes_as_weights_raise_only_our_errors(model_and_adapter, tmp_path, data, keep_header):
    model, logits, valid = model_and_adapter
    path = copy_adapter(valid, tmp_path)
    weights = path / "adapter_model.safetensors"
    original = weights.read_bytes()
    # Either bytes from nowhere or a real header followed by garbage (a truncated or corrupted download).
    header = original[: 8 + int.from_bytes(original[:8], "little")] if keep_header else b""
    weights.write_bytes(header + data)
    with pytest.raises(PeftError):
        load_adapter(model, path)
    assert_unchanged(model, logits)


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_bytes_as_config_raise_only_our_errors(model_and_adapter, tmp_path, data):
    model, logits, valid = model_and_adapter
    path = copy_adapter(valid, tmp_path)
    (path / "adapter_config.json").write_bytes(data)
    with pytest.raises(PeftError):
        load_adapter(model, path)
    assert_unchanged(model, logits)


@FUZZ
@given(replacements=st.dictionaries(st.sampled_from(
    ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "fan_in_fan_out",
     "use_rslora", "use_dora", "init_lora_weights", "modules_to_save", "task_type", "base_model_name_or_path",
     "base_model_fingerprint", "layers_to_transform", "rank_pattern", "alpha_pattern", "revision", "extra_key"]),
    JSON_VALUES, min_size=1, max_size=4))
def test_random_json_fields_load_or_raise_only_our_errors(model_and_adapter, tmp_path, replacements):
    model, logits, valid = model_and_adapter
    path = copy_adapter(valid, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **replacements}))
    try_load(model, path)
    assert_unchanged(model, logits)


@FUZZ
@given(document=JSON_VALUES)
def test_random_json_documents_raise_only_our_errors(model_and_adapter, tmp_path, document):
    model, logits, valid = model_and_adapter
    path = copy_adapter(valid, tmp_path)
    (path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(PeftError):
        load_adapter(model, path)
    assert_unchanged(model, logits)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_as_a_checkpoint_raise_only_our_errors(model_and_adapter, tmp_path, data):
    model, logits, _ = model_and_adapter
    path = tmp_path / "last.ckpt"
    path.write_bytes(data)
    with pytest.raises(PeftError):
        load_adapter(model, path)
    assert_unchanged(model, logits)


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_random_field_values_build_or_raise_only_our_errors(config_class):
    fields = [f.name for f in dataclasses.fields(config_class)]

    @FUZZ
    @given(kwargs=st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=4))
    def check(kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = config_class(**kwargs)
            except PeftError:
                return
        if isinstance(config, AdapterConfig):
            # What was accepted must also survive its own file format.
            assert type(AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict())))) is config_class

    check()
