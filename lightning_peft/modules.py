"""Built-in LightningModules for the tasks the CLI fine-tunes out of the box: causal LM, sequence-to-sequence LM
(encoder-decoders such as T5 and BART) and sequence classification.

Each loads its tokenizer in ``__init__`` (the DataModule takes it from there) and its transformers model in
``configure_model``, which ``PeftCallback.setup`` calls so the adapter goes in before the strategy wraps the
model; ``configure_optimizers`` then sees only the adapter's parameters as trainable.

Under a strategy that quantizes the base (``PeftStrategyMixin.streams_pretrained``), ``configure_model`` creates
the model on the meta device instead (``meta_pretrained``: the config, dtype and generation config
``from_pretrained`` would give), and the strategy streams the weights in from the module's ``pretrained_source``,
quantizing each as it arrives: the full-precision base never exists whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
)

from lightning_peft.accumulation import TokenWeightedSteps, rescale_step
from lightning_peft.callback import PeftCallback
from lightning_peft.checkpoint import restore_adapter
from lightning_peft.data import IGNORE_INDEX, prompt_text
from lightning_peft.errors import ConfigError
from lightning_peft.fsdp import is_fsdp
from lightning_peft.loss import TokenPerplexity, causal_lm_loss
from lightning_peft.resources import remember_source, resolve_path
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.streaming import PretrainedSource
from lightning_peft.surgery import active_config, adapter_layers

Dtype = Literal["float32", "bfloat16", "float16"]


def load_tokenizer(path: str, gguf_file: str | None = None, chat_template: str | None = None) -> Any:
    """The tokenizer at ``path`` (or inside its GGUF file), with a pad token and an optional chat template.

    ``chat_template`` is a Jinja template, or the path of a file holding one.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(path), gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        template = Path(chat_template)
        tokenizer.chat_template = template.read_text() if template.suffix == ".jinja" else chat_template
    return tokenizer


