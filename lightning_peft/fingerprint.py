"""A cheap fingerprint of the base model an adapter was trained on.

HF PEFT checks only shapes, so an adapter loaded onto another base of the same architecture silently produces
garbage. We record a hash of the architecture config and 16 values sampled from the input embedding (never
quantized, never adapted by the methods here), compared with a tolerance that survives a bf16/fp16 round trip
but not a different set of weights.

Under FSDP the embedding is sharded and no rank can read the samples alone; ``pin_fingerprint`` records the
fingerprint on the model before the wrap, and ``base_fingerprint`` returns it from then on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from transformers import PreTrainedModel

SAMPLES = 16
_PINNED = "_lightning_peft_fingerprint"
# Config keys that do not change which weights a model has (paths, dtypes, runtime switches).
_VOLATILE = {
    "_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version", "quantization_config",
    "use_cache", "architectures", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_attentions", "output_hidden_states", "return_dict", "problem_type", "id2label", "label2id",
    "_commit_hash", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "use_return_dict",
}


def _config_hash(model: PreTrainedModel) -> str:
    items = {k: v for k, v in model.config.to_dict().items()
             if k not in _VOLATILE and isinstance(v, (int, float, str, bool))}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _embedding_samples(model: PreTrainedModel) -> list[float]:
    weight = model.get_input_embeddings().weight
    rows, cols = weight.shape
    idx = torch.arange(SAMPLES)
    picked = weight.detach()[(idx * 7919) % rows, (idx * 104729) % cols]
    return [round(v, 6) for v in picked.float().cpu().tolist()]


def base_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    pinned = getattr(model, _PINNED, None)
    if pinned is not None:
        return pinned
    return {"config_sha256": _config_hash(model), "embedding_samples": _embedding_samples(model)}


def pin_fingerprint(model: PreTrainedModel, fingerprint: dict[str, Any] | None = None) -> None:
    """Record ``model``'s fingerprint now, while its weights are whole (before FSDP shards them), or the one
    ``fingerprint`` given (taken on the rank that holds the weights)."""
    setattr(model, _PINNED, base_fingerprint(model) if fingerprint is None else fingerprint)


def fingerprint_mismatch(model: PreTrainedModel, recorded: Any) -> str | None:
    """Why ``model`` is not the base ``recorded`` was taken from, or None when it is (or nothing was recorded)."""
    if not isinstance(recorded, dict):
        return None
    if recorded.get("config_sha256") not in (None, _config_hash(model)):
        return "its architecture config differs"
    saved = recorded.get("embedding_samples")
    if isinstance(saved, list) and len(saved) == SAMPLES and all(isinstance(v, (int, float)) for v in saved):
        now, then = torch.tensor(_embedding_samples(model)), torch.tensor(saved, dtype=torch.float32)
        tolerance = 1e-2 * then.abs().max().clamp_min(1e-6)
        if not torch.allclose(now, then, rtol=1e-2, atol=float(tolerance)):
            return "its input-embedding weights differ"
    return None
