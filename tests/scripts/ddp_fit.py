"""Fit tiny models under DDP on CPU (2 processes, gloo); used by tests/test_distributed.py.

usage: ddp_fit.py OUT_DIR MAX_STEPS [--ckpt PATH] [--resume] [--nf4] [METHOD:FAMILY ...]

Each METHOD:FAMILY (default lora:llama; methods as in conftest.METHODS) is fitted in turn, from a fresh module,
under Lightning's DDPStrategy into OUT_DIR/METHOD-FAMILY/, with a checkpoint every 4 steps under ckpt/; each rank
records what lightning_helpers.RankRecorder writes. --ckpt resumes every fit from PATH; --resume fits each run
again, in the same processes, from its checkpoint at step 4 into .../resumed/; --nf4 trains under
PeftDDPStrategy with the base quantized to NF4 (double quantization, bfloat16 compute; a 64-wide model).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from conftest import METHODS, QUANTIZABLE  # noqa: E402
from lightning_helpers import CausalLM, RankRecorder, loader  # noqa: E402
from lightning_peft import PeftCallback, PeftDDPStrategy, QuantizationConfig  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="bfloat16")


def fit(out: Path, method: str, family: str, max_steps: int, nf4: bool, ckpt_path: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    module = CausalLM(family=family, sizes=QUANTIZABLE if nf4 else None)
    strategy = PeftDDPStrategy(quantization=QuantizationConfig(**NF4)) if nf4 else "ddp"
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RankRecorder(out), PeftCallback(METHODS[method]["make"](family)),
                   ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(module, loader(n=16, batch_size=2), ckpt_path=ckpt_path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("runs", nargs="*", default=["lora:llama"])
    parser.add_argument("--ckpt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--nf4", action="store_true")
    args = parser.parse_args()
    for run in args.runs:
        method, family = run.split(":")
        out = args.out / f"{method}-{family}"
        fit(out, method, family, args.max_steps, args.nf4, args.ckpt)
        if args.resume:
            fit(out / "resumed", method, family, args.max_steps, args.nf4, str(out / "ckpt" / "epoch=0-step=4.ckpt"))


if __name__ == "__main__":
    main()
