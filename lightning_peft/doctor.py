"""The doctor: the PEFT mistakes everyone makes, found before (or at the very start of) training.

Each check is one function over a ``Run`` (the adapted model and what the run will feed it) that returns
``Finding``s: what is wrong, why it matters, and the exact YAML change that fixes it. ``lightning-peft check``
runs them on a model built on the meta device (no weights read); ``PeftCallback`` runs the same ones at the start
of ``fit`` on the real model, logs warnings and stops on errors with a ``ConfigError`` before any step.

Two checks need a training step and run from ``PeftCallback`` only: the first backward must reach an adapter
parameter (``first_step_findings``), and the first batch must not train on its prompt (``label_findings``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections import defaultdict
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.data import IGNORE_INDEX, check_packing, render_chat
from lightning_peft.errors import ConfigError
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.quantization import QuantizationConfig, cpu_4bit_row_length_works, skip_paths
from lightning_peft.surgery import active_config, adapter_layers, count_parameters
from lightning_peft.targets import match_module_name

Level = Literal["error", "warning"]

# The usual learning rates of each method (peft_type): outside them LoRA barely moves, or diverges.
LR_RANGES = {
    "LORA": (1e-5, 3e-3), "ADALORA": (1e-5, 3e-3), "BOTTLENECK": (1e-5, 3e-3),
    "IA3": (1e-4, 3e-2), "PROMPT_TUNING": (1e-4, 1.0), "PREFIX_TUNING": (1e-4, 3e-2),
}

# target_modules that select attention only / the MLP only, per model family (checked against tiny models of each
# family in tests/test_doctor.py). A list entry matches a module path or its last components; a string is a regex
# over the whole path (BERT's MLP output and its attention output are both `output.dense`).
_LLAMA_LIKE = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
FAMILY_TARGETS: dict[str, dict[str, list[str] | str]] = {
    **{family: _LLAMA_LIKE for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "smollm3")},
    "phi3": {"attention": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]},
    "bert": {"attention": ["query", "key", "value", "attention.output.dense"],
             "mlp": r".*\.layer\.\d+\.(intermediate|output)\.dense"},
    "distilbert": {"attention": ["q_lin", "k_lin", "v_lin", "out_lin"], "mlp": ["lin1", "lin2"]},
}
_FAMILY_NAMES = {"llama": "LLaMA", "gpt2": "GPT-2", "bert": "BERT", "distilbert": "DistilBERT", "phi3": "Phi-3"}

TRAINABLE_SHARE = (1e-4, 0.10)  # below: too little to learn anything; above: close to a full fine-tune
ALPHA_RATIO = (0.5, 8.0)  # lora_alpha / r (sqrt(r) with rsLoRA); 1-4 is usual
SHORT_RUN_EXAMPLES = 200  # fewer training examples than this: dropout slows learning more than it regularises
TRUNCATED_SHARE = 0.5  # more responses cut by max_length than this is an error of the config


@dataclasses.dataclass(frozen=True)
class Finding:
    """One mistake: its level (``error`` stops ``fit`` and makes ``check`` exit 1), what, why and the fix."""

    level: Level
    what: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.what}\n    why: {self.why}\n    fix: {self.fix}"


@dataclasses.dataclass
class Run:
    """What the checks look at. ``model`` is the transformers model, adapted (``attach`` ran) or, when the targets
    matched nothing, as it was; ``adapter`` is the config asked for."""

    model: nn.Module
    adapter: AdapterConfig
    learning_rate: float | None = None
    optimizer: str = "AdamW"
    """The optimizer's class name; the learning-rate ranges hold for Adam-like optimizers only."""
    tokenizer: Any = None
    datamodule: Any = None
    quantization: QuantizationConfig | None = None
    device_type: str = "cpu"
    conversations: list[list[dict[str, str]]] | None = None


# --- targets -------------------------------------------------------------------------------------------------------


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _base_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths as the user's target names see them: an adapter's ``base_layer`` stands at its layer's path."""
    paths = {}
    for path, module in model.named_modules():
        if path and ".base_layer" not in f".{path}" and not type(module).__module__.startswith("lightning_peft"):
            paths[path] = module
    for path, layer in adapter_layers(model).items():
        base = getattr(layer, "base_layer", None)
        if base is not None:
            paths[path] = base
    return paths


