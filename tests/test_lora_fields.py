"""Every field of HF PEFT's ``LoraConfig`` is honoured or refused by name (``methods/peft_fields.py``), with HF PEFT
as the client on the other side: ``layers_to_transform``/``layers_pattern``, ``lora_bias`` and the
``init_lora_weights`` values we honour load both ways with the same logits; the rest is refused with its reason."""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from conftest import batch, make_model, targets
from lightning_peft import LoraConfig, export_merged, load_adapter, merge_adapter, save_adapter
from lightning_peft.errors import ConfigError, MergeError, TargetModulesError
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.methods.lora import LoraLayer
from lightning_peft.methods.peft_fields import LORA_FIELDS
from lightning_peft.surgery import adapter_layers, attach, detach

ROOT = Path(__file__).resolve().parents[1]


def lora(family: str, **fields) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=targets(family), **fields)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every adapter tensor away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name or "trainable_tokens" in name:
            param.add_(torch.randn(param.shape, generator=g) * 0.1)


def peft_warnings(caught, caplog) -> list[str]:
    return [str(w.message) for w in caught if "/peft/" in w.filename] + [
        r.getMessage() for r in caplog.records if r.name.startswith("peft")]


INTEROP = [
    ("llama", dict(layers_to_transform=[1], layers_pattern="layers")),
    ("gpt2", dict(layers_to_transform=0)),
    ("qwen2", dict(lora_bias=True)),  # Qwen2's q/k/v projections have biases
    ("llama", dict(init_lora_weights=False)),
    ("llama", dict(init_lora_weights="gaussian")),
    ("llama", dict(init_lora_weights="pissa")),
    ("gpt2", dict(init_lora_weights="pissa")),
    ("llama", dict(init_lora_weights="olora")),
]


@pytest.mark.parametrize(("family", "fields"), INTEROP, ids=[f"{f}-{next(iter(k.values()))}" for f, k in INTEROP])
def test_hf_peft_loads_ours_and_we_load_theirs(tmp_path, caplog, family, fields):
    peft = pytest.importorskip("peft")
    ours = make_model(family)
    attach(ours, LoraConfig(**lora(family, **fields)))
    perturb(ours)
    expected = ours(**batch()).logits
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_model(family), tmp_path / "ours").eval()
    assert not peft_warnings(caught, caplog)
    torch.testing.assert_close(theirs(**batch()).logits, expected, rtol=0, atol=1e-5)

    made = peft.get_peft_model(make_model(family), peft.LoraConfig(**lora(family, **fields))).eval()
    perturb(made, seed=4)
    made.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_model(family), tmp_path / "theirs")
    torch.testing.assert_close(back(**batch()).logits, made(**batch()).logits, rtol=0, atol=1e-5)
    assert sorted(adapter_layers(back)) == sorted(adapter_layers(ours))


@pytest.mark.parametrize(("family", "fields"), [
    ("llama", dict(layers_to_transform=1)),
    ("llama", dict(layers_to_transform=[0, 1], layers_pattern=["layers"])),
    ("llama", dict(layers_to_transform=[0], layers_pattern="")),
    ("llama", dict(layers_to_transform=[], target_modules=["q_proj", "model.layers.0.self_attn.v_proj"])),
    ("llama", dict(layers_to_transform=[1], target_modules=["q_proj", "model.layers.0.self_attn.v_proj"])),
    ("gpt2", dict(layers_to_transform=[1], layers_pattern="h", target_modules=["c_attn", "c_fc"])),
])
def test_layers_to_transform_selects_the_layers_hf_peft_selects(family, fields):
    peft = pytest.importorskip("peft")
    config = lora(family) | fields
    ours = sorted(attach(make_model(family), LoraConfig(**config)))
    theirs = peft.get_peft_model(make_model(family), peft.LoraConfig(**config))
    prefix = "base_model.model."
    chosen = sorted(n[len(prefix):] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert ours == chosen and ours


def test_layers_to_transform_refusals_name_the_fix(llama):
    with pytest.raises(ConfigError, match="list of names"):
        LoraConfig(target_modules="all-linear", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="without layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match=">= 0"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[-1])
    with pytest.raises(TargetModulesError, match=r"keeps none .* layer indices are \[0, 1\]"):
        attach(llama, LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    assert not adapter_layers(llama)


def test_lora_bias_trains_and_merges_exactly(tmp_path):
    model = make_model("qwen2")
    attach(model, LoraConfig(**lora("qwen2", lora_bias=True)))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B_bias) == 0  # starts as the base
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert layer.lora_B_bias.requires_grad and layer.lora_B_bias.grad.abs().sum() > 0
    perturb(model)
    x = torch.randn(3, layer.in_features)
    manual = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.t() @ layer.lora_B.t() + layer.lora_B_bias)
    torch.testing.assert_close(layer(x), manual, rtol=0, atol=1e-6)
    save_adapter(model, tmp_path / "adapter")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in load_tensors(tmp_path / "adapter")
    expected = model(**batch()).logits
    merge_adapter(model)
    assert not adapter_layers(model)
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)


