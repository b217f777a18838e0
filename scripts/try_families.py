"""LoRA on ``"all-linear"`` across transformers model families the test suite does not build, one markdown table.

    python scripts/try_families.py                 # every family below (about 2.5 minutes on 2 CPU cores)
    python scripts/try_families.py gemma2 whisper  # some of them

Each family is a tiny random model built in process from its config class (no download). On it, with
``LoraConfig(target_modules="all-linear", init_lora_weights=False)`` and the task type of its head:

- attach: the adapter goes on (how many layers it replaced);
- fwd+bwd: one training forward and backward: the loss is finite and every trainable tensor gets a nonzero gradient;
- ours -> PEFT: ``save_adapter``, then ``peft.PeftModel.from_pretrained`` on a fresh copy of the base gives the same
  logits (largest absolute difference; "warns" when HF PEFT warned while loading);
- PEFT -> ours: HF PEFT's own ``get_peft_model(..., "all-linear")`` saved, then ``load_adapter``: same logits;
- same tensors: both files hold the same tensor names and shapes (so both libraries adapt the same modules);
- merge: ``merge_adapter`` against the unmerged logits;
- NF4: the base quantized to 4 bits as ``PeftStrategy`` does (bitsandbytes on the CPU), LoRA on it, forward and
  backward (how many linear layers are 4-bit).

"ok" within 1e-5; otherwise the difference or the exception's first line. The families the tests already cover
(tests/conftest.py, test_packing.py, test_encoder_decoder.py, test_seq2seq.py, test_moe.py) are left out.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes
import peft
import torch
import transformers
from safetensors.torch import load_file

from lightning_peft import LoraConfig, QuantizationConfig, load_adapter, merge_adapter, save_adapter
from lightning_peft.quantization import quantize_model, skip_paths
from lightning_peft.surgery import attach, modules_to_save_paths, resolve_config

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)

VOCAB = 128
TOLERANCE = 1e-5
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Sizes whose rows are multiples of 64 values, so bitsandbytes' CPU kernels quantize every layer (see
# lightning_peft.quantization.cpu_4bit_row_length_works).
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
SEQ2SEQ = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_start_token_id=2)
EXPERTS = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
               first_k_dense_replace=1)

# model_type -> (head: "causal", "seq_cls", "seq2seq" or "speech", config kwargs besides VOCAB and IDS)
FAMILIES = {
    "phi3": ("causal", LLAMA_LIKE),
    "phi": ("causal", LLAMA_LIKE),
    "gemma": ("causal", dict(LLAMA_LIKE, head_dim=16)),
    "gemma2": ("causal", dict(LLAMA_LIKE, head_dim=16)),
    "gemma3_text": ("causal", dict(LLAMA_LIKE, head_dim=16)),
    "qwen3": ("causal", dict(LLAMA_LIKE, head_dim=16)),
    "smollm3": ("causal", LLAMA_LIKE),
    "olmo": ("causal", LLAMA_LIKE),
    "olmo2": ("causal", LLAMA_LIKE),
    "stablelm": ("causal", LLAMA_LIKE),
    "cohere": ("causal", LLAMA_LIKE),
    "granite": ("causal", LLAMA_LIKE),
    "starcoder2": ("causal", LLAMA_LIKE),
    "falcon": ("causal", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "gpt_neox": ("causal", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "gptj": ("causal", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
    "codegen": ("causal", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64)),
    "gpt_bigcode": ("causal", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "bloom": ("causal", dict(hidden_size=64, n_layer=2, n_head=4)),
    "opt": ("causal", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=64)),
    "mpt": ("causal", dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)),
    "olmoe": ("causal", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "phimoe": ("causal", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "glm4_moe": ("causal", dict(LLAMA_LIKE, head_dim=16, **EXPERTS)),
    "deepseek_v3": ("causal", dict(LLAMA_LIKE, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **EXPERTS)),
    "roberta": ("seq_cls", dict(ENCODER, max_position_embeddings=66, pad_token_id=1)),
    "deberta-v2": ("seq_cls", ENCODER),
    "electra": ("seq_cls", dict(ENCODER, embedding_size=64)),
    "albert": ("seq_cls", dict(ENCODER, embedding_size=64)),
    "modernbert": ("seq_cls", dict(ENCODER, cls_token_id=1, sep_token_id=2, local_attention=16)),
    "mbart": ("seq2seq", dict(SEQ2SEQ, max_position_embeddings=64)),
    "pegasus": ("seq2seq", dict(SEQ2SEQ, max_position_embeddings=64)),
    "marian": ("seq2seq", dict(SEQ2SEQ, max_position_embeddings=64)),
    "whisper": ("speech", dict(SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=32)),
}
AUTO = {"causal": transformers.AutoModelForCausalLM, "seq_cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM, "speech": transformers.AutoModelForSpeechSeq2Seq}
# Whisper takes no task type: HF PEFT's SEQ_2_SEQ_LM wrapper passes input_ids, which Whisper's forward lacks.
TASK_TYPE = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "speech": None}
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
COLUMNS = ["attach", "fwd+bwd", "ours -> PEFT", "PEFT -> ours", "same tensors", "merge", "NF4 fwd+bwd"]


def build(family: str) -> transformers.PreTrainedModel:
    """The same tiny random model every call (seeded)."""
    head, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **{**IDS, **kwargs})
    if head == "seq_cls":
        config.num_labels = 2
    return AUTO[head].from_config(config).eval()


def inputs(family: str, labels: bool = False) -> dict[str, torch.Tensor]:
    head, kwargs = FAMILIES[family]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    decoder_ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    if head == "speech":
        batch = {"input_features": torch.randn(2, kwargs["num_mel_bins"], 2 * kwargs["max_source_positions"],
                                               generator=g), "decoder_input_ids": decoder_ids}
    else:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if head == "seq2seq":
            batch["decoder_input_ids"] = decoder_ids
    if labels:
        batch["labels"] = {"causal": ids, "seq_cls": torch.tensor([0, 1])}.get(head, decoder_ids)
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    return model(**inputs(family)).logits


def compare(got: torch.Tensor, expected: torch.Tensor) -> str:
    if got.shape != expected.shape:
        return f"FAIL shapes {tuple(got.shape)} vs {tuple(expected.shape)}"
    diff = (got - expected).abs().max().item()
    if diff == 0:
        return "ok (exact)"
    return f"ok ({diff:.0e})" if diff <= TOLERANCE else f"FAIL max diff {diff:.1e}"


def train_step(model: torch.nn.Module, family: str) -> str:
    """One forward and backward: the loss is finite and every trainable tensor has a nonzero gradient."""
    model.train()
    loss = model(**inputs(family, labels=True)).loss
    loss.backward()
    model.eval()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    zero = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    if not math.isfinite(loss.item()):
        return f"FAIL loss {loss.item()}"
    if zero:
        return f"FAIL {len(zero)}/{len(trainable)} tensors without gradient: {', '.join(zero[:3])}"
    return f"ok ({len(trainable)} tensors)"


class Warnings:
    """Every Python warning raised inside the block, and HF PEFT's logged ones (the block only loads an adapter)."""

    def __enter__(self) -> list[str]:
        self.caught: list[str] = []
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self.caught.append(record.getMessage())
        logging.getLogger("peft").addHandler(self._handler)
        self._warnings = warnings.catch_warnings(record=True)
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self.caught

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(*exc)
        logging.getLogger("peft").removeHandler(self._handler)
        # Deprecations between the libraries (transformers' FutureWarnings that PEFT triggers) say nothing of the file.
        self.caught += [str(w.message) for w in self._records
                        if not issubclass(w.category, (DeprecationWarning, FutureWarning))]


