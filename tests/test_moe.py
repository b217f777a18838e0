"""LoRA on MoE models whose experts are fused 3-D parameters (transformers 5), on parameters in general
(``target_parameters``) and per-target ranks (``rank_pattern``, ``alpha_pattern``), with HF PEFT as the client on
the other side of every file."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from conftest import VOCAB, batch, make_model
from lightning_helpers import CausalLM, trainer
from lightning_peft import LoraConfig, PeftCallback, export_merged, load_adapter, merge_adapter, save_adapter
from lightning_peft.errors import ConfigError, TargetModulesError
from lightning_peft.methods.lora_parameters import ParameterLoraLayer
from lightning_peft.surgery import active_config, adapter_layers, attach

peft = pytest.importorskip("peft")

MOE = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=32)),
}
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
FUSED = ["mixtral", "qwen3_moe"]  # families whose experts HF PEFT's "all-linear" adapts
ALL_LINEAR = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
EXPERTS = dict(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj",
               "experts.down_proj"], init_lora_weights=False)


def moe_model(family: str, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    name, kwargs = MOE[family]
    config = getattr(transformers, name)(vocab_size=VOCAB, pad_token_id=0, **{**SIZES, **kwargs, **sizes})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def peft_warnings(load) -> list[str]:
    """What HF PEFT warns (warnings and log records) while ``load()`` runs."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("peft").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
    finally:
        logging.getLogger("peft").removeHandler(handler)
    return sorted({str(w.message) for w in caught if "/peft/" in w.filename} | set(records))


def tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(path / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("family", sorted(MOE))
def test_all_linear_adapts_what_hf_peft_adapts(tmp_path, family):
    """Same fields written, same tensors (keys and shapes) as HF PEFT's "all-linear": attention, the fused experts
    at twice the rank for the gate/up stack, the router; Qwen2-MoE, which HF PEFT leaves unconverted, linear only."""
    theirs = peft.get_peft_model(moe_model(family), peft.LoraConfig(**ALL_LINEAR))
    theirs.save_pretrained(tmp_path / "theirs")
    model = moe_model(family)
    attach(model, LoraConfig(**ALL_LINEAR))
    save_adapter(model, tmp_path / "ours")
    assert tensor_shapes(tmp_path / "ours") == tensor_shapes(tmp_path / "theirs")
    experts = [layer for layer in adapter_layers(model).values() if isinstance(layer, ParameterLoraLayer)]
    assert bool(experts) == (family in FUSED)
    if family in FUSED:  # the explicit targets HF PEFT writes for it (for the others it writes every layer's path)
        ours, written = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
        for key in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
            mine, peft_value = ours[key], written[key]
            assert (sorted(mine) if isinstance(mine, list) else mine) == (
                sorted(peft_value) if isinstance(peft_value, list) else peft_value), key


@pytest.mark.parametrize("family", FUSED)
def test_hf_peft_loads_our_moe_adapter_with_identical_logits(tmp_path, family):
    model = moe_model(family)
    attach(model, LoraConfig(**ALL_LINEAR))
    expected = model(**batch()).logits
    assert not torch.equal(expected, moe_model(family)(**batch()).logits)  # the adapter changes the output
    save_adapter(model, tmp_path / "ours")
    peft.get_peft_model(moe_model(family), peft.LoraConfig(**ALL_LINEAR)).save_pretrained(tmp_path / "theirs")

    loaded = []
    warned = peft_warnings(lambda: loaded.append(peft.PeftModel.from_pretrained(moe_model(family), tmp_path / "ours")))
    torch.testing.assert_close(loaded[0](**batch()).logits, expected, rtol=0, atol=0)
    # HF PEFT warns that the fused stack's rank_pattern key matched no *module*, on its own file alike.
    assert warned == peft_warnings(lambda: peft.PeftModel.from_pretrained(moe_model(family), tmp_path / "theirs"))


def test_experts_stored_in_out_interoperate_with_hf_peft(tmp_path):
    """GPT-OSS stores each expert as (in, out) (its experts module says ``is_transposed``): files go both ways."""
    def gpt_oss():
        torch.manual_seed(0)
        config = transformers.GptOssConfig(vocab_size=VOCAB, pad_token_id=0, hidden_size=32, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # its init leaves the experts at zero, where a wrong layout would go unnoticed
            for name, param in model.named_parameters():
                if ".experts." in name:
                    param.normal_(0, 0.05)
        return model

    assert gpt_oss().model.layers[0].mlp.experts.is_transposed
    kwargs = dict(EXPERTS, rank_pattern={"down_proj": 2})
    theirs = peft.get_peft_model(gpt_oss(), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(load_adapter(gpt_oss(), tmp_path / "theirs")(**batch()).logits,
                               theirs(**batch()).logits, rtol=0, atol=0)
    model = gpt_oss()
    attach(model, LoraConfig(**kwargs))
    save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(gpt_oss(), tmp_path / "ours")
    torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, rtol=0, atol=0)


def test_a_bfloat16_base_keeps_float32_expert_adapters_that_train():
    model = moe_model("mixtral").to(torch.bfloat16)
    attach(model, LoraConfig(**EXPERTS))
    experts = adapter_layers(model)["model.layers.0.mlp.experts"]
    assert {p.dtype for p in experts.adapter_parameters().values()} == {torch.float32}
    logits = model(**batch()).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.lora_A.values())


def test_hf_peft_loads_explicit_target_parameters_without_a_warning(tmp_path):
    model = moe_model("mixtral")
    attach(model, LoraConfig(**EXPERTS))
    save_adapter(model, tmp_path)
    loaded = []
    assert peft_warnings(lambda: loaded.append(peft.PeftModel.from_pretrained(moe_model("mixtral"), tmp_path))) == []
    torch.testing.assert_close(loaded[0](**batch()).logits, model(**batch()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FUSED)
def test_we_load_hf_peft_target_parameters_with_rank_and_alpha_patterns(tmp_path, family):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"],
                             rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                             alpha_pattern={"gate_up_proj": 3, "v_proj": 5})
    theirs = peft.get_peft_model(moe_model(family), config)
    theirs.save_pretrained(tmp_path)
    model = load_adapter(moe_model(family), tmp_path)
    # Equal up to float rounding: a linear layer adds scaling · B(A x) in one GEMM, HF PEFT scales after it, which
    # rounds differently unless the scaling is a power of two (it is not for alpha 5 over r 4).
    torch.testing.assert_close(model(**batch()).logits, theirs(**batch()).logits, rtol=0, atol=1e-6)
    layers = adapter_layers(model)
    experts = layers["model.layers.1.mlp.experts"]
    assert experts.r == {"gate_up_proj": 4, "down_proj": 2}
    assert experts.scaling == {"gate_up_proj": 3 / 4, "down_proj": 8 / 2}
    assert (layers["model.layers.1.self_attn.q_proj"].r, layers["model.layers.0.self_attn.q_proj"].r) == (6, 4)
    assert layers["model.layers.0.self_attn.v_proj"].scaling == 5 / 4


@pytest.mark.parametrize("family", FUSED)
def test_merge_is_exact_and_matches_hf_peft(tmp_path, family):
    model = moe_model(family)
    attach(model, LoraConfig(**ALL_LINEAR))
    expected = model(**batch()).logits
    save_adapter(model, tmp_path / "adapter")
    export_merged(model, tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(exported(**batch()).logits, expected, rtol=0, atol=1e-5)

    theirs = peft.PeftModel.from_pretrained(moe_model(family), tmp_path / "adapter").merge_and_unload()
    reference = theirs.state_dict()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() <= reference.keys()
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)

    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    layer = adapter_layers(model)["model.layers.0.mlp.experts"]
    layer.merge()
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)
    layer.unmerge()
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    merge_adapter(model)
    assert not adapter_layers(model)
    torch.testing.assert_close(model(**batch()).logits, expected, rtol=0, atol=1e-5)


def _repeated(steps: int):
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.randint(1, VOCAB, (1, 4, 16), generator=torch.Generator().manual_seed(0)).expand(steps, -1, -1)
    return DataLoader(TensorDataset(ids.reshape(-1, 16)), batch_size=4)


@pytest.mark.parametrize("family", FUSED)
def test_experts_train_under_peft_callback_and_round_trip(tmp_path, family):
    module = CausalLM(in_init=False, lr=1e-2)
    module.model = moe_model(family).train()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(callbacks=[PeftCallback(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), checkpoint],
            enable_checkpointing=True, max_steps=3).fit(module, _repeated(3))
    assert module.losses[-1] < module.losses[0], module.losses
    experts = adapter_layers(module.model)["model.layers.0.mlp.experts"]
    assert experts.lora_B["down_proj"].abs().sum() > 0  # B starts at zero: the experts' adapter trained
    assert all(p.requires_grad for p in experts.lora_A.values())
    module.model.eval()
    expected = module.model(**batch()).logits
    save_adapter(module.model, tmp_path / "adapter")
    for path in (tmp_path / "adapter", tmp_path / "last.ckpt"):  # the adapter directory and the Lightning checkpoint
        reloaded = load_adapter(moe_model(family), path)
        torch.testing.assert_close(reloaded(**batch()).logits, expected, rtol=0, atol=0)


