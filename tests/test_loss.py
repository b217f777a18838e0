"""causal_lm_loss against the model's own loss: values, gradients, chunking, post-processed logits, prompt tuning,
the statistics validation aggregates, and proof that no logits tensor covers every position."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import METHODS, QUANTIZABLE, VOCAB, batch, make_model

from lightning_peft import LoraConfig, QuantizationConfig, causal_lm_loss
from lightning_peft.errors import ConfigError
from lightning_peft.quantization import quantize_model, skip_paths
from lightning_peft.surgery import attach


def labelled(size: int = 3, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch whose labels are the inputs on the answer part only: a prompt of 5, one row without any label and
    one with a hole: 13 labelled targets of 33 after the shift."""
    data = batch(size, length, seed)
    labels = data["input_ids"].clone()
    labels[:, :5] = -100
    labels[1] = -100
    labels[2, 7] = -100
    return {**data, "labels": labels}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def assert_same_loss_and_gradients(model, data, chunk_sizes=(1, 4, 4096), atol=1e-5, rtol=1e-5):
    params = trainable(model)
    expected = model(**data).loss
    expected_grads = torch.autograd.grad(expected, params)
    for chunk_size in chunk_sizes:
        loss = causal_lm_loss(model, data, chunk_size=chunk_size)
        torch.testing.assert_close(loss, expected, atol=atol, rtol=rtol)
        for grad, expected_grad in zip(torch.autograd.grad(loss, params), expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_equals_the_models_loss_and_adapter_gradients(family, method):
    # Chunks of 1 and 4 rows, and one larger than the 13 labelled positions. Prompt tuning's logits include its
    # virtual tokens; prefix tuning's positions start after its prefix.
    model = make_model(family)  # eval mode: no dropout, so both passes draw the same
    attach(model, METHODS[method]["make"](family))
    assert_same_loss_and_gradients(model, labelled())


@pytest.mark.parametrize("name, config, option", [
    ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.5), "final_logit_softcapping"),
    ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=0.5), "final_logit_softcapping"),
    ("CohereConfig", dict(logit_scale=4.0), "logit_scale"),
    ("GraniteConfig", dict(logits_scaling=0.25), "logits_scaling"),
    ("RecurrentGemmaConfig", dict(logits_soft_cap=0.5, block_types=["recurrent", "attention"],
                                  attention_window_size=16), "logits_soft_cap"),
])
def test_families_that_post_process_their_logits(name, config, option):
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, name)(vocab_size=VOCAB, pad_token_id=0, **sizes, **config)).eval()
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
    data = labelled()
    assert_same_loss_and_gradients(model, data)
    assert model.config.to_dict()[option] is not None
    # The option matters at this size: the head's raw output is not the model's logits.
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits
        assert not torch.allclose(model.lm_head(model.model(input_ids=data["input_ids"])[0]), logits, atol=1e-2)


def test_lora_on_the_output_head_and_a_4bit_head():
    model = make_model("llama", **QUANTIZABLE)
    config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[])
    assert "lm_head" in quantize_model(model, config, "cpu", skip_paths(model, config))
    model.requires_grad_(False)
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert type(model.lm_head.base_layer).__name__ == "Linear4bit"
    assert_same_loss_and_gradients(model, labelled())


def test_a_bfloat16_model():
    model = make_model("llama").to(torch.bfloat16)
    attach(model, METHODS["lora"]["make"]("llama"))
    assert_same_loss_and_gradients(model, labelled(), chunk_sizes=(4, 4096), atol=2e-2, rtol=2e-2)


def test_position_ids_of_a_packed_batch_reach_the_model():
    model = make_model("llama")
    attach(model, METHODS["lora"]["make"]("llama"))
    data = labelled()
    data["position_ids"] = torch.tensor([list(range(6)) + list(range(6))] * 3)  # two examples per row
    assert_same_loss_and_gradients(model, data)
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    causal_lm_loss(model, data)
    assert torch.equal(seen[0]["position_ids"], data["position_ids"]) and "labels" not in seen[0]


def test_the_head_runs_only_on_labelled_rows_in_chunks():
    model = make_model("llama")
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    data = labelled(size=4, length=16)
    count = int((data["labels"][:, 1:] != -100).sum())
    rows: list[torch.Size] = []
    model.lm_head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = causal_lm_loss(model, data, chunk_size=5)
    forward_rows = list(rows)
    loss.backward()
    backward_rows = rows[len(forward_rows):]  # the backward recomputes each chunk's logits, one chunk at a time
    for calls in (forward_rows, backward_rows):
        assert all(len(shape) == 2 and shape[0] <= 5 for shape in calls)
        assert sum(shape[0] for shape in calls) == count == 32
    # Nothing of vocabulary width is kept for the backward: the chunks' logits are recomputed there.
    assert saved and not any(shape[-1] == VOCAB for shape in saved)


def test_a_frozen_head_gives_its_gradient_in_the_forward_a_chunk_at_a_time(monkeypatch):
    model = make_model("llama")
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    data = labelled(size=4, length=16)
    assert_same_loss_and_gradients(model, data, chunk_sizes=(1, 5, 4096))
    rows: list[torch.Size] = []
    linear = F.linear

    def recording(input, weight, bias=None):
        if weight is model.lm_head.weight:
            rows.append(input.shape)
        return linear(input, weight, bias)

    monkeypatch.setattr(F, "linear", recording)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = causal_lm_loss(model, data, chunk_size=5)
    calls = len(rows)
    loss.backward()
    assert len(rows) == calls  # no recompute in the backward
    assert all(len(shape) == 2 and shape[0] <= 5 for shape in rows) and sum(s[0] for s in rows) == 32
    assert saved and not any(shape[-1] == VOCAB for shape in saved)


