"""Per-trial training progress: a line at most every `every_s` seconds with step, loss, rate and ETA."""
from __future__ import annotations

import time
from typing import Callable

import pytorch_lightning as pl


class TrainProgress(pl.Callback):
    def __init__(self, every_s: float = 15.0, log: Callable[[str], None] = print):
        self.every_s = every_s
        self.say = log  # not `self.log`: that name is taken on Lightning objects
        self._start = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step  # a resumed stage starts part-way

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        step = trainer.global_step
        if now - self._last < self.every_s and step < total:
            return
        self._last = now
        rate = (step - self._first_step) / max(now - self._start, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        eta = (total - step) / rate if rate > 0 else float("nan")
        loss_text = f"loss {float(loss):.2f}, " if loss is not None else ""
        self.say(f"    step {step}/{total}: {loss_text}{rate:.1f} steps/s, ETA {eta:.0f}s")
