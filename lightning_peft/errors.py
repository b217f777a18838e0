"""The error types this package raises on bad input.

Every one subclasses ``ValueError`` so callers that already catch it keep working, and ``PeftError`` so a caller
can tell our refusals from bugs. Each message names the offending file, module or field and the fix.
"""


class PeftError(ValueError):
    """Base class of every refusal raised by lightning_peft."""


class ConfigError(PeftError):
    """An adapter or quantization config holds a value that cannot work."""


class TargetModulesError(PeftError):
    """``target_modules`` (or ``modules_to_save``) matched nothing usable in the model."""


class AdapterFileError(PeftError):
    """An adapter directory, config file or tensor file is missing, truncated or malformed."""


class AdapterMismatchError(PeftError):
    """An adapter does not fit the model it is loaded into (missing module, wrong shape, other method)."""


class MergeError(PeftError):
    """The adapter cannot be folded into the base weights (prompt, prefix and bottleneck adapters)."""