def target_findings(run: Run) -> list[Finding]:
    """Names in ``target_modules`` that match no module (a typo, or a name from another model family), while the
    others match: the run then silently adapts fewer layers than asked."""
    targets = getattr(run.adapter, "target_modules", None)
    if not isinstance(targets, (list, tuple)):
        return []
    paths = _base_paths(run.model)
    leaves = sorted({p.rsplit(".", 1)[-1] for p, m in paths.items() if _adaptable(m)})
    family = getattr(getattr(run.model, "config", None), "model_type", None)
    missing = [name for name in targets if not any(match_module_name(p, [name]) for p in paths)]
    findings = []
    for name in missing:
        owner = next((f for f, table in FAMILY_TARGETS.items() if f != family
                      and any(isinstance(v, list) and name in v for v in table.values())), None)
        own = FAMILY_TARGETS.get(family)
        if owner is not None and own is not None:
            what = (f"target_modules names {name!r}, a {_FAMILY_NAMES.get(owner, owner)} layer name; this model is "
                    f"{_FAMILY_NAMES.get(family, family)}, which has no such module.")
            replacement = own["attention"]
        else:
            close = difflib.get_close_matches(name.rsplit(".", 1)[-1], leaves, n=1)
            what = f"target_modules names {name!r}, which matches no module of {type(run.model).__name__}."
            replacement = close
        kept = [t for t in targets if t not in missing]
        fixed = list(dict.fromkeys(kept + replacement))
        value = f"[{', '.join(fixed)}]" if fixed else "all-linear"
        findings.append(Finding(
            "error", what,
            "A name that matches nothing is skipped while the others are adapted, so the run trains fewer layers "
            "than the config says, silently." if len(missing) < len(targets) else
            "No target matches: no adapter can be injected.",
            f"target_modules: {value}   (this model's linear layers: {', '.join(leaves)})"))
    return findings


def partial_block_findings(run: Run) -> list[Finding]:
    """Targets that adapt a layer name in some transformer blocks but not in others (a regex or a path that names
    block numbers): usually a mistake, the adapter then skips most of the depth. Not when ``layers_to_transform``
    says which blocks: that is the plan."""
    if getattr(active_config(run.model), "layers_to_transform", None) not in (None, []):
        return []
    by_leaf: dict[str, set[int]] = defaultdict(set)
    for path in adapter_layers(run.model):
        match = re.search(r"\.(\d+)\.(.+)$", path)
        if match:
            by_leaf[match.group(2)].add(int(match.group(1)))
    findings = []
    for leaf, adapted in sorted(by_leaf.items()):
        pattern = re.compile(r"\.(\d+)\." + re.escape(leaf) + "$")
        present = {int(m.group(1)) for p in _base_paths(run.model) if (m := pattern.search(p))}
        if adapted < present:
            findings.append(Finding(
                "warning", f"{leaf} is adapted in {len(adapted)} of the {len(present)} blocks "
                           f"({_ranges(sorted(adapted))}).",
                "An adapter in only some blocks sees only part of the network; unless that is the plan, it learns "
                "less than the same rank everywhere.",
                f"target_modules: [{leaf.rsplit('.', 1)[-1]}]   (a name, not a path or regex with block numbers)"))
    return findings


def wrapped_findings(model: nn.Module) -> list[Finding]:
    """A model already wrapped by HF PEFT (``get_peft_model``): it would train PEFT's adapter, not ours."""
    wrapped = [type(m).__name__ for m in model.modules() if type(m).__module__.split(".")[0] == "peft"]
    if not wrapped:
        return []
    return [Finding(
        "error", f"The model is already wrapped by HF PEFT ({wrapped[0]}, {len(wrapped)} PEFT modules).",
        "PeftCallback would put its adapter into PEFT's wrapper, and the run would train a different set of "
        "weights than either config says.",
        "Hand the plain transformers model to the LightningModule (drop get_peft_model), and set the adapter in "
        "trainer.callbacks: [{class_path: lightning_peft.PeftCallback, init_args: {adapter: ...}}].")]


