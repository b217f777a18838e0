"""The quantization module and streaming on their own: config checks, the three verbs for 4-bit (NF4, FP4,
double quantization) and 8-bit layers, LoRA on top of them, merges that dequantize, and loading a meta model
from safetensors tensor by tensor."""

from __future__ import annotations

import json
import warnings

import bitsandbytes as bnb
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import QUANTIZABLE, batch, make_model
from lightning_peft import ConfigError, LoraConfig, MergeError, QuantizationConfig, export_merged, merge_adapter
from lightning_peft.methods.lora import LoraLayer
from lightning_peft.optim import build_optimizer
from lightning_peft.quantization import (
    cpu_4bit_row_length_works,
    dequantize,
    is_quantized,
    quantize_model,
    skip_paths,
)
from lightning_peft.streaming import stream_load
from lightning_peft.surgery import adapter_layers, attach

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
CONFIGS = {
    "nf4": NF4,
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double-quant": dict(**NF4, bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
# Worst elementwise weight error allowed per scheme, relative to the largest weight of the layer.
WEIGHT_TOLERANCE = {"nf4": 0.2, "fp4": 0.3, "nf4-double-quant": 0.2, "int8": 0.01}
# Worst logit error allowed per scheme on the tiny model (about 1.5x what each gives there).
LOGIT_TOLERANCE = {"nf4": 0.1, "fp4": 0.17, "nf4-double-quant": 0.1, "int8": 0.01}
ATTENTION_AND_MLP = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays dense


def quantized(family="llama", task="causal", **config):
    model = make_model(family, task, **QUANTIZABLE)
    config = QuantizationConfig(**config)
    return model, quantize_model(model, config, "cpu", skip_paths(model, config))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(load_in_4bit=True, load_in_8bit=True), "both"), (dict(), "load_in_4bit=True or load_in_8bit"),
     (dict(NF4, bnb_4bit_quant_type="int4"), "nf4"), (dict(NF4, bnb_4bit_compute_dtype="float64"), "compute_dtype"),
     (dict(NF4, bnb_4bit_quant_storage="int3"), "quant_storage"), (dict(NF4, llm_int8_skip_modules="lm_head"), "list"),
     (dict(load_in_8bit=True, llm_int8_threshold=-1), "threshold")],
)
def test_contradictory_config_is_refused_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizationConfig(**kwargs)


def test_config_takes_torch_dtypes_and_keeps_names():
    config = QuantizationConfig(**NF4, bnb_4bit_compute_dtype=torch.bfloat16)
    assert config.bnb_4bit_compute_dtype == "bfloat16" and config.compute_dtype is torch.bfloat16


@pytest.mark.parametrize("scheme", CONFIGS)
def test_every_linear_but_the_head_is_quantized_and_close(scheme):
    dense = make_model("llama", **QUANTIZABLE)
    model, replaced = quantized(**CONFIGS[scheme])
    assert len(replaced) == ATTENTION_AND_MLP and "lm_head" not in replaced
    assert type(model.lm_head) is torch.nn.Linear
    layer_type = bnb.nn.Linear8bitLt if scheme == "int8" else bnb.nn.Linear4bit
    for path in replaced:
        layer = model.get_submodule(path)
        assert isinstance(layer, layer_type) and not layer.weight.is_floating_point()
        reference = dense.get_submodule(path).weight
        error = (dequantize(layer).float() - reference).abs().max() / reference.abs().max()
        assert 0 < error < WEIGHT_TOLERANCE[scheme], (path, error)
    logits = model(**batch()).logits
    torch.testing.assert_close(logits, dense(**batch()).logits, rtol=0, atol=LOGIT_TOLERANCE[scheme])


