"""The built-in modules under a quantizing strategy: the base is created on the meta device and streamed in, tensor
by tensor, from safetensors or GGUF, and comes out equal to loading it whole with ``from_pretrained`` and then
quantizing it (same quantized weights, same outputs, same new head, same generation config); ``from_pretrained``
is never called. Without quantization, or without a trainer, they load it with ``from_pretrained`` as before."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from conftest import QUANTIZABLE, batch, make_model
from lightning_helpers import trainer
from lightning_peft import (
    CausalLMModule,
    LoraConfig,
    PeftCallback,
    PeftStrategy,
    QuantizationConfig,
    SequenceClassificationModule,
)
from lightning_peft.quantization import is_quantized
from lightning_peft.streaming import meta_tensor_names
from tiny_assets import tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:optim='paged_adamw_32bit'")
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="bfloat16")
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def write_gguf(model: transformers.LlamaForCausalLM, path) -> None:
    """``model`` as llama.cpp's converter writes it: GGUF tensor names, q and k rows permuted for its rotary layout,
    matrices in Q8_0 blocks, the output head left out when tied to the embedding."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, suffix = key.rsplit(".", 1)
        data = tensor.float().numpy()
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(f"{names.get_name(module)}.{suffix}", gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama saved as bfloat16 safetensors (two shards, a generation config of its own) and as GGUF with a
    tied output head, each with a tokenizer; and the model the GGUF file was written from."""
    root = tmp_path_factory.mktemp("bases")
    model = make_model("llama", **QUANTIZABLE).to(torch.bfloat16)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(root / "safetensors", max_shard_size="100KB")
    tied = make_model("llama", seed=1, tie_word_embeddings=True, **QUANTIZABLE)
    (root / "gguf").mkdir()
    write_gguf(tied, root / "gguf" / "tiny.gguf")
    for directory in ("safetensors", "gguf"):
        tiny_tokenizer().save_pretrained(root / directory)
    return {"safetensors": root / "safetensors", "gguf": root / "gguf", "original": tied}


def qlora() -> PeftStrategy:
    return PeftStrategy(quantization=QuantizationConfig(**NF4))


def set_up(module, on_meta: bool):
    """What ``Trainer.fit`` does up to the adapter under QLoRA: attach the trainer, build the model (if not built
    yet), run ``PeftCallback.setup``."""
    fit = trainer(strategy=qlora())
    module.trainer = fit
    module.configure_model()
    created = [*module.model.parameters(), *module.model.buffers()]
    assert all(t.device.type == "meta" for t in created) if on_meta else not meta_tensor_names(module.model)
    PeftCallback(LoraConfig(**LORA)).setup(fit, module, "fit")
    return module


def streamed(module, monkeypatch):
    """``module`` set up with its base streamed in, ``from_pretrained`` unable to materialize it."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError("from_pretrained would materialize the full-precision base")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
        torch.manual_seed(0)  # the same random draws (a new head, the adapter) as the other side
        return set_up(module, on_meta=True)


def loaded_whole(module):
    """``module``'s base loaded whole with ``from_pretrained`` (how it builds it without a trainer), then quantized
    in place by the same strategy."""
    torch.manual_seed(0)
    module.configure_model()
    return set_up(module, on_meta=False)


def assert_same_model(streamed, loaded) -> None:
    streamed_state, loaded_state = streamed.model.state_dict(), loaded.model.state_dict()
    assert streamed_state.keys() == loaded_state.keys()
    for key, value in loaded_state.items():
        assert torch.equal(streamed_state[key], value), key
    assert sum(is_quantized(m) for m in streamed.model.modules()) == 14  # every q, k, v, o, gate, up, down
    torch.testing.assert_close(streamed.model(**batch()).logits, loaded.model(**batch()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_causal_lm_base_is_streamed_in_and_equals_loading_it_whole_then_quantizing(monkeypatch, checkpoints,
                                                                                    source):
    gguf_file = "tiny.gguf" if source == "gguf" else None
    kwargs = dict(model_name_or_path=str(checkpoints[source]), gguf_file=gguf_file, tokenizer=str(checkpoints[source]),
                  dtype="bfloat16")
    module = streamed(CausalLMModule(**kwargs), monkeypatch)
    loaded = loaded_whole(CausalLMModule(**kwargs))
    assert_same_model(module, loaded)
    model = module.model
    assert model.generation_config.to_dict() == loaded.model.generation_config.to_dict()
    assert model.generation_config.max_new_tokens == (None if gguf_file else 7)
    assert model.config.pad_token_id == loaded.model.config.pad_token_id is not None
    assert model.lm_head.weight is model.model.embed_tokens.weight if gguf_file else not is_quantized(model.lm_head)
    assert model.training


def test_gguf_written_here_loads_in_transformers_as_the_model_it_was_written_from(checkpoints):
    """The GGUF test file is a faithful one (names, q/k permutation, tying): transformers' own loader gets the
    original model back, to Q8_0 rounding."""
    module = CausalLMModule(str(checkpoints["gguf"]), gguf_file="tiny.gguf", tokenizer=str(checkpoints["gguf"]))
    module.configure_model()
    original = checkpoints["original"]
    assert module.model.config.tie_word_embeddings
    torch.testing.assert_close(module.model(**batch()).logits, original(**batch()).logits, rtol=0, atol=0.02)


def test_sequence_classification_head_is_initialized_as_from_pretrained_does(monkeypatch, checkpoints):
    """A causal checkpoint has no ``score`` head: both ways it is drawn by the model's own initializer."""
    kwargs = dict(model_name_or_path=str(checkpoints["safetensors"]), num_labels=3, dtype="bfloat16")
    module = streamed(SequenceClassificationModule(**kwargs), monkeypatch)
    assert_same_model(module, loaded_whole(SequenceClassificationModule(**kwargs)))
    heads = [t for k, t in module.model.state_dict().items() if "score" in k]
    assert heads and all(t.shape[0] == 3 and 0.01 < t.float().std() < 0.03 for t in heads)  # initializer_range 0.02


def test_without_quantization_or_without_a_trainer_the_base_is_loaded_whole(checkpoints):
    module = CausalLMModule(str(checkpoints["safetensors"]))
    module.trainer = trainer(strategy=PeftStrategy())
    module.configure_model()
    assert not meta_tensor_names(module.model)
    alone = CausalLMModule(str(checkpoints["safetensors"]))
    alone.configure_model()
    assert not meta_tensor_names(alone.model)
