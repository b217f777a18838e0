"""The adapter methods, one module each; importing this package imports every one of them, and each method's
config class registers itself by HF PEFT ``peft_type`` (``CONFIG_CLASSES``). Adding a method is adding a module
here."""

import importlib
import pkgutil

from lightning_peft.methods.base import CONFIG_CLASSES, AdapterConfig, AdapterLayer, config_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from lightning_peft.methods.adalora import AdaLoraConfig  # noqa: E402 (public names, re-exported)
from lightning_peft.methods.bottleneck import BottleneckAdapterConfig  # noqa: E402
from lightning_peft.methods.galore import GaLoreConfig  # noqa: E402
from lightning_peft.methods.ia3 import IA3Config  # noqa: E402
from lightning_peft.methods.lora import LoraConfig, LoraLayer  # noqa: E402
from lightning_peft.methods.prefix import PrefixTuningConfig  # noqa: E402
from lightning_peft.methods.prompt import PromptTuningConfig  # noqa: E402

__all__ = [
    "CONFIG_CLASSES",
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterLayer",
    "BottleneckAdapterConfig",
    "GaLoreConfig",
    "IA3Config",
    "LoraConfig",
    "LoraLayer",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "config_class",
]
