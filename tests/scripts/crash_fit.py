"""Fit with a checkpoint at every step, resuming from OUT/last.ckpt when it exists; used by the crash test.

usage: crash_fit.py OUT_DIR MAX_STEPS      (writes OUT_DIR/done.json with the final global step)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_helpers import CausalLM, loader  # noqa: E402
from lightning_peft import LoraConfig, PeftCallback  # noqa: E402


def main() -> None:
    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    last = out / "last.ckpt"
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PeftCallback(LoraConfig(r=8, target_modules="all-linear")),
                   ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=1, save_last=True)],
    )
    trainer.fit(CausalLM(), loader(n=16), ckpt_path=last if last.exists() else None)
    (out / "done.json").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
