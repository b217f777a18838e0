"""``SaveAdapterCallback``: write the trained adapter as an HF PEFT directory when ``fit`` ends.

``on_fit_end`` runs once training and the last validation are done, on the final weights; rank 0 writes, the
others wait at a barrier so no process exits while the directory is half written.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.adapter_io import save_adapter


class SaveAdapterCallback(Callback):
    """At the end of ``fit``, save the adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        dirpath: the directory to write; replaced atomically if it exists.
        save_tokenizer: also save the module's ``tokenizer`` attribute there, as HF PEFT's examples do.
    """

    def __init__(self, dirpath: str | os.PathLike, save_tokenizer: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.save_tokenizer = save_tokenizer

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            save_adapter(pl_module, self.dirpath)
            tokenizer = getattr(pl_module, "tokenizer", None)
            if self.save_tokenizer and tokenizer is not None:
                tokenizer.save_pretrained(self.dirpath)
            size = (self.dirpath / "adapter_model.safetensors").stat().st_size
            rank_zero_info(f"Adapter saved to {self.dirpath} ({size / 2**20:.1f} MiB).")
        trainer.strategy.barrier("SaveAdapterCallback")
