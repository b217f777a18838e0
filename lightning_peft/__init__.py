"""Parameter-efficient fine-tuning of transformers models, the Lightning way."""

from lightning_peft.adapter_callback import SaveAdapterCallback
from lightning_peft.adapter_io import load_adapter, save_adapter
from lightning_peft.callback import PeftCallback
from lightning_peft.checkpoint import restore_adapter
from lightning_peft.data import ChatDataModule, Seq2SeqDataModule, TextClassificationDataModule
from lightning_peft.errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    MergeError,
    PeftError,
    TargetModulesError,
)
from lightning_peft.fsdp import PeftFSDPStrategy
from lightning_peft.loss import causal_lm_loss
from lightning_peft.merge import MergeCallback, export_merged, merge_adapter
from lightning_peft.methods import (
    AdaLoraConfig,
    BottleneckAdapterConfig,
    GaLoreConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from lightning_peft.methods.lora_fa import LoraFaConfig
from lightning_peft.modules import CausalLMModule, Seq2SeqLMModule, SequenceClassificationModule
from lightning_peft.named_adapters import NamedAdapters
from lightning_peft.quantization import QuantizationConfig
from lightning_peft.strategy import PeftDDPStrategy, PeftStrategy

__all__ = [
    "AdaLoraConfig",
    "AdapterFileError",
    "AdapterMismatchError",
    "BottleneckAdapterConfig",
    "CausalLMModule",
    "ChatDataModule",
    "ConfigError",
    "GaLoreConfig",
    "IA3Config",
    "LoraConfig",
    "LoraFaConfig",
    "MergeCallback",
    "MergeError",
    "NamedAdapters",
    "PeftCallback",
    "PeftDDPStrategy",
    "PeftError",
    "PeftFSDPStrategy",
    "PeftStrategy",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantizationConfig",
    "SaveAdapterCallback",
    "Seq2SeqDataModule",
    "Seq2SeqLMModule",
    "SequenceClassificationModule",
    "TargetModulesError",
    "TextClassificationDataModule",
    "causal_lm_loss",
    "export_merged",
    "load_adapter",
    "merge_adapter",
    "restore_adapter",
    "save_adapter",
]