def test_lora_bias_on_a_layer_without_bias_trains_but_refuses_to_merge(llama):
    attach(llama, LoraConfig(**lora("llama", lora_bias=True)))
    perturb(llama)
    with pytest.raises(MergeError, match="lora_bias=True .* without a bias"):
        merge_adapter(llama)
    assert adapter_layers(llama)  # refused before anything changed
    with pytest.raises(ConfigError, match="init_lora_weights True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="use_dora=True"):
        LoraConfig(lora_bias=True, use_dora=True)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_as_the_base_merge_exactly_and_leave_the_base_untouched(init):
    model = make_model("llama")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(**batch()).logits
    layers = attach(model, LoraConfig(**lora("llama", init_lora_weights=init)))
    layer = next(iter(layers.values()))
    weight = layer.base_layer.weight
    if init == "pissa":  # s·B0 A0 is W's best rank-r approximation
        u, s, vh = torch.linalg.svd(weight)
        torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    else:  # B0 has orthonormal columns
        torch.testing.assert_close(layer.lora_B.t() @ layer.lora_B, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(model(**batch()).logits, base, rtol=0, atol=1e-5)
    perturb(model)
    trained = model(**batch()).logits
    assert not torch.allclose(trained, base, atol=1e-3)
    detach(model)  # the base was never rewritten: removing the adapter gives it back bit for bit
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    attach(model, LoraConfig(**lora("llama", init_lora_weights=init)))
    perturb(model)
    merge_adapter(model)
    torch.testing.assert_close(model(**batch()).logits, trained, rtol=0, atol=1e-5)


def test_a_quantized_base_refuses_pissa_and_olora_by_name_and_takes_trainable_tokens():
    pytest.importorskip("bitsandbytes")
    from test_quantization import NF4, quantized

    model, _ = quantized(**NF4)
    for init in ("pissa", "olora"):
        config = LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
        assert init in config.quantized_base_refusal  # PeftStrategy refuses before quantizing anything
        with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' decomposes the full-precision base"):
            attach(model, config)
    assert LoraConfig(target_modules=["q_proj"]).quantized_base_refusal is None
    attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]))  # the embedding stays dense
    perturb(model)
    delta = model.model.embed_tokens.trainable_tokens_delta.detach().clone()
    logits = model(input_ids=TOKENS).logits
    merge_adapter(model)
    torch.testing.assert_close(model.model.embed_tokens.weight[[1, 2]], delta, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=TOKENS).logits, logits, rtol=0, atol=1e-4)


REFUSED = [row for row in LORA_FIELDS if row.status == "refused"]
SAMPLES = {"layer_replication": [[0, 1], [0, 2]], "pissa_niter_[n]": "pissa_niter_4"}


@pytest.mark.parametrize("row", REFUSED, ids=[f"{r.name}={r.value}" if r.value else r.name for r in REFUSED])
def test_refused_fields_are_named(row):
    if row.value is not None:
        value = SAMPLES.get(row.value, row.value)
        with pytest.raises(ConfigError, match=re.escape(row.note)):
            LoraConfig(target_modules=["q_proj"], init_lora_weights=value)
        with pytest.raises(ConfigError, match=re.escape(row.note)):
            AdapterConfig.from_dict({"peft_type": "LORA", "init_lora_weights": value})
        return
    with pytest.raises(ConfigError, match=f"{row.name}=.* is refused: {re.escape(row.note)}"):
        AdapterConfig.from_dict({"peft_type": "LORA", row.name: SAMPLES.get(row.name, True)})


