"""The adapter methods, one module each, and the registry from HF PEFT's ``peft_type`` to config class."""

from lightning_peft.errors import ConfigError
from lightning_peft.methods.adalora import AdaLoraConfig
from lightning_peft.methods.base import AdapterConfig, AdapterLayer
from lightning_peft.methods.bottleneck import BottleneckAdapterConfig
from lightning_peft.methods.galore import GaLoreConfig
from lightning_peft.methods.ia3 import IA3Config
from lightning_peft.methods.lora import LoraConfig, LoraLayer
from lightning_peft.methods.prefix import PrefixTuningConfig
from lightning_peft.methods.prompt import PromptTuningConfig

CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.peft_type: cls
    for cls in (LoraConfig, AdaLoraConfig, IA3Config, BottleneckAdapterConfig, PromptTuningConfig, PrefixTuningConfig,
                GaLoreConfig)
}


def config_class(peft_type: object, source: str = "adapter config") -> type[AdapterConfig]:
    """The config class for ``peft_type``; refuses a missing or unknown type, naming the ones we support."""
    if not isinstance(peft_type, str) or peft_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: peft_type={peft_type!r} is not supported; expected one of {sorted(CONFIG_CLASSES)}."
        )
    return CONFIG_CLASSES[peft_type]


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