# --- sizes and hyper-parameters ------------------------------------------------------------------------------------


def share_findings(run: Run) -> list[Finding]:
    trainable, total = count_parameters(run.model)
    if not adapter_layers(run.model) or total == 0:
        return []
    share = trainable / total
    low, high = TRAINABLE_SHARE
    if share < low:
        return [Finding("warning", f"Only {share:.4%} of the parameters train ({trainable:,} of {total:,}).",
                        "So small an adapter rarely learns a new task; the loss will barely move.",
                        "target_modules: all-linear   (or raise r)")]
    if share > high and not run.adapter.trains_base_weights:
        return [Finding("warning", f"{share:.1%} of the parameters train ({trainable:,} of {total:,}).",
                        "That is close to a full fine-tune: memory, checkpoints and forgetting grow with it; "
                        "usually modules_to_save holds the embeddings or bias is 'all'.",
                        "modules_to_save: null, bias: none, or a smaller r")]
    return []


def learning_rate_findings(run: Run) -> list[Finding]:
    lr = run.learning_rate
    if lr is None or run.adapter.peft_type not in LR_RANGES or "adam" not in run.optimizer.lower():
        return []
    low, high = LR_RANGES[run.adapter.peft_type]
    if lr < low:
        return [Finding("warning", f"learning_rate={lr:g} is below {run.adapter.peft_type}'s usual range "
                                   f"[{low:g}, {high:g}].",
                        "The adapter starts at zero (LoRA's B): at this rate it stays there, and the run ends where "
                        "it began.", f"model.init_args.learning_rate: {low * 10:g}")]
    if lr > 10 * high:
        return [Finding("error", f"learning_rate={lr:g} is over ten times {run.adapter.peft_type}'s usual maximum "
                                 f"{high:g}.", "Updates this large typically make the loss spike or diverge "
                                               "within the first steps.",
                        f"model.init_args.learning_rate: {high / 3:g}")]
    if lr > high:
        return [Finding("warning", f"learning_rate={lr:g} is above {run.adapter.peft_type}'s usual range "
                                   f"[{low:g}, {high:g}].", "The loss is likely to spike or diverge.",
                        f"model.init_args.learning_rate: {high / 3:g}")]
    return []


def alpha_findings(run: Run) -> list[Finding]:
    r, alpha = getattr(run.adapter, "r", None), getattr(run.adapter, "lora_alpha", None)
    if r is None or alpha is None or run.adapter.peft_type != "LORA":
        return []
    rslora = getattr(run.adapter, "use_rslora", False)
    ratio = alpha / (r ** 0.5 if rslora else r)
    low, high = ALPHA_RATIO
    if low <= ratio <= high:
        return []
    over = "sqrt(r)" if rslora else "r"
    return [Finding("warning", f"lora_alpha / {over} = {ratio:g} (lora_alpha={alpha:g}, r={r}); the usual is 1 to 4.",
                    "The update is scaled by this ratio: far below 1 it barely moves the outputs, far above it "
                    "multiplies every step and destabilises training.",
                    f"lora_alpha: {2 * r if not rslora else round(2 * r ** 0.5, 2)}")]


def rank_findings(run: Run) -> list[Finding]:
    r = getattr(run.adapter, "r", None)
    if r is None:
        return []
    narrow = [(p, min(layer.in_features, layer.out_features)) for p, layer in adapter_layers(run.model).items()
              if hasattr(layer, "in_features") and r >= min(layer.in_features, layer.out_features)]
    if not narrow:
        return []
    path, width = min(narrow, key=lambda item: item[1])
    return [Finding("warning", f"r={r} is at least the width of {len(narrow)} adapted layers (narrowest: {path}, "
                               f"{width}).",
                    "A rank cannot exceed min(in, out): the extra rank is wasted parameters and memory, and the "
                    "adapter holds more numbers than the layer it adapts.", f"r: {max(width // 4, 1)}")]