TOKENS = torch.tensor([[1, 5, 2, 9, 1, 7, 3]])  # ids 1 and 2 train


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("form", ["list", "dict"])
def test_trainable_tokens_load_both_ways_and_merge_exactly(tmp_path, caplog, tied, form):
    peft = pytest.importorskip("peft")
    indices = [1, 2] if form == "list" else {"embed_tokens": [1, 2]}
    config = lora("llama", trainable_token_indices=indices)
    ours = make_model("llama", tie_word_embeddings=tied)
    before = ours(input_ids=TOKENS).logits
    layers = attach(ours, LoraConfig(**config))
    assert ("lm_head" in layers) == tied
    trained = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trained == sorted([*(n for n in trained if "lora_" in n), "model.embed_tokens.trainable_tokens_delta"])
    torch.testing.assert_close(ours(input_ids=TOKENS).logits, before, rtol=0, atol=1e-6)  # starts as the base
    ours(input_ids=TOKENS).logits.sum().backward()
    grad = layers["model.embed_tokens"].trainable_tokens_delta.grad
    assert grad.abs().sum(dim=1).gt(0).all()
    perturb(ours)
    embedding = ours.get_input_embeddings()
    torch.testing.assert_close(embedding(TOKENS)[0, [0, 2, 4]], embedding.trainable_tokens_delta[[0, 1, 0]])
    expected = ours(input_ids=TOKENS).logits
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_model("llama", tie_word_embeddings=tied), tmp_path / "ours")
    assert not peft_warnings(caught, caplog)
    torch.testing.assert_close(theirs.eval()(input_ids=TOKENS).logits, expected, rtol=0, atol=1e-5)

    made = peft.get_peft_model(make_model("llama", tie_word_embeddings=tied), peft.LoraConfig(**config)).eval()
    perturb(made, seed=4)
    made.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_model("llama", tie_word_embeddings=tied), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=TOKENS).logits, made(input_ids=TOKENS).logits, rtol=0, atol=1e-5)
    export_merged(back, tmp_path / "merged")  # a tied head is left out of the file and tied again on load
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(exported(input_ids=TOKENS).logits, made(input_ids=TOKENS).logits, rtol=0, atol=1e-5)

    merge_adapter(ours)
    assert not adapter_layers(ours) and (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    torch.testing.assert_close(ours(input_ids=TOKENS).logits, expected, rtol=0, atol=1e-5)


def test_trainable_tokens_refusals_name_the_problem(llama):
    with pytest.raises(ConfigError, match="both in trainable_token_indices and .* modules_to_save"):
        attach(llama, LoraConfig(**lora("llama", trainable_token_indices=[1], modules_to_save=["embed_tokens"])))
    with pytest.raises(ConfigError, match=r"distinct token ids in \[0, 96\)"):
        attach(llama, LoraConfig(**lora("llama", trainable_token_indices=[1, 96])))
    with pytest.raises(ConfigError, match="name one nn.Embedding"):
        attach(llama, LoraConfig(**lora("llama", trainable_token_indices={"lm_head": [1]})))
    assert not adapter_layers(llama)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ConfigError, match=r"shared shares its weight with \['encoder.embed_tokens', 'decoder.embed_tokens'\]"):
        attach(t5, LoraConfig(target_modules=["q"], trainable_token_indices=[1]))
    assert not adapter_layers(t5)


def test_ignored_fields_load_without_a_warning():
    ignored = {"inference_mode": True, "revision": "main", "peft_version": "0.99", "megatron_core": "megatron.core",
               "qalora_group_size": 32, "auto_mapping": {"base_model_class": "LlamaForCausalLM"},
               "runtime_config": {"ephemeral_gpu_offload": True}}
    assert set(ignored) == {r.name for r in LORA_FIELDS if r.status == "ignored"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = AdapterConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], **ignored})
    assert config == LoraConfig(target_modules=["q_proj"])


def test_a_field_another_method_lacks_is_refused_not_dropped():
    with pytest.raises(ConfigError, match="layers_to_transform=.* AdaLoraConfig does not implement"):
        AdapterConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "layers_to_transform": [0]})


def test_every_field_of_the_installed_peft_lora_config_is_classified():
    peft = pytest.importorskip("peft")
    theirs = [field.name for field in dataclasses.fields(peft.LoraConfig)]
    classified = {row.name for row in LORA_FIELDS}
    new = set(theirs) - classified
    assert not new, f"classify in lightning_peft/methods/peft_fields.py: {new}"
    assert not classified - set(theirs), f"no longer in HF PEFT's LoraConfig: {classified - set(theirs)}"


def test_honoured_fields_are_fields_of_our_config():
    ours = {field.name for field in dataclasses.fields(LoraConfig)} | {"peft_type"}
    missing = {row.name for row in LORA_FIELDS if row.status == "honoured"} - ours
    assert not missing, missing


def test_every_row_names_a_test_that_exists():
    for row in LORA_FIELDS:
        path, _, name = row.test.partition("::")
        text = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", text, re.M), row.test


def test_decomposed_inits_keep_their_start_out_of_the_saved_tensors(tmp_path, llama):
    attach(llama, LoraConfig(**lora("llama", init_lora_weights="pissa")))
    save_adapter(llama, tmp_path / "adapter")
    assert {key.rsplit(".", 2)[-2] for key in load_tensors(tmp_path / "adapter")} == {"lora_A", "lora_B"}
    assert all(isinstance(m, LoraLayer) and m.init_A is not None for m in adapter_layers(llama).values())


@pytest.mark.parametrize(("family", "fields"), [
    ("llama", dict(init_lora_weights="pissa", layers_to_transform=[1], trainable_token_indices=[1, 2])),
    ("qwen2", dict(lora_bias=True)),
])
def test_a_lightning_fit_trains_the_new_fields_and_round_trips(tmp_path, family, fields):
    from lightning_helpers import CausalLM, loader, trainer

    from lightning_peft import PeftCallback

    module = CausalLM(family, optimizer=None)
    trainer(max_steps=6, callbacks=[PeftCallback(LoraConfig(**lora(family, **fields)), learning_rate=3e-3)]).fit(
        module, loader(n=4))  # one batch, seen at every step
    assert module.losses[-1] < module.losses[0]
    module.model.eval()
    expected = module.model(input_ids=TOKENS).logits
    save_adapter(module.model, tmp_path / "adapter")
    back = load_adapter(make_model(family), tmp_path / "adapter")
    torch.testing.assert_close(back(input_ids=TOKENS).logits, expected, rtol=0, atol=1e-5)
