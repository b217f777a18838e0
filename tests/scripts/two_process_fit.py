"""Fit tiny models in two processes on CPU (gloo), under DDP or FSDP; used by tests/test_distributed.py and
tests/test_fsdp.py.

usage: two_process_fit.py {ddp,fsdp} OUT_DIR MAX_STEPS [--ckpt PATH] [--resume] [--configure-model] [--nf4]
                          [--pretrained DIR] [METHOD:FAMILY ...]

Each METHOD:FAMILY (default lora:llama; methods as in conftest.METHODS, or galore) is fitted in turn, from a fresh
module, into OUT_DIR/METHOD-FAMILY/, with a checkpoint every 4 steps under ckpt/; each rank records what
lightning_helpers.RankRecorder writes. --ckpt resumes every fit from PATH; --resume fits each run again, in the
same processes, from its checkpoint at step 4 into .../resumed/; --configure-model builds the model in
configure_model instead of __init__; --nf4 quantizes the base to NF4 (a 64-wide model); --pretrained fits the
built-in CausalLMModule over the saved model DIR instead (lightning_helpers.PretrainedCausalLM), and each rank also
records how many tensors it read from DIR and how many frozen values it held once PeftCallback's setup had prepared
the base, before the wrap.

ddp: Lightning's DDPStrategy, or under --nf4 PeftDDPStrategy (double quantization, bfloat16 compute).
fsdp: PeftFSDPStrategy; under --nf4 the packed weights are stored in bfloat16, training runs in bf16-true and
checkpoints activations (the QLoRA recipe).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from conftest import METHODS, QUANTIZABLE  # noqa: E402
from lightning_helpers import CausalLM, PretrainedCausalLM, RankRecorder, loader  # noqa: E402
from test_galore import galore  # noqa: E402
from lightning_peft import PeftCallback, PeftDDPStrategy, PeftFSDPStrategy, QuantizationConfig  # noqa: E402
from lightning_peft.streaming import PretrainedSource  # noqa: E402

DDP_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
               bnb_4bit_compute_dtype="bfloat16")
FSDP_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
                bnb_4bit_quant_storage="bfloat16")


def adapter_config(method: str, family: str):
    """GaLore is no conftest.METHODS recipe (it has no adapter layer); its settings are tests/test_galore.py's."""
    return galore() if method == "galore" else METHODS[method]["make"](family)


def strategy_and_precision(kind: str, nf4: bool):
    if kind == "ddp":
        return (PeftDDPStrategy(quantization=QuantizationConfig(**DDP_NF4)) if nf4 else "ddp"), "32-true"
    quantization = QuantizationConfig(**FSDP_NF4) if nf4 else None
    return (PeftFSDPStrategy(quantization=quantization, gradient_checkpointing=nf4),
            "bf16-true" if nf4 else "32-true")


class BaseReads(L.Callback):
    """Counts the tensors this rank reads from a pretrained directory and, right after PeftCallback's setup (which
    prepares the base), the frozen values it holds off the meta device; writes them to OUT/reads<rank>.json."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.read = 0
        tensors = PretrainedSource.tensors

        def counted(source, model):
            for item in tensors(source, model):
                self.read += 1
                yield item

        PretrainedSource.tensors = counted

    def setup(self, trainer, pl_module, stage):
        held = sum(p.numel() for p in pl_module.parameters() if not p.requires_grad and p.device.type != "meta")
        record = {"tensors_read": self.read, "held_before_wrap": held}
        (self.out / f"reads{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(args: argparse.Namespace, out: Path, method: str, family: str, ckpt_path: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if args.pretrained:
        module = PretrainedCausalLM(args.pretrained)
    else:
        module = CausalLM(family=family, in_init=not args.configure_model, sizes=QUANTIZABLE if args.nf4 else None,
                          **({"optimizer": None} if method == "galore" else {}))  # GaLore builds its own
    strategy, precision = strategy_and_precision(args.kind, args.nf4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, precision=precision, max_steps=args.max_steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RankRecorder(out), PeftCallback(adapter_config(method, family)),
                   *([BaseReads(out)] if args.pretrained else []),
                   ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(module, loader(n=16, batch_size=2), ckpt_path=ckpt_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ddp", "fsdp"])
    parser.add_argument("out", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("runs", nargs="*", default=["lora:llama"])
    parser.add_argument("--ckpt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--configure-model", action="store_true")
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--pretrained")
    args = parser.parse_args()
    for run in args.runs:
        method, family = run.split(":")
        out = args.out / f"{method}-{family}"
        fit(args, out, method, family, args.ckpt)
        if args.resume:
            fit(args, out / "resumed", method, family, str(out / "ckpt" / "epoch=0-step=4.ckpt"))


if __name__ == "__main__":
    main()
