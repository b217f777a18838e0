"""Fit a tiny Llama with LoRA under Lightning's DDP on CPU (2 processes, gloo); used by tests/test_distributed.py.

usage: ddp_fit.py OUT_DIR MAX_STEPS [CKPT_PATH]
Each rank writes its adapter tensors to OUT_DIR/rank<N>.safetensors and its losses to OUT_DIR/losses<N>.json;
every rank calls save_adapter(OUT_DIR/adapter) (only rank 0 may write).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lightning_helpers import CausalLM, loader  # noqa: E402
from lightning_peft import LoraConfig, PeftCallback, save_adapter  # noqa: E402
from lightning_peft.adapter_io import adapter_state_dict  # noqa: E402


class Record(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        save_file(adapter_state_dict(pl_module), self.out / f"rank{rank}.safetensors")
        (self.out / f"losses{rank}.json").write_text(json.dumps(pl_module.losses))
        save_adapter(pl_module, self.out / "adapter")


def main() -> None:
    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    ckpt_path = sys.argv[3] if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    module = CausalLM(in_init=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PeftCallback(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
                   ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1), Record(out)],
    )
    trainer.fit(module, loader(n=16, batch_size=2), ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()
