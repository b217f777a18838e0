"""Prefix tuning: keys and values through transformers' cache, grouped-query shapes, the projected form HF PEFT
saves versus the full state our checkpoints keep, generation, refusals and a 4-bit base."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from conftest import QUANTIZABLE, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import ConfigError, PeftCallback, PrefixTuningConfig, load_adapter, save_adapter
from lightning_peft.surgery import active_config, adapter_layers, attach

N = 3
PROJECTED = dict(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16)


def test_bad_config_is_refused_at_construction():
    for kwargs in (dict(num_virtual_tokens=-1), dict(encoder_hidden_size=0), dict(prefix_projection="yes")):
        with pytest.raises(ConfigError):
            PrefixTuningConfig(**kwargs)


def test_model_without_past_key_values_is_refused_unchanged():
    model = make_model("distilbert", "seq_cls")
    with pytest.raises(ConfigError, match="past_key_values.*DistilBertModel"):
        attach(model, PrefixTuningConfig(num_virtual_tokens=N))
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_grouped_query_attention_sizes_the_prefix_by_key_value_heads(tmp_path):
    model = make_model("llama")  # 4 query heads, 2 key-value heads of 8: keys and values are 16 wide
    attach(model, PrefixTuningConfig(**PROJECTED))
    config = active_config(model)
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    save_adapter(model, tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (N, 2 * 2 * 16)


def test_prefix_changes_attention_and_explicit_positions_agree(llama):
    base = llama(**batch()).logits
    attach(llama, PrefixTuningConfig(num_virtual_tokens=N))
    out = llama(**batch()).logits
    assert out.shape == base.shape and not torch.allclose(out, base, atol=1e-3)
    positions = torch.arange(batch()["input_ids"].shape[1]).expand(2, -1)
    torch.testing.assert_close(llama(**batch(), position_ids=positions).logits, out)


def test_saved_directory_holds_the_projected_prefix_and_loads_without_the_mlp(tmp_path, llama):
    (layer,) = attach(llama, PrefixTuningConfig(**PROJECTED)).values()
    expected = llama(**batch()).logits
    save_adapter(llama, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"]
    torch.testing.assert_close(tensors["prompt_embeddings"], layer.prefix().detach())
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["prefix_projection"] is True and written["encoder_hidden_size"] == 16
    assert written["task_type"] == "CAUSAL_LM" and written["num_transformer_submodules"] == 1

    loaded = load_adapter(make_model("llama"), tmp_path)
    assert active_config(loaded).prefix_projection is False  # the saved tensor is the prefix itself
    torch.testing.assert_close(loaded(**batch()).logits, expected, rtol=0, atol=1e-6)


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches_a_full_forward_per_token_and_hf_peft(tmp_path, family):
    model = make_model(family)
    model.generation_config.eos_token_id = None  # always generate every token, so the runs compare in full
    attach(model, PrefixTuningConfig(**PROJECTED))
    ids = batch()["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, _greedy_without_cache(model, ids, 5))
    peft = pytest.importorskip("peft")
    save_adapter(model, tmp_path)
    base = make_model(family)
    base.generation_config.eos_token_id = None
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    inputs = batch()
    inputs["attention_mask"][0, :4] = 0  # left padding
    ours = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_gradient_checkpointing_is_refused_with_the_reason(llama):
    attach(llama, PrefixTuningConfig(num_virtual_tokens=N))
    llama.gradient_checkpointing_enable()
    llama.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        llama(**batch())


def test_checkpoints_keep_the_mlp_and_resume_exactly(tmp_path):
    config = PrefixTuningConfig(**PROJECTED)
    torch.manual_seed(0)
    straight = CausalLM(lr=0.05)
    trainer(callbacks=[PeftCallback(config)], max_steps=6).fit(straight, loader(n=12))
    assert straight.losses[-1] < straight.losses[0]

    torch.manual_seed(0)
    first = CausalLM(lr=0.05)
    trainer(callbacks=[PeftCallback(config), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)],
            enable_checkpointing=True, max_steps=3).fit(first, loader(n=12))
    path = tmp_path / "epoch=0-step=3.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    assert sorted(state) == [f"model.prompt_encoder.{n}" for n in (
        "embedding.weight", "transform.0.bias", "transform.0.weight", "transform.2.bias", "transform.2.weight")]
    torch.manual_seed(0)
    second = CausalLM(lr=0.05)
    trainer(callbacks=[PeftCallback(config)], max_steps=6).fit(second, loader(n=12), ckpt_path=path)
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(straight.losses[3:]), rtol=1e-6, atol=1e-6)

    first.model.eval()
    loaded = load_adapter(make_model("llama"), path, strict=True)
    assert active_config(loaded).prefix_projection is True
    torch.testing.assert_close(loaded(**batch()).logits, first.model(**batch()).logits, rtol=0, atol=1e-6)


def test_trains_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization import QuantizationConfig, quantize_model

    model = make_model("llama", **QUANTIZABLE).train()
    assert quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "cpu",
                          skip={"lm_head"})
    (layer,) = attach(model, PrefixTuningConfig(num_virtual_tokens=N)).values()
    optimizer = torch.optim.AdamW([layer.prompt_embeddings], lr=0.1)
    ids = batch()["input_ids"]
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _mistral_with_prefix(window):
    model = make_model("mistral", sliding_window=window)
    model.generation_config.eos_token_id = None
    torch.manual_seed(7)
    attach(model, PrefixTuningConfig(**PROJECTED))
    return model


def test_sliding_window_acts_within_the_window_and_is_refused_beyond_it():
    windowed, full = _mistral_with_prefix(8), _mistral_with_prefix(None)
    ids = batch(length=8)["input_ids"]
    # 3 virtual tokens + 5 tokens fill the window of 8: every token still attends to the prefix.
    torch.testing.assert_close(windowed(input_ids=ids[:, :5]).logits, full(input_ids=ids[:, :5]).logits)
    with pytest.raises(ConfigError, match=r"sliding_window=8.*9 positions.*within 5 tokens.*sliding_window = None"):
        windowed(input_ids=ids[:, :6])
    prompt = {"input_ids": ids[:, :3], "attention_mask": torch.ones_like(ids[:, :3]), "do_sample": False,
              "pad_token_id": 0}
    # The last of 3 new tokens is produced by the forward at position 8; a fourth would need position 9.
    assert torch.equal(windowed.generate(**prompt, max_new_tokens=3), full.generate(**prompt, max_new_tokens=3))
    with pytest.raises(ConfigError, match="sliding_window=8"):
        windowed.generate(**prompt, max_new_tokens=4)
    windowed.config.sliding_window = None  # the fix the error names
    torch.testing.assert_close(windowed(input_ids=ids).logits, full(input_ids=ids).logits)


def test_a_cache_filled_without_the_prefix_is_refused_and_ours_continues(llama):
    import copy

    ids = batch()["input_ids"]
    foreign = llama(input_ids=ids[:, :6], use_cache=True).past_key_values  # the bare base filled it
    attach(llama, PrefixTuningConfig(**PROJECTED))
    with pytest.raises(ConfigError, match="already holds 6 positions that prefix tuning did not fill"):
        llama(input_ids=ids[:, 6:7], past_key_values=foreign)
    with torch.no_grad():  # inference, where a filled cache is copied to serve several continuations
        expected = llama(input_ids=ids[:, :7]).logits[:, -1]
        ours = llama(input_ids=ids[:, :6], use_cache=True).past_key_values
        for cache in (copy.deepcopy(ours), ours):
            step = llama(input_ids=ids[:, 6:7], past_key_values=cache).logits[:, -1]
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