def dropout_findings(run: Run) -> list[Finding]:
    dropout = getattr(run.adapter, "lora_dropout", 0) or 0
    if not dropout or run.conversations is None or len(run.conversations) >= SHORT_RUN_EXAMPLES:
        return []
    return [Finding("warning", f"lora_dropout={dropout} on {len(run.conversations)} training examples.",
                    "On so little data the run ends long before it could overfit: dropout only adds noise to the "
                    "few updates there are.", "lora_dropout: 0.0")]


# --- tokenizer and data --------------------------------------------------------------------------------------------


def tokenizer_findings(run: Run) -> list[Finding]:
    tokenizer = run.tokenizer
    if tokenizer is None:
        return []
    if tokenizer.pad_token is None:
        return [Finding("error", f"The tokenizer ({type(tokenizer).__name__}) has no pad token.",
                        "Batches of examples of different lengths cannot be padded: collation fails, or pads with "
                        "id 0, a real token the model then learns to predict.",
                        "Use lightning_peft.CausalLMModule (it sets pad_token = eos_token), or set "
                        "tokenizer.pad_token = tokenizer.eos_token where the tokenizer is loaded.")]
    embeddings = run.model.get_input_embeddings() if hasattr(run.model, "get_input_embeddings") else None
    if embeddings is not None and tokenizer.pad_token_id >= embeddings.num_embeddings:
        return [Finding("error", f"pad_token_id={tokenizer.pad_token_id} is outside the model's "
                                 f"{embeddings.num_embeddings}-row embedding.",
                        "The first padded batch fails with an index error inside the embedding.",
                        "Use a tokenizer whose pad token is in the vocabulary (pad_token = eos_token).")]
    return []


def chat_template_findings(run: Run) -> list[Finding]:
    if run.conversations is None or run.tokenizer is None or getattr(run.tokenizer, "chat_template", None):
        return []
    return [Finding("warning", "Chat data, but the tokenizer has no chat template.",
                    "Examples are laid out as plain 'User:/Assistant:' text, which no chat-serving stack uses: the "
                    "adapter learns a format it will never be prompted with.",
                    "model.init_args.chat_template: path/to/template.jinja   (the base's chat template)")]


def truncation_findings(run: Run) -> list[Finding]:
    """Responses cut short by ``max_length``: measured on up to 256 conversations, tokenized in full."""
    max_length = getattr(run.datamodule, "max_length", None)
    if run.conversations is None or run.tokenizer is None or max_length is None or not run.conversations:
        return []
    sample = run.conversations[:256]
    lengths = []
    for messages in sample:
        text, spans = render_chat(messages, run.tokenizer)
        lengths.append(len(run.tokenizer(text[: spans[-1][1]] if spans else text,
                                         add_special_tokens=not run.tokenizer.chat_template)["input_ids"]))
    cut = sum(n > max_length for n in lengths)
    if cut / len(sample) <= TRUNCATED_SHARE:
        return []
    longest = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    return [Finding("error", f"max_length={max_length} cuts the response of {cut} of {len(sample)} examples "
                             f"(95% are at most {longest} tokens).",
                    "The loss covers only response tokens: cut responses teach the model to stop mid-answer, and "
                    "examples cut before their response are dropped.", f"data.init_args.max_length: {longest}")]


def packing_findings(run: Run) -> list[Finding]:
    if not getattr(run.datamodule, "packing", False):
        return []
    try:
        check_packing(run.model)
    except ConfigError as err:
        return [Finding("error", "Packing would let packed examples attend to each other.", str(err),
                        "data.init_args.packing: false")]
    return []


