"""Parameter-efficient fine-tuning of transformers models, the Lightning way."""

from lightning_peft.adapter_io import load_adapter, save_adapter
from lightning_peft.callback import PeftCallback
from lightning_peft.errors import (
    AdapterFileError,
    AdapterMismatchError,
    ConfigError,
    MergeError,
    PeftError,
    TargetModulesError,
)
from lightning_peft.merge import MergeCallback, export_merged, merge_adapter
from lightning_peft.methods import LoraConfig

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "ConfigError",
    "LoraConfig",
    "MergeCallback",
    "MergeError",
    "PeftCallback",
    "PeftError",
    "TargetModulesError",
    "export_merged",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
]
