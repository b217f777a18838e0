"""``SaveAdapterCallback``: write the trained adapter as an HF PEFT directory when ``fit`` ends.

``setup`` settles where (the given ``dirpath`` or the run's log directory) and refuses, before any training, to
replace an earlier run's output. ``on_fit_end`` runs once training and the last validation are done, on the final
weights, and after the strategy's teardown (under FSDP that is what gives the module its own layers back; the
adapter is small, wherever it is). Rank 0 writes, atomically; the others wait at a barrier so no process exits
while the directory is half written.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.adapter_io import WEIGHTS_NAME, save_adapter
from lightning_peft.atomic import atomic_directory, output_directory


class SaveAdapterCallback(Callback):
    """At the end of ``fit``, save the adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        dirpath: the directory to write; default: ``adapter`` inside the run's log directory (``trainer.log_dir``).
        save_tokenizer: also save the module's ``tokenizer`` attribute there, as HF PEFT's examples do.
        overwrite: replace a non-empty directory already at ``dirpath``; without it the run is refused at setup.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, save_tokenizer: bool = False,
                 overwrite: bool = False) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.save_tokenizer = save_tokenizer
        self.overwrite = overwrite
        self._path: Path | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._path = output_directory(trainer, self.dirpath, "adapter", self.overwrite, "adapter")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None) if self.save_tokenizer else None
            with atomic_directory(self._path) as tmp:
                save_adapter(pl_module, tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            size = (self._path / WEIGHTS_NAME).stat().st_size
            rank_zero_info(f"Adapter written to {self._path} ({size / 2**20:.1f} MiB).")
        trainer.strategy.barrier("SaveAdapterCallback")
