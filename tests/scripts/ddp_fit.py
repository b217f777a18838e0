"""Fit tiny models under DDP on CPU (2 processes, gloo); used by tests/test_distributed.py.

usage: ddp_fit.py OUT_DIR MAX_STEPS [--ckpt PATH] [--resume] [--nf4] [METHOD:FAMILY ...]

Each METHOD:FAMILY (default lora:llama; methods as in conftest.METHODS) is fitted in turn, from a fresh module,
under Lightning's DDPStrategy into OUT_DIR/METHOD-FAMILY/, with a checkpoint every 4 steps under ckpt/. Each rank
seeds its own random state before the adapter is injected (so an adapter not broadcast from rank 0 would differ
between ranks) and writes: rank<N>.safetensors (its adapter), losses<N>.json, batches<N>.safetensors (the batches
it trained on) and linear4bit<N>.json (how many 4-bit layers its base has); every rank calls
save_adapter(.../adapter) (only rank 0 may write). --ckpt resumes every fit from PATH; --resume fits each run
again, in the same processes, from its checkpoint at step 4 into .../resumed/ (the same files); --nf4 trains under
PeftDDPStrategy with the base quantized to NF4 (double quantization, bfloat16 compute; a 64-wide model).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import METHODS, QUANTIZABLE  # noqa: E402
from lightning_helpers import CausalLM, loader  # noqa: E402
from lightning_peft import PeftCallback, PeftDDPStrategy, QuantizationConfig, save_adapter  # noqa: E402
from lightning_peft.adapter_io import adapter_state_dict  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="bfloat16")


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.batches: list[torch.Tensor] = []

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0])

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        save_file(adapter_state_dict(pl_module), self.out / f"rank{rank}.safetensors")
        save_file({"batches": torch.stack(self.batches)}, self.out / f"batches{rank}.safetensors")
        (self.out / f"losses{rank}.json").write_text(json.dumps(pl_module.losses))
        linear4bit = sum(type(m).__name__ == "Linear4bit" for m in pl_module.modules())
        (self.out / f"linear4bit{rank}.json").write_text(json.dumps(linear4bit))
        save_adapter(pl_module, self.out / "adapter")


def fit(out: Path, method: str, family: str, max_steps: int, nf4: bool, ckpt_path: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    module = CausalLM(family=family, sizes=QUANTIZABLE if nf4 else None)
    strategy = PeftDDPStrategy(quantization=QuantizationConfig(**NF4)) if nf4 else "ddp"
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record(out), PeftCallback(METHODS[method]["make"](family)),
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
