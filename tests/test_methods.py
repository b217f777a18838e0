"""The checks every method passes, on every model family: trains only the adapter, round-trips through
save_adapter/load_adapter, loads in HF PEFT where PEFT knows it, and merges exactly or refuses clearly."""

from __future__ import annotations

import pytest
import torch

from conftest import CAUSAL, ENCODERS, FAMILIES, METHODS, WITHOUT_RECIPE, batch, make_model
from lightning_peft import MergeError, load_adapter, merge_adapter, save_adapter
from lightning_peft.methods import CONFIG_CLASSES
from lightning_peft.surgery import adapter_layers, attach

CASES = [(m, f, t) for m in METHODS for f in METHODS[m].get("families", FAMILIES)
         for t in (["causal"] if f in CAUSAL else []) + ["seq_cls"]]


def _adapted(method: str, family: str, task: str):
    model = make_model(family, task)
    attach(model, METHODS[method]["make"](family))
    return model


@pytest.mark.parametrize(("method", "family", "task"), CASES)
def test_only_adapter_trains_and_base_is_untouched(method, family, task):
    model = _adapted(method, family, task)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(frozen) > len(trainable)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all params: the common mistake
    model.train()
    for _ in range(2):
        out = model(**batch(), labels=batch()["input_ids"] if task == "causal" else torch.tensor([0, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
            assert param.grad is None


@pytest.mark.parametrize(("method", "family", "task"), CASES)
def test_save_load_round_trip(tmp_path, method, family, task):
    model = _adapted(method, family, task)
    expected = model(**batch()).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = make_model(family, task)
    base_logits = fresh(**batch()).logits  # prompt tuning adds virtual positions: other shape, also a change
    assert base_logits.shape != expected.shape or not torch.allclose(base_logits, expected)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(loaded(**batch()).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "family", "task"), [c for c in CASES if METHODS[c[0]]["peft"]])
def test_hf_peft_loads_ours_and_we_load_hf_peft(tmp_path, method, family, task):
    peft = pytest.importorskip("peft")
    model = _adapted(method, family, task)
    expected = model(**batch()).logits
    save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_model(family, task), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(**batch()).logits, expected, rtol=0, atol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make_model(family, task), tmp_path / "theirs")
    torch.testing.assert_close(back(**batch()).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("method", "family", "task"), CASES)
def test_merge_is_exact_or_refused(method, family, task):
    model = _adapted(method, family, task)
    expected = model(**batch()).logits
    if not METHODS[method]["mergeable"]:
        with pytest.raises(MergeError, match="cannot|Cannot"):
            merge_adapter(model)
        assert adapter_layers(model)
        return
    merged = merge_adapter(model)
    assert not adapter_layers(merged)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batch()).logits, expected, rtol=0, atol=1e-5)


def test_encoder_families_are_covered():
    assert set(ENCODERS) <= set(FAMILIES)


def test_every_registered_method_has_a_recipe_that_matches_its_class():
    """A method added to lightning_peft/methods/ without a recipe in conftest.METHODS would skip every check above."""
    configs = {m: METHODS[m]["make"]("llama") for m in METHODS}
    assert {type(c).peft_type for c in configs.values()} == set(CONFIG_CLASSES) - set(WITHOUT_RECIPE)
    for method, config in configs.items():
        assert METHODS[method]["peft"] == type(config).known_to_hf_peft, method