def with_warnings(result: str, caught: list[str]) -> str:
    if not caught:
        return result
    first = caught[0].splitlines()[0][:100]
    return f"{result}, warns: {first}" + (f" (+{len(caught) - 1})" if len(caught) > 1 else "")


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


def same_tensors(ours: Path, theirs: Path) -> str:
    a, b = tensor_shapes(ours), tensor_shapes(theirs)
    modules = {k.split(".lora_")[0] for k in a if ".lora_" in k}
    if a == b:
        return f"ok ({len(modules)} modules)"
    only_ours, only_theirs = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    shapes = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    parts = [f"only ours: {only_ours[:2]}" if only_ours else "",
             f"only PEFT's: {only_theirs[:2]}" if only_theirs else "", f"other shapes: {shapes[:2]}" if shapes else ""]
    return "FAIL " + "; ".join(p for p in parts if p)


def failure(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return f"FAIL {type(err).__name__}: {line[:160]}"


def run_family(family: str, work: Path) -> tuple[str, dict[str, str]]:
    """The model class and one cell per column; a check whose prerequisite failed reads "-"."""
    head, _ = FAMILIES[family]
    cells = dict.fromkeys(COLUMNS, "-")
    config = LoraConfig(task_type=TASK_TYPE[head], **LORA)
    peft_config = peft.LoraConfig(task_type=TASK_TYPE[head], **LORA)
    try:
        model = build(family)
    except Exception as err:  # noqa: BLE001 - the table says what went wrong
        return "-", {**cells, "attach": f"FAIL build: {failure(err)}"}
    name = type(model).__name__

    def check(column: str, fn) -> bool:
        try:
            cells[column] = fn()
        except Exception as err:  # noqa: BLE001
            cells[column] = failure(err)
            if os.environ.get("TRY_FAMILIES_TRACEBACK"):
                traceback.print_exc()
        return not cells[column].startswith("FAIL")

    if not check("attach", lambda: f"ok ({len(attach(model, config))} layers)"):
        return name, cells
    check("fwd+bwd", lambda: train_step(model, family))
    ours, theirs = work / family / "ours", work / family / "theirs"

    def ours_to_peft() -> str:
        save_adapter(model, ours)
        base = build(family)
        with Warnings() as caught:
            loaded = peft.PeftModel.from_pretrained(base, ours).eval()
        return with_warnings(compare(logits(loaded, family), logits(model, family)), caught)

    def peft_to_ours() -> str:
        reference = peft.get_peft_model(build(family), peft_config).eval()
        reference.save_pretrained(theirs)
        base = build(family)
        with Warnings() as caught:
            loaded = load_adapter(base, theirs)
        return with_warnings(compare(logits(loaded, family), logits(reference, family)), caught)

    def merge() -> str:
        unmerged = logits(model, family)
        return compare(logits(merge_adapter(model), family), unmerged)

    check("ours -> PEFT", ours_to_peft)
    check("PEFT -> ours", peft_to_ours)
    if (ours / "adapter_model.safetensors").exists() and (theirs / "adapter_model.safetensors").exists():
        check("same tensors", lambda: same_tensors(ours, theirs))
    check("merge", merge)

    def nf4() -> str:
        base = build(family)
        quantization = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers the CPU kernels cannot take stay dense; counted below
            keep = set(modules_to_save_paths(base, resolve_config(base, config)))  # as PeftStrategy does
            quantized = quantize_model(base, quantization, "cpu", skip_paths(base, quantization, keep))
        linear = sum(isinstance(m, (torch.nn.Linear, bitsandbytes.nn.Linear4bit)) for m in base.modules())
        attach(base, config)
        return f"{train_step(base, family)}, {len(quantized)}/{linear} linear 4-bit"

    check("NF4 fwd+bwd", nf4)
    return name, cells


def main(argv: list[str]) -> None:
    families = argv or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    versions = (f"lightning_peft {importlib.metadata.version('lightning-peft')}, "
                f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
                f"bitsandbytes {bitsandbytes.__version__}")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for family in families:
            t0 = time.perf_counter()
            name, cells = run_family(family, Path(work))
            rows.append((family, name, cells))
            print(f"{family}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"<!-- {versions}; {time.perf_counter() - start:.0f} s -->\n")
    print("| family | class | " + " | ".join(COLUMNS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |")
    for family, name, cells in rows:
        text = [cells[c].replace("|", "\\|") for c in COLUMNS]
        print(f"| {family} | {name} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