def test_layers_the_cpu_kernels_would_miscompute_stay_dense_with_a_warning():
    """Rows of 32 values (q, k, v, o, gate and up of the 32-wide model) are what AVX-512 CPUs' 4-bit kernels scale
    wrongly; whichever CPU this runs on, every layer that is quantized must be accurate, and the others named."""
    dense, model = make_model("llama"), make_model("llama")
    config = QuantizationConfig(**NF4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replaced = quantize_model(model, config, "cpu", skip_paths(model, config))
    works = cpu_4bit_row_length_works(32, "nf4", torch.float32)
    assert len(replaced) == (ATTENTION_AND_MLP if works else 2)  # the down_proj layers take 64-wide rows
    warned = [str(w.message) for w in caught if "multiple of 64" in str(w.message)]
    assert bool(warned) != works and (works or "model.layers.0.self_attn.q_proj" in warned[0])
    for path in replaced:
        reference = dense.get_submodule(path).weight
        error = (dequantize(model.get_submodule(path)).float() - reference).abs().max() / reference.abs().max()
        assert error < WEIGHT_TOLERANCE["nf4"], (path, error)
    torch.testing.assert_close(model(**batch()).logits, dense(**batch()).logits, rtol=0, atol=LOGIT_TOLERANCE["nf4"])


def test_subclasses_of_linear_stay_dense_and_are_named():
    """Falcon's layers subclass nn.Linear with a forward of their own; a run must not believe them quantized."""
    config = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = transformers.FalconForCausalLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replaced = quantize_model(model, QuantizationConfig(**NF4), "cpu", skip_paths(model, QuantizationConfig(**NF4)))
    assert replaced == [] and all(type(m).__name__ == "FalconLinear" for m in model.modules()
                                  if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    (warned,) = [str(w.message) for w in caught if "FalconLinear" in str(w.message)]
    assert warned.startswith("4 linear layer(s) of FalconLinear") and "transformer.h.0.mlp.dense_4h_to_h" in warned


def test_double_quantization_compresses_the_scales():
    single, _ = quantized(**NF4)
    double, _ = quantized(**CONFIGS["nf4-double-quant"])
    single_state = single.model.layers[0].self_attn.q_proj.weight.quant_state
    double_state = double.model.layers[0].self_attn.q_proj.weight.quant_state
    assert not single_state.nested and double_state.nested
    assert double_state.absmax.dtype == torch.uint8 and single_state.absmax.dtype == torch.float32


def test_default_skip_keeps_heads_and_tied_weights_dense():
    model, replaced = quantized("bert", "seq_cls", **NF4)
    assert "classifier" not in replaced and type(model.classifier) is torch.nn.Linear
    tied = make_model("llama", tie_word_embeddings=True, **QUANTIZABLE)
    assert "lm_head" in skip_paths(tied, QuantizationConfig(**NF4, llm_int8_skip_modules=[]))
    model, replaced = quantized(**NF4, llm_int8_skip_modules=["down_proj"])
    assert "lm_head" in replaced and not any(p.endswith("down_proj") for p in replaced)


@pytest.mark.parametrize("scheme", CONFIGS)
def test_lora_on_a_quantized_base_trains_only_the_adapter(scheme):
    model, _ = quantized(**CONFIGS[scheme])
    attach(model, LoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch(), labels=batch()["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]) and param.grad is None, name


def test_lora_on_a_4bit_layer_computes_in_the_compute_dtype():
    model, _ = quantized(**NF4, bnb_4bit_compute_dtype="bfloat16")
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    bf16 = torch.bfloat16
    low = (x.to(bf16) @ layer.lora_A.to(bf16).t() * layer.scaling) @ layer.lora_B.to(bf16).t()
    full = (x @ layer.lora_A.t() * layer.scaling) @ layer.lora_B.t()
    out = layer(x) - layer.base_layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, low.float(), rtol=0, atol=1e-6)
    assert not torch.allclose(out, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["nf4-double-quant", "fp4", "int8"])
def test_float32_export_from_a_quantized_base_matches_and_needs_no_bitsandbytes(tmp_path, scheme):
    model, _ = quantized(**CONFIGS[scheme])
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = model(**batch()).logits
    export_merged(model, tmp_path, dtype="float32")
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert not [k for k in tensors if "lora" in k or "absmax" in k or "quant" in k or "SCB" in k]
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(is_quantized(m) for m in merged.modules())
    # 8-bit layers multiply in float16 on this path, so their own outputs carry that rounding.
    tolerance = 5e-3 if scheme == "int8" else 1e-3
    torch.testing.assert_close(merged(**batch()).logits, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_from_4bit(tmp_path, dtype):
    model, _ = quantized(**NF4)
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    export_merged(model, tmp_path, dtype=dtype)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert merged.dtype == getattr(torch, dtype)
    torch.testing.assert_close(merged(**batch()).logits.float(), model(**batch()).logits, rtol=0, atol=0.05)


def test_merge_adapter_in_memory_leaves_a_plain_model():
    model, _ = quantized(**NF4)
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    expected = model(**batch()).logits
    with pytest.raises(MergeError, match="quantized"):
        adapter_layers(model)["model.layers.0.self_attn.q_proj"].merge()
    merge_adapter(model)
    assert not adapter_layers(model) and not any(is_quantized(m) for m in model.modules())
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-4)


def test_paged_optimizer_without_cuda_falls_back_with_one_warning():
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    with pytest.warns(UserWarning, match="paging needs CUDA") as record:
        optimizer = build_optimizer(params, "paged_adamw_32bit", 1e-3, 0.0, on_cuda=False)
    assert len(record) == 1 and type(optimizer).__name__ == "AdamW32bit"
    with pytest.warns(UserWarning, match="AdamW8bit"):
        assert type(build_optimizer(params, "paged_adamw_8bit", 1e-3, 0.0, on_cuda=False)).__name__ == "AdamW8bit"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama saved in two safetensors shards, the way a hub checkpoint of a large model is laid out."""
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", **QUANTIZABLE).save_pretrained(path, max_shard_size="40KB")
    return path


def meta_model(path):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))


def test_streamed_model_equals_quantizing_the_loaded_one(pretrained):
    assert len(list(pretrained.glob("*.safetensors"))) > 1
    config = QuantizationConfig(**CONFIGS["nf4-double-quant"])
    model = meta_model(pretrained)
    quantize_model(model, config, "cpu", skip_paths(model, config))
    stream_load(model, pretrained, "cpu")
    reference, _ = quantized(**CONFIGS["nf4-double-quant"])
    streamed, loaded = model.state_dict(), reference.state_dict()
    assert streamed.keys() == loaded.keys()
    for key in loaded:
        assert torch.equal(streamed[key], loaded[key]), key
    torch.testing.assert_close(model(**batch()).logits, reference(**batch()).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "task"), [("gpt2", "causal"), ("bert", "seq_cls")])
def test_streaming_restores_tied_weights_and_buffers(tmp_path, family, task):
    make_model(family, task).save_pretrained(tmp_path)
    auto = transformers.AutoModelForCausalLM if task == "causal" else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    stream_load(model, tmp_path, "cpu")
    reference = auto.from_pretrained(tmp_path)
    torch.testing.assert_close(model.eval()(**batch()).logits, reference(**batch()).logits, rtol=0, atol=0)


def test_streaming_names_what_the_directory_lacks(tmp_path, pretrained):
    model = meta_model(pretrained)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        stream_load(model, tmp_path, "cpu")
    model.extra = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(ConfigError, match=r"2 tensors.*extra\.weight"):
        stream_load(model, pretrained, "cpu")


def test_lora_layer_reads_its_compute_dtype_from_the_base():
    model, _ = quantized(**NF4, bnb_4bit_compute_dtype="float16")
    layer = LoraLayer(model.model.layers[0].mlp.up_proj, LoraConfig(r=2))
    assert layer.lora_A.dtype == torch.float32 and layer.dense_weight().dtype == torch.float16