def optimizer_findings(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[Finding]:
    """Frozen tensors handed to the optimizer (``AdamW(self.parameters())`` before or without freezing)."""
    held = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    frozen = [p for p in held if not p.requires_grad]
    if not frozen or len(frozen) == len(held):  # none, or an optimizer over the base alone (replaced by PeftCallback)
        return []
    return [Finding("warning", f"configure_optimizers hands {len(frozen)} frozen tensors "
                               f"({sum(p.numel() for p in frozen):,} values) to the optimizer.",
                    "PeftCallback removes them for this run, but the same module elsewhere keeps the whole base in "
                    "the optimizer's param groups, and a weight decay or a later unfreeze changes the base.",
                    "Build the optimizer over `[p for p in self.parameters() if p.requires_grad]`, or return None "
                    "from configure_optimizers and set PeftCallback's learning_rate.")]


def label_findings(batch: Any, tokenizer: Any) -> list[Finding]:
    """A batch for a chat model (its tokenizer has a chat template) whose labels copy ``input_ids`` everywhere: the
    loss is on the prompt too. (Plain language-model data rightly has such labels; it has no chat template.)"""
    if not getattr(tokenizer, "chat_template", None) or not isinstance(batch, dict):
        return []
    if not {"labels", "input_ids"} <= set(batch):
        return []
    labels, ids = batch["labels"], batch["input_ids"]
    if labels.shape != ids.shape or (labels == IGNORE_INDEX).any() or not torch.equal(labels, ids):
        return []
    return [Finding("warning", "The training batch's labels equal its input_ids at every position.",
                    "The loss is then computed on the prompt as well as the response: the model learns to write "
                    "questions, and the response's share of the gradient shrinks.",
                    "Set labels to -100 outside the responses (lightning_peft.ChatDataModule does), e.g. "
                    "data: {class_path: lightning_peft.ChatDataModule, ...}.")]


# --- base and memory -----------------------------------------------------------------------------------------------


def gradient_checkpointing_findings(run: Run) -> list[Finding]:
    """Reentrant gradient checkpointing with a frozen embedding: no segment input requires grad, so no gradient
    reaches an adapter inside the checkpointed blocks."""
    reentrant = [m for m in run.model.modules() if getattr(m, "gradient_checkpointing", False) is True
                 and isinstance(f := getattr(m, "_gradient_checkpointing_func", None), functools.partial)
                 and f.keywords.get("use_reentrant", True)]
    embeddings = run.model.get_input_embeddings() if hasattr(run.model, "get_input_embeddings") else None
    if not reentrant or embeddings is None or embeddings.weight.requires_grad or getattr(
            run.model, "_require_grads_hooks", None):
        return []
    return [Finding("error", "Reentrant gradient checkpointing is on and the input embedding is frozen.",
                    "Reentrant checkpointing backpropagates only into segments whose input requires grad; none does, "
                    "so the adapters inside the blocks get no gradient and never train.",
                    "trainer.strategy: {class_path: lightning_peft.PeftStrategy, init_args: {gradient_checkpointing: "
                    "true}}   (non-reentrant), or call model.enable_input_require_grads() after enabling it.")]


def quantization_findings(run: Run) -> list[Finding]:
    quantization = run.quantization
    if quantization is None or not quantization.load_in_4bit or run.device_type != "cpu":
        return []
    widths = {m.in_features for m in run.model.modules() if type(m) is nn.Linear}
    broken = sorted(w for w in widths if not cpu_4bit_row_length_works(w, quantization.bnb_4bit_quant_type,
                                                                       quantization.compute_dtype))
    if not broken:
        return []
    return [Finding("warning", f"4-bit base on a CPU whose bitsandbytes kernels miscompute rows of {broken} values.",
                    "Those layers stay in full precision (slower, larger than planned); the memory estimate counts "
                    "them quantized.", "trainer.accelerator: gpu   (they quantize correctly on a GPU)")]


CHECKS = (target_findings, partial_block_findings, share_findings, learning_rate_findings, alpha_findings,
          rank_findings, dropout_findings, tokenizer_findings, chat_template_findings, truncation_findings,
          packing_findings, gradient_checkpointing_findings, quantization_findings)


def diagnose(run: Run) -> list[Finding]:
    """Every check's findings, errors first."""
    findings = wrapped_findings(run.model) + [f for check in CHECKS for f in check(run)]
    return sorted(findings, key=lambda f: f.level != "error")


def run_facts(model: nn.Module, adapter: AdapterConfig, pl_module: Any, datamodule: Any, strategy: Any,
              learning_rate: float | None, optimizer: str = "AdamW") -> Run:
    """The ``Run`` of a Lightning setup: tokenizer from the module, data and conversations from the DataModule
    (``ChatDataModule``'s training conversations), quantization and device from the strategy."""
    conversations = getattr(datamodule, "conversations", None)
    return Run(model=model, adapter=adapter, learning_rate=learning_rate, optimizer=optimizer,
               tokenizer=getattr(pl_module, "tokenizer", None), datamodule=datamodule,
               quantization=getattr(strategy, "quantization", None), device_type=strategy.root_device.type,
               conversations=conversations()[0] if callable(conversations) else None)


def report(findings: list[Finding]) -> None:
    """Warn about each warning; raise one ConfigError listing every error (before any training step)."""
    for finding in findings:
        if finding.level == "warning":
            rank_zero_warn(str(finding))
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ConfigError("\n".join(str(f) for f in errors))


# --- first step (from PeftCallback) --------------------------------------------------------------------------------


def first_step_findings(model: nn.Module, backward_ran: bool) -> list[Finding]:
    """After the first training batch: the loss must have reached some trained parameter (the adapter's, or the
    weights a method trains in full, as GaLore does)."""
    if not backward_ran:
        return [Finding("error", "The first training step ran no backward pass.",
                        "training_step returned None (or a dict without 'loss'), so nothing trains.",
                        "Return the loss from training_step: `return self.model(**batch).loss` with labels in the "
                        "batch.")]
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.grad is not None and bool(p.grad.detach().ne(0).any()) for p in params):
        return []
    return [Finding("error", "After the first backward no trained parameter has a non-zero gradient.",
                    "The loss does not depend on the adapter: the batch has no labels (the model returned no "
                    "loss that reaches it), the loss was detached, or checkpointing cut the graph.",
                    "Put labels in the batch (lightning_peft.ChatDataModule does) and return the model's loss "
                    "from training_step.")]


