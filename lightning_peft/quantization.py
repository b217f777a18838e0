"""4-bit and 8-bit base weights with bitsandbytes: the config and three verbs.

- ``quantize(linear, config, device)``: the bitsandbytes layer (``Linear4bit`` or ``Linear8bitLt``) that takes
  ``linear``'s place. A ``linear`` on the meta device gives an empty layer, filled later by ``load_weight``.
- ``load_weight(layer, tensor, device)``: quantize one full-precision weight into ``layer`` on ``device``
  (how streaming loads a checkpoint tensor by tensor).
- ``dequantize(layer)``: the layer's weight as a dense ``(out, in)`` tensor (merges, exports).

bitsandbytes is imported inside the functions that need it, so ``import lightning_peft`` never loads it; a module
can only be a bitsandbytes layer if bitsandbytes was imported, which is what ``is_quantized`` relies on.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Literal

import torch
from torch import nn

from lightning_peft.errors import ConfigError
from lightning_peft.targets import match_module_name, output_head_paths, set_submodule
from lightning_peft.validation import check_field_types, check_module_patterns

_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_DTYPES = {"uint8": torch.uint8, **_FLOAT_DTYPES}
# Heads never quantized when llm_int8_skip_modules is not given (besides the output embedding).
DEFAULT_SKIP = ["classifier", "score"]


def _dtype_name(value: object, field: str, allowed: dict[str, torch.dtype]) -> str:
    name = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else value
    if name not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {sorted(allowed)}.")
    return name


@dataclasses.dataclass
class QuantizationConfig:
    """How the frozen base is quantized; field names and defaults are those of transformers' ``BitsAndBytesConfig``.

    Example (QLoRA as in the paper)::

        QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype="bfloat16")
    """

    load_in_4bit: bool = False
    """Replace every linear layer (but the skipped ones) by a 4-bit ``Linear4bit``."""
    load_in_8bit: bool = False
    """Replace them by LLM.int8() ``Linear8bitLt`` layers instead."""
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = "fp4"
    """``"nf4"`` (NormalFloat, the QLoRA choice for normally distributed weights) or ``"fp4"``."""
    bnb_4bit_use_double_quant: bool = False
    """Quantize the per-block scales too: about 4.1 instead of 4.5 bits per weight."""
    bnb_4bit_compute_dtype: str | torch.dtype = "float32"
    """dtype of the matmuls of 4-bit layers and of the LoRA path on them: ``float32``, ``bfloat16`` or ``float16``."""
    bnb_4bit_quant_storage: str | torch.dtype = "uint8"
    """dtype the packed 4-bit data is stored as; a float dtype lets FSDP flatten it with other tensors."""
    llm_int8_skip_modules: list[str] | None = None
    """Linear layers kept in full precision, by name or path suffix. ``None``: the output head (``lm_head``) and
    classification heads (``classifier``, ``score``). Modules the adapter trains in full are always skipped."""
    llm_int8_threshold: float = 6.0
    """8-bit only: input columns with larger values are multiplied in 16-bit (LLM.int8() outliers); 0 disables."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both set; choose one.")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError("Set load_in_4bit=True or load_in_8bit=True (pass quantization=None for none).")
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ConfigError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}.")
        self.bnb_4bit_compute_dtype = _dtype_name(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", _FLOAT_DTYPES)
        self.bnb_4bit_quant_storage = _dtype_name(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage",
                                                  _STORAGE_DTYPES)
        check_module_patterns("llm_int8_skip_modules", self.llm_int8_skip_modules)
        if isinstance(self.llm_int8_skip_modules, str):
            raise ConfigError(f"llm_int8_skip_modules must be a list of names, got {self.llm_int8_skip_modules!r}.")
        if not isinstance(self.llm_int8_threshold, (int, float)) or self.llm_int8_threshold < 0:
            raise ConfigError(f"llm_int8_threshold must be a number >= 0, got {self.llm_int8_threshold!r}.")

    @property
    def compute_dtype(self) -> torch.dtype:
        return _FLOAT_DTYPES[self.bnb_4bit_compute_dtype]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a 4-bit layer multiplies in (None for others: they compute in their input's dtype)."""
    return getattr(module, "compute_dtype", None) if is_quantized(module) else None


def quantize(linear: nn.Linear, config: QuantizationConfig, device: torch.device | str) -> nn.Module:
    """The bitsandbytes layer replacing ``linear``, its weight quantized on ``device`` (bias kept as is).

    A ``linear`` on the meta device gives a layer whose weight is still to be loaded with ``load_weight``.
    """
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if config.load_in_4bit:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=config.compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
            quant_storage=_STORAGE_DTYPES[config.bnb_4bit_quant_storage], device="meta",
        )
        # On AVX-512 BF16 CPUs bitsandbytes repacks the weight at the first no-grad evaluation forward and then
        # multiplies in bfloat16 whatever the compute dtype: evaluation would disagree with training, with a
        # reloaded adapter and with merges. Dequantize-and-multiply in the compute dtype everywhere instead.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=config.llm_int8_threshold, device="meta")
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    if linear.weight.device.type != "meta":
        load_weight(layer, linear.weight.detach(), device)
    return layer


def load_weight(layer: nn.Module, tensor: torch.Tensor, device: torch.device | str) -> None:
    """Quantize the full-precision ``(out, in)`` weight ``tensor`` into ``layer`` on ``device``."""
    import bitsandbytes as bnb

    expected = (layer.out_features, layer.in_features)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"weight of shape {tuple(tensor.shape)} does not fit a {expected} quantized layer.")
    if isinstance(layer, bnb.nn.Linear4bit):
        # Quantizing from the compute dtype makes dequantization return exactly what the forward multiplies by.
        data = tensor.to(layer.compute_dtype or tensor.dtype)
        layer.weight = bnb.nn.Params4bit(
            data, requires_grad=False, compress_statistics=layer.weight.compress_statistics,
            quant_type=layer.weight.quant_type, quant_storage=layer.quant_storage, module=layer,
        ).to(device)  # Params4bit quantizes when first moved to a real device
    else:
        # Int8Params quantizes when moved off the CPU's full-precision copy.
        layer.weight = bnb.nn.Int8Params(tensor.cpu(), requires_grad=False, has_fp16_weights=False).to(device)


