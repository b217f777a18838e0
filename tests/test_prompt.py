"""Prompt tuning: the prompt goes in front of every input through the model the user already calls, the loss
ignores the virtual positions, text initialisation, generation, Lightning training and a 4-bit base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import QUANTIZABLE, VOCAB, batch, make_model
from lightning_helpers import CausalLM, loader, trainer
from lightning_peft import ConfigError, PeftCallback, PromptTuningConfig, load_adapter, save_adapter
from lightning_peft.surgery import adapter_layers, attach, detach

N = 3


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_virtual_tokens=0), dict(num_virtual_tokens=2.5), dict(prompt_tuning_init="ZEROS"),
     dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello"), dict(num_transformer_submodules=3)],
)
def test_bad_config_is_refused_at_construction(kwargs):
    with pytest.raises(ConfigError):
        PromptTuningConfig(**kwargs)


def test_unsupported_task_or_dimensions_are_refused_before_any_change(llama):
    before = {n: p.clone() for n, p in llama.named_parameters()}
    with pytest.raises(ConfigError, match="CAUSAL_LM.*SEQ_2_SEQ_LM"):
        attach(llama, PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ConfigError, match="token_dim"):
        attach(llama, PromptTuningConfig(num_virtual_tokens=N, token_dim=64))
    with pytest.raises(ConfigError, match="num_transformer_submodules"):  # 2 is for encoder-decoders
        attach(llama, PromptTuningConfig(num_virtual_tokens=N, num_transformer_submodules=2))
    assert not adapter_layers(llama) and not hasattr(llama, "prompt_encoder")
    assert all(torch.equal(before[n], p) and p.requires_grad for n, p in llama.named_parameters())


def test_prompt_is_prepended_and_loss_ignores_virtual_positions(llama):
    base_logits = llama(**batch()).logits
    attach(llama, PromptTuningConfig(num_virtual_tokens=N))
    ids = batch()["input_ids"]
    out = llama(input_ids=ids, attention_mask=batch()["attention_mask"], labels=ids)
    assert out.logits.shape == (2, N + ids.shape[1], VOCAB)
    assert not torch.allclose(out.logits[:, N:], base_logits, atol=1e-3)  # the prompt changes what follows
    # Every real token is a target, the first one predicted from the last virtual token; no virtual one is.
    predictions = out.logits[:, N - 1:-1].reshape(-1, VOCAB)
    torch.testing.assert_close(out.loss, F.cross_entropy(predictions, ids.reshape(-1)))
    torch.testing.assert_close(llama(ids).logits, out.logits)  # positional call, no mask: the same


def test_detach_restores_the_plain_model(llama):
    expected = llama(**batch()).logits
    attach(llama, PromptTuningConfig(num_virtual_tokens=N))
    detach(llama)
    assert not hasattr(llama, "prompt_encoder")
    torch.testing.assert_close(llama(**batch()).logits, expected, rtol=0, atol=0)


def test_token_type_ids_cover_the_virtual_tokens():
    model = make_model("bert", "seq_cls")
    attach(model, PromptTuningConfig(num_virtual_tokens=N))
    inputs = batch()
    with_types = model(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).logits
    torch.testing.assert_close(with_types, model(**inputs).logits)


def _tokenizer_dir(tmp_path):
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "classify", "this", "review"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(("n", "expected_ids"), [(5, [2, 3, 4, 2, 3]), (2, [2, 3])])
def test_text_init_uses_the_embeddings_of_the_text(tmp_path, llama, n, expected_ids):
    config = PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="classify this review",
                                tokenizer_name_or_path=_tokenizer_dir(tmp_path))
    (layer,) = attach(llama, config).values()
    weight = llama.get_input_embeddings().weight
    torch.testing.assert_close(layer.prompt_embeddings.detach(), weight[expected_ids].detach())


def test_text_initialised_adapter_loads_without_its_tokenizer(tmp_path, llama):
    import shutil

    tokenizer = _tokenizer_dir(tmp_path / "tokenizer")
    attach(llama, PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="TEXT", prompt_tuning_init_text="this",
                                     tokenizer_name_or_path=tokenizer))
    expected = llama(**batch()).logits
    save_adapter(llama, tmp_path / "adapter")
    shutil.rmtree(tokenizer)  # another machine: the tokenizer path is gone, the saved tensor is all that counts
    torch.testing.assert_close(load_adapter(make_model("llama"), tmp_path / "adapter")(**batch()).logits, expected)


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches_a_full_forward_per_token_and_hf_peft(tmp_path, family):
    model = make_model(family)
    model.generation_config.eos_token_id = None  # always generate every token, so the runs compare in full
    attach(model, PromptTuningConfig(num_virtual_tokens=N))
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


def test_trains_through_the_callback_with_adapter_only_checkpoints(tmp_path):
    module = CausalLM(lr=0.1)  # training_step calls self.model(input_ids=ids, labels=ids) unchanged
    trainer(callbacks=[PeftCallback(PromptTuningConfig(num_virtual_tokens=N)),
                       ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            enable_checkpointing=True, max_steps=6).fit(module, loader(n=4))
    assert module.losses[-1] < module.losses[0]
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert list(state) == ["model.prompt_encoder.prompt_embeddings"]
    module.model.eval()
    expected = module.model(**batch()).logits
    loaded = load_adapter(make_model("llama"), tmp_path / "last.ckpt", strict=True)
    torch.testing.assert_close(loaded(**batch()).logits, expected, rtol=0, atol=1e-6)


def test_trains_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.quantization import QuantizationConfig, quantize_model

    model = make_model("llama", **QUANTIZABLE).train()
    replaced = quantize_model(model, QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "cpu",
                              skip={"lm_head"})
    assert replaced
    (layer,) = attach(model, PromptTuningConfig(num_virtual_tokens=N)).values()
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


def test_sample_vocab_init_copies_rows_of_the_embedding(llama):
    (layer,) = attach(llama, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")).values()
    weight = llama.get_input_embeddings().weight.detach()
    for row in layer.prompt_embeddings.detach():
        assert (weight == row).all(dim=1).any()