# --- what check prints ---------------------------------------------------------------------------------------------


def group_paths(paths: list[str]) -> list[str]:
    """Module paths folded over their block numbers: ``model.layers.{0..31}.self_attn.q_proj``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for path in paths:
        match = re.search(r"\.(\d+)\.", path)
        if match:
            groups[f"{path[:match.start()]}.{{}}.{path[match.end():]}"].append(int(match.group(1)))
        else:
            groups[path] = []
    return [key.format("{" + _ranges(sorted(n)) + "}") if n else key for key, n in groups.items()]


def _ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(n) if start == n else f"{start}..{n}")
            start = None
    return ",".join(parts)


def layer_table(model: nn.Module) -> list[str]:
    """Every module holding parameters of its own, folded over block numbers, with its type."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for path, module in model.named_modules():
        if path and any(True for _ in module.parameters(recurse=False)):
            match = re.search(r"\.(\d+)\.", path)
            key = f"{path[:match.start()]}.{{}}.{path[match.end():]}" if match else path
            groups[(key, type(module).__name__)] += [int(match.group(1))] if match else []
    rows = [(key.format("{" + _ranges(sorted(n)) + "}") if n else key, kind) for (key, kind), n in groups.items()]
    width = max((len(path) for path, _ in rows), default=0)
    return [f"{path:<{width}}  {kind}" for path, kind in rows]


