"""Tiny random transformers models built in-process (no downloads), one per family we support."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")

VOCAB = 96

# family -> (config class, config kwargs, causal LM class, sequence classification class, LoRA targets)
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2), ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2), ["q_proj", "v_proj"]),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
             ["c_attn"]),
    "bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64), ["query", "value"]),
    "distilbert": ("DistilBertConfig", dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
                   ["q_lin", "v_lin"]),
}
# Sizes for 4-bit tests: on AVX-512 CPUs bitsandbytes miscomputes rows that are not a multiple of 64 values, and
# quantize_model keeps such layers dense (lightning_peft.quantization.cpu_4bit_row_length_works).
QUANTIZABLE = {"hidden_size": 64, "intermediate_size": 128}
CAUSAL = ["llama", "mistral", "qwen2", "gpt2"]
ENCODERS = ["bert", "distilbert"]


def launcher_free_env() -> dict[str, str]:
    """This process's environment without what an in-process distributed test leaves behind: with LOCAL_RANK set, a
    script launched from a test is taken by Lightning for a rank started by someone else, and waits forever for the
    other rank."""
    return {k: v for k, v in os.environ.items()
            if k not in {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}


def make_config(family: str, **overrides):
    name, kwargs, _ = FAMILIES[family]
    return getattr(transformers, name)(vocab_size=VOCAB, pad_token_id=0, **{**kwargs, **overrides})


def make_model(family: str, task: str = "causal", seed: int = 0, **overrides):
    """A tiny random model of ``family``: ``task`` is "causal" or "seq_cls" (2 labels)."""
    torch.manual_seed(seed)
    config = make_config(family, **overrides)
    auto = transformers.AutoModelForCausalLM if task == "causal" else transformers.AutoModelForSequenceClassification
    if task == "seq_cls":
        config.num_labels = 2
    return auto.from_config(config).eval()


def targets(family: str) -> list[str]:
    return FAMILIES[family][2]


def batch(size: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def llama():
    return make_model("llama")


def _lora(family: str):
    from lightning_peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=targets(family), init_lora_weights=False)


def _dora(family: str):
    from lightning_peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=targets(family), init_lora_weights=False, use_dora=True)


# IA3: attention targets scale their output, the feed-forward down projection scales its input.
IA3_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "gpt2": ["mlp.c_proj"],
                   "bert": ["output.dense"], "distilbert": ["lin2"]}


def _lora_fa(family: str):
    from lightning_peft import LoraFaConfig

    return LoraFaConfig(r=4, lora_alpha=8, target_modules=targets(family), init_lora_weights=False)


def _ia3(family: str):
    from lightning_peft import IA3Config

    ffn = IA3_FEEDFORWARD[family]
    return IA3Config(target_modules=targets(family) + ffn, feedforward_modules=ffn, init_ia3_weights=False)


def _bottleneck(family: str):
    from lightning_peft import BottleneckAdapterConfig

    return BottleneckAdapterConfig(reduction_factor=4, init_weights=False)


def _adalora(family: str):
    from lightning_peft import AdaLoraConfig

    return AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets(family), init_lora_weights=False)


def _prompt(family: str):
    from lightning_peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=3)


def _prefix(family: str):
    from lightning_peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)


# The shared checks (tests/test_methods.py) run for every entry: name -> how to build its config for a family,
# whether HF PEFT knows the method (interop is checked), and whether merging is exact or must be refused.
# ``families`` limits an entry to the families the method supports (default: all).
METHODS = {
    "lora": dict(make=_lora, peft=True, mergeable=True),
    "adalora": dict(make=_adalora, peft=True, mergeable=True),
    # Fewer families for these three keep the matrix fast; each still runs on a causal (llama plus GPT-2's
    # Conv1D) and an encoder family.
    "dora": dict(make=_dora, peft=True, mergeable=True, families=["llama", "gpt2", "bert"]),
    "lora_fa": dict(make=_lora_fa, peft=False, mergeable=True, families=["llama", "gpt2", "bert"]),
    "ia3": dict(make=_ia3, peft=True, mergeable=True, families=["llama", "gpt2", "distilbert"]),
    "bottleneck": dict(make=_bottleneck, peft=False, mergeable=False, families=["qwen2", "gpt2", "bert", "distilbert"]),
    "prompt": dict(make=_prompt, peft=True, mergeable=False),
    "prefix": dict(make=_prefix, peft=True, mergeable=False, families=[f for f in FAMILIES if f != "distilbert"]),
}

# Registered methods these shared checks leave out, each with the reason and where it is tested instead.
WITHOUT_RECIPE = {
    # No adapter layer and no HF PEFT type: the layer forward, merge and interop checks have nothing to act on; it
    # trains base weights under its own optimizer, which needs a module that configures none.
    "GALORE": "tests/test_galore.py",
}