def load_pretrained(auto_class: Any, path: str, gguf_file: str | None = None, dtype: Dtype | None = None,
                    **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` for a directory or a GGUF file in it (``package:NAME/path`` accepted).

    GGUF weights are unpacked to dense tensors at load (``GgufConfig(dequantize=True)``), so the model trains,
    merges and saves like any other; without it transformers may keep them packed in untrainable layers.
    """
    if gguf_file is not None:
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    model = auto_class.from_pretrained(resolve_path(path), **kwargs)
    remember_source(model, path, gguf_file)  # recorded with the adapter, so merge/generate find the base again
    return model


def random_pretrained(auto_class: Any, path: str, dtype: Dtype | None = None, **kwargs: Any) -> Any:
    """The model ``path``'s ``config.json`` describes, with transformers' random initialisation (from the run's
    seed) instead of trained weights; the recorded source is that directory."""
    config = AutoConfig.from_pretrained(resolve_path(path), **kwargs)
    model = auto_class.from_config(config, **({} if dtype is None else {"dtype": getattr(torch, dtype)}))
    remember_source(model, path, None)
    return model


def meta_pretrained(auto_class: Any, path: str, gguf_file: str | None = None, dtype: Dtype | None = None,
                    **kwargs: Any) -> Any:
    """The model ``load_pretrained`` returns, on the meta device and without weights: the same config (``kwargs``
    such as ``num_labels`` go to it), dtype, generation config and recorded source, for a strategy to stream the
    weights in."""
    reference, path = path, resolve_path(path)
    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, **kwargs)
    with torch.device("meta"):
        model = auto_class.from_config(config, **({} if dtype is None else {"dtype": getattr(torch, dtype)}))
    if model.can_generate() and gguf_file is None:  # from_pretrained reads generation_config.json, not from GGUF
        model.adjust_generation_fn(
            generation_config=None, from_auto_class=True, from_pipeline=None, pretrained_model_name_or_path=path,
            cache_dir=None, force_download=False, proxies=None, local_files_only=True, token=None, revision=None,
            subfolder="", trust_remote_code=None,
        )
    remember_source(model, reference, gguf_file)
    return model


class _TransformerModule(L.LightningModule):
    """Optimizer and schedule shared by the built-in modules: AdamW over what trains (or the optimizer the adapter
    method must train with: GaLore's), linear warmup, cosine decay.

    Args:
        learning_rate: the run's peak learning rate (this module builds the optimizer, so PeftCallback's stays unset).
        weight_decay: AdamW's weight decay.
        warmup_steps: steps of linear warmup before the cosine decay to a tenth of the rate.
    """

    pretrained_source: PretrainedSource  # the base's weights; a streaming strategy reads them from here
    random_weights = False  # build the base from its config with random weights (Seq2SeqLMModule's option)

    def __init__(self, learning_rate: float, weight_decay: float, warmup_steps: int) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {learning_rate}.")
        self.learning_rate, self.weight_decay, self.warmup_steps = learning_rate, weight_decay, warmup_steps
        self.model: Any = None
        self.step_weights = TokenWeightedSteps()  # micro-batches weighted by their labelled tokens

    def setup(self, stage: str) -> None:
        if stage != "fit" or any(isinstance(c, PeftCallback) for c in self.trainer.callbacks):
            return
        if self.model is None or not adapter_layers(self.model):
            raise ConfigError(
                f"{type(self).__name__} is fitted without PeftCallback and its model holds no adapter: every weight "
                f"would train (a full fine-tune). A command-line `--trainer.callbacks=...` replaces the YAML's whole "
                f"list, PeftCallback included: append with `--trainer.callbacks+=...` instead, or list "
                f"lightning_peft.PeftCallback (with its adapter) in trainer.callbacks."
            )

    def meta_model(self) -> PreTrainedModel:
        """The model ``configure_model`` would load, built on the meta device from its config alone: no weights are
        read, so ``lightning-peft check`` sizes even a 70B model in seconds."""
        source = self.pretrained_source
        return meta_pretrained(self.auto_class, source.path, source.gguf_file, self.dtype_name, **self._config_kwargs())

    def _config_kwargs(self) -> dict[str, Any]:
        return {}

    def _create_model(self, auto_class: Any, dtype: Dtype, **kwargs: Any) -> Any:
        """``auto_class.from_pretrained`` of ``pretrained_source``, or, when the trainer's strategy streams the
        base in, the same model on the meta device."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # not attached to a Trainer (lightning-peft generate builds the model alone)
            strategy = None
        streamed = isinstance(strategy, PeftStrategyMixin) and strategy.streams_pretrained
        source = self.pretrained_source
        if self.random_weights:
            if streamed:
                raise ConfigError(f"{type(self).__name__}(random_weights=True) has no weights for the quantizing "
                                  f"strategy to stream in; set random_weights: false (load the trained weights) or "
                                  f"train without quantization.")
            return random_pretrained(auto_class, source.path, dtype, **kwargs)
        create = meta_pretrained if streamed else load_pretrained
        return create(auto_class, source.path, source.gguf_file, dtype, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        config = active_config(self.model)
        optimizer = config.build_optimizer(self.model, self.learning_rate, self.weight_decay) if config else None
        if optimizer is None:  # the method (GaLore) may need an optimizer of its own
            optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine down to 10%

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written under PeftCallback hold the adapter only: inject it (unless PeftCallback did), so
        ``load_from_checkpoint`` and ``trainer.validate(ckpt_path=...)`` work without the callback."""
        restore_adapter(self, checkpoint)

    def _training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss a training step minimizes: the model's own, from the batch's labels."""
        return self(batch).loss

    def _loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many items (labelled tokens, or examples) the training loss is the mean over."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step_weights.weigh(self._training_loss(batch), self._loss_items(batch), self.trainer.strategy)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's gradient is the mean over all its labelled items (``lightning_peft.accumulation``), and so is
        the logged ``train_loss``, however many micro-batches the step took."""
        rescale_step(self)
        if self.step_weights.step_loss is not None:
            self.log("train_loss", self.step_weights.step_loss, prog_bar=True, on_step=True, on_epoch=False)
        self._log_lr()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")  # each module's own metrics

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _add_token_metrics(self) -> None:
        """Perplexity and token accuracy for validation and test, each weighted by its batch's labelled tokens."""
        for stage in ("val", "test"):
            setattr(self, f"{stage}_perplexity", TokenPerplexity())
            setattr(self, f"{stage}_token_accuracy", MeanMetric())  # share of labelled tokens predicted exactly

    def _log_token_metrics(self, stage: str, loss: torch.Tensor, count: torch.Tensor, correct: torch.Tensor) -> None:
        """Log ``stage``'s loss (the mean over ``count`` labelled tokens) and update its token metrics."""
        perplexity, accuracy = getattr(self, f"{stage}_perplexity"), getattr(self, f"{stage}_token_accuracy")
        perplexity.update(loss, weight=count)
        accuracy.update(correct / count.clamp(min=1), weight=count)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=max(int(count), 1))
        self.log(f"{stage}_perplexity", perplexity, prog_bar=True)
        self.log(f"{stage}_token_accuracy", accuracy)

    def _log_lr(self) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)


class CausalLMModule(_TransformerModule):
    """Causal language model fine-tuning; logs loss, perplexity and token accuracy on the response tokens.

    Args:
        model_name_or_path: a transformers model directory (``package:NAME/path`` inside an installed package).
            Under a quantizing strategy its weights are streamed in one tensor at a time, each quantized on arrival.
        gguf_file: a GGUF file in that directory to load (dequantized) instead of safetensors weights.
        tokenizer: where the tokenizer is, when not with the model.
        chat_template: a Jinja chat template (or a ``.jinja`` file) replacing the tokenizer's.
        dtype: the dtype the base weights are loaded in.
        generate_prompts: user messages answered (greedy) at the end of every validation, written to the console
            and to ``generations.jsonl`` in the run's log directory.
        max_new_tokens: length limit of those answers.
    """

    auto_class = AutoModelForCausalLM

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        dtype: Dtype = "float32",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generate_prompts: list[str] | None = None,
        max_new_tokens: int = 48,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_steps)
        self.save_hyperparameters()
        self.model_name_or_path, self.gguf_file, self.dtype_name = model_name_or_path, gguf_file, dtype
        self.pretrained_source = PretrainedSource(resolve_path(model_name_or_path), gguf_file)
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path, None if tokenizer else gguf_file,
                                        chat_template)
        self.generate_prompts = list(generate_prompts or [])
        self.max_new_tokens = max_new_tokens
        self._add_token_metrics()  # over the response tokens

    def setup(self, stage: str) -> None:
        if is_fsdp(self.trainer.strategy) and (self.generate_prompts or stage == "predict"):
            raise ConfigError(
                "Generating under FSDP is not supported: generate() runs outside FSDP's forward, on a sharded model. "
                "Leave generate_prompts empty and answer prompts from the saved adapter (lightning-peft generate)."
            )
        super().setup(stage)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self._create_model(AutoModelForCausalLM, self.dtype_name)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes per loop from here

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        # Packed rows bring position_ids, no attention_mask: transformers keeps examples apart only without a cache.
        return self.model(**batch, use_cache=False)

    def _training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(self.model, batch)

    def _loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the label at t is predicted at t - 1

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        stats = causal_lm_loss(self.model, batch, return_stats=True)  # loss, perplexity and accuracy in one pass
        self._log_token_metrics(stage, stats.loss, stats.count, stats.correct)

    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]]) -> str:
        """The model's greedy answer to ``messages`` (a conversation ending with a user turn)."""
        encoded = self.tokenizer(prompt_text(messages, self.tokenizer), return_tensors="pt",
                                 add_special_tokens=not self.tokenizer.chat_template).to(self.device)
        output = self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def on_validation_epoch_end(self) -> None:
        if not self.generate_prompts or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        records = [{"step": self.global_step, "prompt": p, "response": self.generate([{"role": "user", "content": p}])}
                   for p in self.generate_prompts]
        for record in records:
            rank_zero_info(f"[step {record['step']}] {record['prompt']!r} -> {record['response']!r}")
        if self.trainer.log_dir is not None:
            path = Path(self.trainer.log_dir) / "generations.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    def predict_step(self, batch: list[list[dict[str, str]]], batch_idx: int) -> list[dict[str, str]]:
        return [{"prompt": m[-1]["content"], "response": self.generate(m)} for m in batch]


class Seq2SeqLMModule(_TransformerModule):
    """Encoder-decoder fine-tuning (T5, BART...) on input/target pairs; logs loss, perplexity and token accuracy on
    the target tokens. The loss is the model's own (``labels``, with -100 on padding: ``Seq2SeqDataModule``'s
    batches), which transformers computes over the decoder's positions.

    Args:
        model_name_or_path: a transformers model directory (``package:NAME/path`` inside an installed package).
            Under a quantizing strategy its weights are streamed in one tensor at a time, each quantized on arrival.
        tokenizer: where the tokenizer is, when not with the model.
        dtype: the dtype the base weights are loaded in.
        random_weights: build the model from the directory's ``config.json`` with randomly initialised weights
            instead of loading trained ones: a smoke run of a recipe where no weights are at hand (as in
            ``examples/seq2seq_lora.yaml``). Such a base cannot be loaded again, nor its adapter used elsewhere.
        max_new_tokens: length limit of the outputs ``predict`` generates (greedy).
    """

    auto_class = AutoModelForSeq2SeqLM

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: str | None = None,
        dtype: Dtype = "float32",
        random_weights: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_steps)
        self.save_hyperparameters()
        self.model_name_or_path, self.dtype_name, self.random_weights = model_name_or_path, dtype, random_weights
        self.pretrained_source = PretrainedSource(resolve_path(model_name_or_path))
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path)
        self.max_new_tokens = max_new_tokens
        self._add_token_metrics()  # over the target tokens

    def setup(self, stage: str) -> None:
        if is_fsdp(self.trainer.strategy) and stage == "predict":
            raise ConfigError(
                "Generating under FSDP is not supported: generate() runs outside FSDP's forward, on a sharded model. "
                "Predict on one device, or from the saved adapter with HF PEFT (peft.PeftModel.from_pretrained)."
            )
        super().setup(stage)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self._create_model(AutoModelForSeq2SeqLM, self.dtype_name)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.generation_config.pad_token_id = self.model.config.pad_token_id
        self.model.train()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        labels = batch["labels"]
        labelled = labels != IGNORE_INDEX
        count = labelled.sum()
        correct = ((out.logits.argmax(-1) == labels) & labelled).sum()
        self._log_token_metrics(stage, out.loss, count, correct)

    @torch.no_grad()
    def generate(self, inputs: list[str]) -> list[str]:
        """The model's greedy outputs for ``inputs``."""
        encoded = self.tokenizer(inputs, return_tensors="pt", padding=True).to(self.device)
        return self._decode(self.model.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=False))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        """The greedy outputs for a batch's inputs (its labels, if any, are not looked at)."""
        output = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=self.max_new_tokens, do_sample=False)
        return self._decode(output)

    def _decode(self, output: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


class SequenceClassificationModule(_TransformerModule):
    """Sequence classification fine-tuning (a new head on an encoder or decoder); logs accuracy and macro-F1.

    Args:
        model_name_or_path: a transformers model directory (``package:NAME/path`` inside an installed package).
            Under a quantizing strategy its weights are streamed in one tensor at a time, each quantized on arrival.
        num_labels: number of classes; the head is created with this many outputs.
        tokenizer: where the tokenizer is, when not with the model.
    """

    auto_class = AutoModelForSequenceClassification

    def __init__(
        self,
        model_name_or_path: str,
        num_labels: int = 2,
        tokenizer: str | None = None,
        dtype: Dtype = "float32",
        learning_rate: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_steps)
        if num_labels < 2:
            raise ConfigError(f"num_labels must be at least 2, got {num_labels}.")
        self.save_hyperparameters()
        self.model_name_or_path, self.num_labels, self.dtype_name = model_name_or_path, num_labels, dtype
        self.pretrained_source = PretrainedSource(resolve_path(model_name_or_path))
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_accuracy", MulticlassAccuracy(num_classes=num_labels, average="micro"))
            setattr(self, f"{stage}_f1", MulticlassF1Score(num_classes=num_labels, average="macro"))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self._create_model(AutoModelForSequenceClassification, self.dtype_name,
                                        num_labels=self.num_labels)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.train()

    def _config_kwargs(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self(batch)
        predictions = out.logits.argmax(-1)
        accuracy, f1 = getattr(self, f"{stage}_accuracy"), getattr(self, f"{stage}_f1")
        accuracy.update(predictions, batch["labels"])
        f1.update(predictions, batch["labels"])
        self.log(f"{stage}_loss", out.loss, prog_bar=True, batch_size=len(predictions))
        self.log(f"{stage}_accuracy", accuracy, prog_bar=True)
        self.log(f"{stage}_f1", f1)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[int]:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()
