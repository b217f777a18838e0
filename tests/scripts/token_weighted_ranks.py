"""One optimizer step of the built-in CausalLMModule (plain SGD at rate 1) on two CPU processes (gloo), under DDP or
PeftFSDPStrategy, two accumulated micro-batches a rank, each holding a different number of labelled tokens; used by
tests/test_accumulation.py.

usage: token_weighted_ddp.py MODEL_DIR OUT_DIR {ddp,peft_fsdp}

Writes OUT_DIR/initial.safetensors (rank 0's trained tensors once the strategy has set up) and
OUT_DIR/rank<N>.safetensors (each rank's after the step, and the train_loss it logged).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from test_accumulation import PROMPTS, SGDCausalLM, labelled_batches, lora  # noqa: E402
from lightning_peft import PeftCallback  # noqa: E402
from lightning_peft.fsdp import clean_name  # noqa: E402


def trained(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {clean_name(name): p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            save_file(trained(pl_module), self.out / "initial.safetensors")

    def on_fit_end(self, trainer, pl_module) -> None:
        logged = trainer.callback_metrics["train_loss"].detach().clone()  # the step's, over every rank's tokens
        save_file({**trained(pl_module), "train_loss": logged}, self.out / f"rank{trainer.global_rank}.safetensors")


def main() -> None:
    model_dir, out, strategy = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = SGDCausalLM(model_dir)
    # Sequential order, split by Lightning's DistributedSampler: rank 0 takes micro-batches 0 and 2, rank 1 1 and 3.
    batches = labelled_batches(len(module.tokenizer), PROMPTS)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, accumulate_grad_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PeftCallback(lora()), Record(out)])
    trainer.fit(module, DataLoader(batches, batch_size=None))


if __name__ == "__main__":
    main()