@torch.no_grad()
def dequantize(layer: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes layer as a dense ``(out, in)`` tensor: in the compute dtype for 4-bit (what
    its forward multiplies by), in float32 for 8-bit (int8 times its row scale is exact there)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # Some CPUs repack 4-bit weights for a faster inference kernel; undo it (non-destructively).
            data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
        dense = bnb_f.dequantize_4bit(data, state).reshape(layer.out_features, layer.in_features)
        return dense.to(dequantized_dtype(layer))
    # LLM.int8(): int8 rows scaled by their absmax / 127. The scales move to layer.state after the first forward.
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb_f.int8_vectorwise_dequant(weight.data, scales).to(dequantized_dtype(layer))


def dequantized_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype ``dequantize(layer)`` returns, known without dequantizing (export plans)."""
    if getattr(layer, "compute_dtype", None) is not None:  # 4-bit
        return layer.compute_dtype
    state = getattr(layer.weight, "quant_state", None)
    return state.dtype if state is not None else torch.float32


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (out, in) and ``bias``, built without a random init."""
    linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return linear


def dequantize_module(layer: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` a bitsandbytes layer stands for."""
    return dense_linear(dequantize(layer), layer.bias)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


def upcast_for_stability(model: nn.Module, trained: list[str] = ()) -> list[nn.Module]:
    """Norms compute in float32 for stability next to a low-precision base (as PEFT's
    ``prepare_model_for_kbit_training``), but hand their output on in the dtype they received; the modules at
    the paths ``trained`` (trained in full, e.g. a classification head) hold float32 weights and cast their inputs
    to their weight's dtype. Returns the modules it holds in float32, which a precision plugin's conversion must
    leave so (``PeftStrategyMixin.model_to_device``).

    A float32 RMSNorm weight would otherwise promote its output, and with it the whole residual stream, to float32:
    twice the activation memory of a bfloat16 model, and a float32 copy of every layer left unquantized (the output
    head) to accept it. The 4-bit layers compute in their compute dtype either way. The hooks go on whatever the
    weights' dtype now: a float32 checkpoint trained under ``precision="bf16-true"`` needs them once the rest is
    converted.
    """
    kept = []
    for module in model.modules():
        if is_norm(module) and any(p.is_floating_point() for p in module.parameters()):
            module.float()
            module.register_forward_hook(_output_in_input_dtype)
            kept.append(module)
    for path in trained:
        module = model.get_submodule(path)
        module.float()
        module.register_forward_pre_hook(_inputs_in_weight_dtype)
        kept.append(module)
    return kept


def _inputs_in_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return args
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _output_in_input_dtype(module: nn.Module, args: tuple, output: object) -> object:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def skip_paths(model: nn.Module, config: QuantizationConfig, keep: set[str] = frozenset()) -> set[str]:
    """Paths of linear layers left in full precision: the configured ones (or the heads), ``keep`` and every
    module under it, and layers whose weight is shared with another module (tied embeddings)."""
    names = DEFAULT_SKIP if config.llm_int8_skip_modules is None else config.llm_int8_skip_modules
    skip = set(output_head_paths(model)) if config.llm_int8_skip_modules is None else set()
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        if match_module_name(path, names) or any(path == k or path.startswith(k + ".") for k in keep):
            skip.add(path)
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(path)
    skip.update(p for paths in owners.values() if len(paths) > 1 for p in paths)
    return skip


@functools.cache
def cpu_4bit_row_length_works(in_features: int, quant_type: str, dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' CPU 4-bit kernels dequantize rows of ``in_features`` values correctly.

    Its native AVX-512 kernel scales every block by the first block's scale when a row's length is not a multiple
    of the 64-value block (bitsandbytes 0.50 on AVX-512 CPUs), which silently corrupts the layer's output. A probe
    of 8 such rows with growing magnitudes tells, once per row length.
    """
    import bitsandbytes.functional as bnb_f

    if in_features % 64 == 0:
        return True
    probe = torch.linspace(0.01, 1.0, 8 * in_features).reshape(8, in_features).to(dtype)
    data, state = bnb_f.quantize_4bit(probe, quant_type=quant_type)
    error = (bnb_f.dequantize_4bit(data, state).float() - probe.float()).abs().max()
    return bool(error < 0.2)


def quantize_model(model: nn.Module, config: QuantizationConfig, device: torch.device | str,
                   skip: set[str]) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` not in ``skip`` by its quantized layer, one at a time (so only
    one full-precision weight is copied at once); returns the replaced paths.

    On a CPU whose bitsandbytes kernels mishandle a layer's row length (``cpu_4bit_row_length_works``), that layer
    stays in full precision, with a warning: a slower layer rather than a wrong one. So do subclasses of
    ``nn.Linear`` (Falcon's ``FalconLinear``, PhiMoE's router), with a warning: their own forward may do more than a
    quantized layer would (the router returns a tuple), and the run should not believe its base is smaller than it is.
    """
    targets = [path for path, module in model.named_modules()
               if type(module) is nn.Linear and path not in skip]
    subclassed = [path for path, module in model.named_modules()
                  if isinstance(module, nn.Linear) and type(module) is not nn.Linear and path not in skip]
    if subclassed:
        kinds = sorted({type(model.get_submodule(path)).__name__ for path in subclassed})
        warnings.warn(
            f"{len(subclassed)} linear layer(s) of {', '.join(kinds)} (subclasses of nn.Linear with a forward of their "
            f"own) stay in full precision: {', '.join(subclassed[:4])}{', ...' if len(subclassed) > 4 else ''}. "
            f"Only plain nn.Linear layers are quantized; budget memory for these at full precision.", stacklevel=2)
    if config.load_in_4bit and torch.device(device).type == "cpu":
        broken = [path for path in targets if not cpu_4bit_row_length_works(
            model.get_submodule(path).in_features, config.bnb_4bit_quant_type, config.compute_dtype)]
        if broken:
            warnings.warn(
                f"bitsandbytes' 4-bit CPU kernels on this machine miscompute layers whose input size is not a "
                f"multiple of 64, so {len(broken)} layer(s) stay in full precision: {', '.join(broken[:4])}"
                f"{', ...' if len(broken) > 4 else ''}. They are quantized on a GPU.", stacklevel=2)
            targets = [path for path in targets if path not in broken]
    for path in targets:
        set_submodule(model, path, quantize(model.get_submodule(path), config, device))
    return targets