def test_loraplus_speeds_up_the_experts_b_matrices_too():
    model = moe_model("mixtral")
    config = LoraConfig(target_modules="all-linear", loraplus_lr_ratio=16)
    attach(model, config)
    boosted = {id(p) for p, ratio in active_config(model).lr_ratios(model) if ratio == 16}
    experts = adapter_layers(model)["model.layers.0.mlp.experts"]
    assert {id(p) for p in experts.lora_B.values()} <= boosted
    assert not {id(p) for p in experts.lora_A.values()} & boosted


def test_qlora_on_the_attention_with_adapters_on_the_experts():
    """Under ``strategy="qlora"`` the attention goes to 4 bits (with its adapters) and the fused experts, which no
    Linear holds, stay dense with theirs; the loss falls."""
    bnb = pytest.importorskip("bitsandbytes")
    module = CausalLM(in_init=False, lr=1e-2)
    module.model = moe_model("mixtral", hidden_size=64, intermediate_size=128).train()
    trainer(strategy="qlora", callbacks=[PeftCallback(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))],
            max_steps=3).fit(module, _repeated(3))
    assert module.losses[-1] < module.losses[0], module.losses
    layers = adapter_layers(module.model)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].base_layer, bnb.nn.Linear4bit)
    experts = layers["model.layers.0.mlp.experts"]
    assert experts.lora_B["gate_up_proj"].abs().sum() > 0
    assert {p.dtype for p in experts.adapter_parameters().values()} == {torch.float32}


def test_rank_and_alpha_patterns_on_a_dense_model_interoperate_with_hf_peft(tmp_path):
    patterns = dict(rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2}, alpha_pattern={"v_proj": 3})
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = make_model("llama")
    attach(model, LoraConfig(**kwargs, **patterns))
    layers = adapter_layers(model)
    assert [layers[f"model.layers.{i}.self_attn.{n}"].r for i in (0, 1) for n in ("q_proj", "v_proj", "o_proj")] == [
        8, 4, 4, 8, 2, 4]
    assert layers["model.layers.1.self_attn.v_proj"].scaling == 3 / 2
    save_adapter(model, tmp_path / "ours")
    loaded = []
    assert peft_warnings(lambda: loaded.append(peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours"))
                         ) == []
    # Up to float rounding: scalings 3/2 and 8/8 are powers of two, but 8/4 · B(A x) in one GEMM or after it differ.
    torch.testing.assert_close(loaded[0](**batch()).logits, model(**batch()).logits, rtol=0, atol=1e-6)

    theirs = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**kwargs, **patterns))
    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = load_adapter(make_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(reloaded(**batch()).logits, theirs(**batch()).logits, rtol=0, atol=1e-6)
    assert active_config(reloaded).rank_pattern == patterns["rank_pattern"]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(target_parameters="experts.down_proj"), "target_parameters"),
    (dict(target_parameters=["experts.down_proj"], lora_dropout=0.1), "lora_dropout"),
    (dict(target_parameters=["experts.down_proj"], use_dora=True), "use_dora"),
    (dict(rank_pattern={"q_proj": 0}), "positive int"),
    (dict(alpha_pattern={"(": 2}), "regular expression"),
])
def test_bad_parameter_fields_are_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_all_linear_on_fused_experts_refuses_dropout_naming_the_fix():
    with pytest.raises(ConfigError, match="lora_dropout=0, or list target_modules"):
        attach(moe_model("mixtral"), LoraConfig(target_modules="all-linear", lora_dropout=0.1))


def test_target_parameters_that_match_nothing_list_the_candidates():
    with pytest.raises(TargetModulesError, match=r"experts\.gate_up_proj"):
        attach(moe_model("mixtral"), LoraConfig(target_modules=[], target_parameters=["experts.w1"]))


def test_a_parameter_of_a_layer_target_modules_adapts_is_refused():
    with pytest.raises(ConfigError, match="already adapts"):
        attach(make_model("llama"), LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))


def test_target_parameters_alone_leave_every_linear_layer_alone():
    model = moe_model("qwen3_moe")
    attach(model, LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    assert set(adapter_layers(model)) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert sum(p.requires_grad for p in model.parameters()) == 4
