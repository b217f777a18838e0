"""Every field of HF PEFT's ``LoraConfig`` and what lightning_peft does with it: honoured, refused by name (saying
why and what to do instead), or ignored because it does not change the adapter's math.

This one table drives the refusals when a config is read (``AdapterConfig.from_dict`` for a field a config class
lacks, ``LoraConfig`` for an ``init_lora_weights`` value) and the table in docs/methods.md
(``docs/gen_methods_table.py``). A test checks that it names every field of the installed PEFT's ``LoraConfig``,
so a PEFT release that adds a field fails loudly instead of being silently dropped on load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["honoured", "refused", "ignored"]


@dataclasses.dataclass(frozen=True)
class PeftField:
    """One row: a field (or one value of it) and what happens to it."""

    name: str
    status: Status
    note: str
    """For a refused field: why, and what to do instead (the text of the ConfigError). Otherwise what it does."""
    test: str = ""
    """The test that shows it (``tests/FILE.py::NAME``)."""
    value: Any = None
    """For a row about one value of the field (``init_lora_weights="pissa"``); ``[n]`` stands for any integer."""
    from_model: bool = False
    """Every method reads it from the model (the layer type), so a config class without the field loses nothing."""

    def matches(self, value: Any) -> bool:
        if isinstance(self.value, str) and self.value.endswith("[n]") and isinstance(value, str):
            stem = self.value[:-3]
            return value.startswith(stem) and value[len(stem):].isdigit()
        return type(value) is type(self.value) and value == self.value


def _honoured(name: str, note: str, test: str, value: Any = None) -> PeftField:
    return PeftField(name, "honoured", note, test, value)


def _refused(name: str, note: str, value: Any = None) -> PeftField:
    return PeftField(name, "refused", note, "tests/test_lora_fields.py::test_refused_fields_are_named", value)


def _ignored(name: str, note: str) -> PeftField:
    return PeftField(name, "ignored", note, "tests/test_lora_fields.py::test_ignored_fields_load_without_a_warning")


_FIELDS_TEST = "tests/test_lora_fields.py"
_INTEROP = "tests/test_methods.py::test_hf_peft_loads_ours_and_we_load_hf_peft"
_INIT_INTEROP = f"{_FIELDS_TEST}::test_hf_peft_loads_ours_and_we_load_theirs"
_HEAD_INTEROP = "tests/test_peft_files.py::test_a_classification_head_is_trained_in_full_not_adapted_as_in_hf_peft"

LORA_FIELDS: tuple[PeftField, ...] = (
    _honoured("task_type", "Which model class HF PEFT wraps; SEQ_CLS also trains the classification head.", _INTEROP),
    _honoured("peft_type", "Selects the method (LORA, ADALORA, IA3, ...).",
              "tests/test_adapter_io.py::test_minimal_hf_peft_config_loads"),
    _ignored("auto_mapping", "HF PEFT's record of the model class when task_type is unset; the caller brings the "
                             "model."),
    _ignored("peft_version", "The PEFT version that wrote the file."),
    _honoured("base_model_name_or_path", "The base `lightning-peft merge` and `generate` load when given none.",
              "tests/test_peft_files.py::test_a_directory_base_is_recorded_as_loaded_and_merge_needs_no_base"),
    _ignored("revision", "A Hub revision of the base; nothing is downloaded, the caller brings the base."),
    _ignored("inference_mode", "Whether PEFT loads the adapter frozen; `load_adapter(is_trainable=...)` decides."),
    _honoured("r", "Rank of the update.", _INTEROP),
    _honoured("target_modules", "Names, path suffixes, a full-match regex or \"all-linear\".",
              "tests/test_lora.py::test_regex_and_exclude_modules"),
    _honoured("exclude_modules", "Modules never adapted, matched like target_modules.",
              "tests/test_lora.py::test_regex_and_exclude_modules"),
    _honoured("lora_alpha", "Scaling numerator.", _INTEROP),
    _honoured("lora_dropout", "Dropout on the adapter's input.",
              "tests/test_dora.py::test_dropout_matches_hf_peft_in_training"),
    PeftField("fan_in_fan_out", "honoured", "Read from the layer type (GPT-2's Conv1D) and written for PEFT.", _INTEROP,
              from_model=True),
    _honoured("bias", "\"none\", \"all\" or \"lora_only\" biases train and are saved.",
              "tests/test_lora.py::test_bias_modes_train_and_save_the_right_biases"),
    _honoured("use_rslora", "Scaling lora_alpha / sqrt(r).",
              "tests/test_dora.py::test_rslora_scales_by_alpha_over_sqrt_r_and_hf_peft_agrees"),
    _honoured("modules_to_save", "Modules trained in full and saved with the adapter; never adapted.",
              _HEAD_INTEROP),
    _honoured("init_lora_weights", "Kaiming-uniform A, zero B: starts as the base.", _INIT_INTEROP, True),
    _honoured("init_lora_weights", "Random A and B (for tests).", _INIT_INTEROP, False),
    _honoured("init_lora_weights", "Normal A (std 1/r), zero B.", _INIT_INTEROP, "gaussian"),
    _honoured("init_lora_weights", "PiSSA: A0, B0 from the top-r singular vectors of W; trains around "
                                   "W - scaling·B0A0. Loading derives A0, B0 from W again, as HF PEFT does.",
              _INIT_INTEROP, "pissa"),
    _honoured("init_lora_weights", "OLoRA: A and B from the QR decomposition of W, as PiSSA otherwise.",
              _INIT_INTEROP, "olora"),
    _refused("init_lora_weights", "init_lora_weights='pissa_niter_[n]' (fast SVD) is refused: its randomised SVD "
                                  "gives another base correction at every load, so a saved adapter is not reproduced "
                                  "(HF PEFT's own reload differs too). Use init_lora_weights='pissa' (exact SVD).",
             "pissa_niter_[n]"),
    *(_refused("init_lora_weights", f"init_lora_weights={name!r} ({what}) is not implemented by lightning_peft: train "
                                    f"with init_lora_weights=True, 'gaussian', 'pissa' or 'olora'.", name)
      for name, what in (("eva", "EVA, initialised from activations of data"), ("corda", "CorDA, from data"),
                         ("loftq", "LoftQ, which quantizes the base itself"),
                         ("orthogonal", "orthogonal A and B"),
                         ("mica", "MiCA, a frozen B from the smallest singular vectors"),
                         ("lora_ga", "LoRA-GA, from gradients of data"))),
    _honoured("layers_to_transform", "Only layers with these indices (in the first numbered module list) are adapted.",
              f"{_FIELDS_TEST}::test_layers_to_transform_selects_the_layers_hf_peft_selects"),
    _honoured("layers_pattern", "The module list whose index layers_to_transform reads (\"layers\", \"h\").",
              f"{_FIELDS_TEST}::test_layers_to_transform_selects_the_layers_hf_peft_selects"),
    _honoured("rank_pattern", "Per-module rank, by name or regex.", "tests/test_moe.py"),
    _honoured("alpha_pattern", "Per-module lora_alpha, by name or regex.", "tests/test_moe.py"),
    _refused("megatron_config", "megatron_config (LoRA on Megatron-LM's tensor-parallel layers) is not implemented "
                                "by lightning_peft: use a transformers model, with FSDP for large ones."),
    _ignored("megatron_core", "The Megatron module name, read only with megatron_config (refused)."),
    _honoured("trainable_token_indices", "Chosen rows of the input embedding (or of a named one) train; a tied "
                                         "output head follows them.",
              f"{_FIELDS_TEST}::test_trainable_tokens_load_both_ways_and_merge_exactly"),
    _refused("loftq_config", "loftq_config (LoftQ quantizes the base itself) is not implemented by lightning_peft: "
                             "train QLoRA with PeftStrategy."),
    _refused("eva_config", "eva_config (EVA, initialised from activations of data) is not implemented by "
                           "lightning_peft: remove it and train with init_lora_weights=True."),
    _refused("corda_config", "corda_config (CorDA, initialised from data) is not implemented by lightning_peft: "
                             "remove it and train with init_lora_weights=True or 'pissa'."),
    _refused("lora_ga_config", "lora_ga_config (LoRA-GA, initialised from gradients of data) is not implemented by "
                               "lightning_peft: remove it and train with init_lora_weights=True."),
    _honoured("use_dora", "DoRA: a trained magnitude per output row.",
              "tests/test_dora.py::test_file_holds_the_magnitude_under_peft_names"),
    _refused("velora_config", "velora_config (VeLoRA's compressed-activation backward) is not implemented by "
                              "lightning_peft. Its weights are plain LoRA: remove velora_config from "
                              "adapter_config.json to load them as LoRA."),
    _refused("alora_invocation_tokens", "alora_invocation_tokens (Activated LoRA, applied only from an invocation "
                                        "sequence on) is not implemented by lightning_peft; loading it as LoRA would "
                                        "apply the adapter to every token."),
    _refused("use_qalora", "use_qalora (QA-LoRA, for GPTQ bases) is not implemented by lightning_peft: train QLoRA "
                           "with PeftStrategy."),
    _ignored("qalora_group_size", "Read only with use_qalora (refused)."),
    _refused("monteclora_config", "monteclora_config (MonteCLoRA's sampled adapters) is not implemented by "
                                  "lightning_peft: remove it and train plain LoRA."),
    _refused("layer_replication", "layer_replication (stacking repeated base layers) is not implemented by "
                                  "lightning_peft; the adapter needs the replicated model."),
    _ignored("runtime_config", "Runtime options HF PEFT never saves."),
    _honoured("lora_bias", "A trained bias on lora_B (scaled like the update); merges into the base bias.",
              f"{_FIELDS_TEST}::test_lora_bias_trains_and_merges_exactly"),
    _honoured("target_parameters", "LoRA on nn.Parameters (MoE experts).", "tests/test_moe.py"),
    _refused("use_bdlora", "use_bdlora (block-diagonal LoRA for multi-LoRA serving) is not implemented by "
                           "lightning_peft: remove it and train plain LoRA."),
    _refused("arrow_config", "arrow_config (Arrow routing between several LoRA experts) is not implemented by "
                             "lightning_peft, which holds one adapter at a time."),
    _refused("kasa_config", "kasa_config (KaSA, which truncates the base weight's singular values) is not "
                            "implemented by lightning_peft: remove it and train plain LoRA."),
    _refused("ensure_weight_tying", "ensure_weight_tying=True (one adapter shared by a tied embedding and output "
                                    "head) is not implemented by lightning_peft, where each adapted layer has its own: "
                                    "remove it when neither the embedding nor the output head is adapted (then it "
                                    "changes nothing)."),
)
"""Every field of HF PEFT's ``LoraConfig``, in its order; ``init_lora_weights`` has a row per value."""

WHOLE_FIELDS: dict[str, PeftField] = {row.name: row for row in LORA_FIELDS if row.value is None}
"""The rows about a whole field, by name."""


def value_row(name: str, value: Any) -> PeftField | None:
    """The row about this value of field ``name``, if it has one."""
    return next((row for row in LORA_FIELDS if row.name == name and row.value is not None and row.matches(value)),
                None)