def family_targets(model: nn.Module) -> dict[str, list[str] | str]:
    """``target_modules`` values selecting attention only, the MLP only, and all linear layers of ``model``:
    from ``FAMILY_TARGETS`` for a known family, else read off the first block's linear layers."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family in FAMILY_TARGETS:
        return {**FAMILY_TARGETS[family], "all-linear": "all-linear"}
    attention, mlp = [], []
    for path, module in model.named_modules():
        match = re.search(r"\.0\.(.+)$", path)
        if match and _adaptable(module):
            inner = match.group(1)
            (attention if re.search(r"attn|attention", inner) else mlp).append(inner)
    return {"attention": attention, "mlp": mlp, "all-linear": "all-linear"}


def adapter_groups(model: nn.Module) -> list[str]:
    """The adapted modules, folded over block numbers, each with its method and rank."""
    described: dict[str, list[str]] = defaultdict(list)
    for path, layer in adapter_layers(model).items():
        method = type(layer).__name__.removesuffix("Layer").replace("Lora", "LoRA").replace("Dora", "DoRA")
        rank = f" r={layer.r}" if hasattr(layer, "r") else ""
        described[f"{method}{rank}"].append(path)
    rows = [(group, kind) for kind, paths in described.items() for group in group_paths(paths)]
    width = max((len(group) for group, _ in rows), default=0)
    return [f"{group:<{width}}  {kind}" for group, kind in rows]


_BYTES_4BIT = 0.5 + 4 / 64  # 4 bits a weight plus a float32 scale per 64-value block (less with double quant)


def memory_estimate(model: nn.Module, quantization: QuantizationConfig | None, dtype: torch.dtype,
                    tokens: int | None, gradient_checkpointing: bool) -> dict[str, float]:
    """Bytes of training memory by part. The base at its dtype (linear layers at 4 or 8 bits when quantized, but
    those the quantizer skips: heads, tied embeddings); the adapter, its gradients and AdamW's two moments in
    float32. Activations are an estimate per token of
    ``layers × (10·hidden + 4·intermediate)`` values stored for backward (``layers × hidden`` with gradient
    checkpointing) in the base's dtype, plus ``2·vocab`` float32 values for the logits and their gradient."""
    size = torch.finfo(dtype).bits // 8
    base, seen = 0.0, set()
    kept = skip_paths(model, quantization) if quantization is not None else set()
    for path, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad or id(param) in seen:  # tied embeddings counted once
                continue
            seen.add(id(param))
            per = size
            if quantization is not None and type(module) is nn.Linear and param.dim() == 2 and path not in kept:
                per = _BYTES_4BIT if quantization.load_in_4bit else 1
            base += param.numel() * per
    trainable = count_parameters(model)[0]
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0) or 0
    per_token = (layers * hidden if gradient_checkpointing else layers * (10 * hidden + 4 * intermediate)) * size
    per_token += 2 * vocab * 4
    out = {"base weights": base, "adapter (float32)": 4.0 * trainable, "adapter gradients": 4.0 * trainable,
           "AdamW moments": 8.0 * trainable, "activations per token": float(per_token)}
    if tokens:
        out[f"activations ({tokens} tokens a step)"] = float(per_token * tokens)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


ACTIVATIONS_FORMULA = ("layers × (10·hidden + 4·intermediate) values a token in the base's dtype (layers × hidden "
                       "with gradient checkpointing), plus 2·vocab float32 values for the logits and their gradient")


def summary(model: nn.Module, memory: dict[str, float], findings: list[Finding]) -> str:
    """What ``lightning-peft check`` prints: adapted modules, counts, sizes, memory and the findings."""
    trainable, total = count_parameters(model)
    family = getattr(getattr(model, "config", None), "model_type", "?")
    lines = [f"model: {type(model).__name__} ({family}), built on the meta device (no weights read)", "",
             "adapted modules:", *(f"  {g}" for g in adapter_groups(model) or ["none"]), "",
             f"trainable parameters: {trainable:,} of {total:,} ({trainable / max(total, 1):.4%})",
             f"adapter file:         {human_bytes(4 * trainable)} (float32)",
             f"resumable checkpoint: {human_bytes(12 * trainable)} (adapter + AdamW's two moments)", "",
             "training memory (estimate):"]
    step = {k: v for k, v in memory.items() if k != "activations per token"}
    lines += [f"  {name + ':':<36} {human_bytes(size)}" for name, size in memory.items()]
    lines += [f"  {'total:':<36} {human_bytes(sum(step.values()))}",
              f"  activations: {ACTIVATIONS_FORMULA}", ""]
    errors, warnings = (sum(f.level == level for f in findings) for level in ("error", "warning"))
    lines += [f"findings: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"]
    lines += [str(f) for f in findings] or ["  none"]
    return "\n".join(lines)