def test_a_batch_without_labels_gives_zero_and_zero_gradients():
    model = make_model("llama")
    attach(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    data = {**batch(2, 8), "labels": torch.full((2, 8), -100)}
    assert model(**data).loss.isnan()  # what transformers gives
    stats = causal_lm_loss(model, data, return_stats=True)
    assert stats.loss.item() == 0.0 and stats.count.item() == 0 and stats.correct.item() == 0
    stats.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in trainable(model))  # every tensor, DDP waits for all


def test_stats_give_sum_count_and_correct_predictions():
    model = make_model("qwen2")
    attach(model, METHODS["prompt"]["make"]("qwen2"))
    data = labelled()
    with torch.no_grad():
        stats = causal_lm_loss(model, data, chunk_size=3, return_stats=True)
        logits = model(**{k: v for k, v in data.items() if k != "labels"}).logits[:, 3:-1]  # past the 3 virtual
    target = data["labels"][:, 1:]
    mask = target != -100
    torch.testing.assert_close(stats.loss_sum, F.cross_entropy(logits[mask], target[mask], reduction="sum"))
    assert stats.count.item() == 13
    assert stats.correct.item() == (logits[mask].argmax(-1) == target[mask]).sum().item()
    torch.testing.assert_close(stats.loss, stats.loss_sum / 13)


def test_a_model_it_cannot_reproduce_takes_the_full_path_and_says_so_once(caplog):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                        pad_token_id=0, output_router_logits=True)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    data = labelled()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            torch.testing.assert_close(causal_lm_loss(model, data), model(**data).loss)  # router loss included
    notes = [r.getMessage() for r in caplog.records if "causal_lm_loss" in r.getMessage()]
    assert len(notes) == 1 and "output_router_logits=True" in notes[0]
    stats = causal_lm_loss(model, data, return_stats=True)
    assert stats.count.item() == 13 and stats.loss_sum.item() / 13 < stats.loss.item()  # CE without the router


def test_bad_arguments_are_refused():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="chunk_size"):
        causal_lm_loss(model, labelled(), chunk_size=0)
    with pytest.raises(ConfigError, match="labels"):
        causal_lm_loss(model, batch())


def test_causal_lm_module_trains_on_labelled_rows_and_validates_from_the_same_pass(tmp_path, monkeypatch):
    import lightning as L
    from torch.utils.data import DataLoader
    from torchmetrics.text import Perplexity
    from tiny_assets import save_tiny_causal_lm

    from lightning_peft import CausalLMModule, PeftCallback

    module = CausalLMModule(str(save_tiny_causal_lm(tmp_path / "tiny")))
    module.configure_model()
    vocab = module.model.config.vocab_size
    batches = []
    for seed, prompt in ((1, 5), (2, 9)):  # 14 and 6 labelled targets: the mean must weigh tokens, not batches
        data = batch(2, 12, seed)
        data["input_ids"] %= vocab
        labels = data["input_ids"].clone()
        labels[:, :prompt] = -100
        batches.append({**data, "labels": labels})
    rows: list[int] = []
    linear = F.linear

    def recording(input, weight, bias=None):  # the frozen head runs as F.linear on its weight, not as a module call
        if weight is module.model.lm_head.weight:
            rows.append(input.shape[:-1].numel())
        return linear(input, weight, bias)

    monkeypatch.setattr(F, "linear", recording)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))])
    trainer.fit(module, DataLoader(batches[:1], batch_size=None))
    assert rows == [14]  # once, at the labelled rows only: the backward does not recompute the logits
    monkeypatch.undo()
    [metrics] = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    module.model.eval()
    reference, correct, total, count = Perplexity(ignore_index=-100), 0, 0.0, 0
    with torch.no_grad():
        for data in batches:
            logits = module.model(**data).logits[:, :-1]
            target = data["labels"][:, 1:]
            mask = target != -100
            reference.update(logits, target)
            correct += int((logits.argmax(-1) == target)[mask].sum())
            total += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            count += int(mask.sum())
    assert count == 20
    assert metrics["val_perplexity"] == pytest.approx(float(reference.compute()), rel=1e-5)
    assert metrics["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val_token_accuracy"] == pytest.approx(correct / count, rel=1e-6)


def test_dropout_in_the_head_draws_the_same_mask_when_the_backward_recomputes(monkeypatch):
    model = make_model("llama").train()
    attach(model, LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.5, init_lora_weights=False))
    data, params = labelled(), trainable(model)
    torch.manual_seed(3)
    recomputed = torch.autograd.grad(causal_lm_loss(model, data, chunk_size=4), params)
    monkeypatch.setattr("lightning_peft.loss.checkpoint", lambda function, *args, **kwargs: function(*args))
    torch.manual_seed(3)
    kept = torch.autograd.grad(causal_lm_loss(model, data, chunk_size=4), params)  # logits kept, not recomputed
    for grad, expected in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-6)
