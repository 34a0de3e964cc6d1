"""What a training curve needs besides the loss parts and lr that `LSTMSSDModule.training_step` logs:
the gradient norm (before the paper's clipping) and the throughput in frames per second. Reads
gradients and clocks only: the training maths are untouched."""
from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch


class TrainingCurves(pl.Callback):
    """Logs `train/grad_norm` (L2 over every trainable gradient, before clipping) and `train/frames_per_s`
    (clip frames of the step over the wall time since the previous step ended, data loading included)."""

    def __init__(self) -> None:
        self._since: Optional[float] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()  # a validation inside training is not training time

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
            pl_module.log("train/grad_norm", norm, batch_size=1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        images = batch["images"] if isinstance(batch, dict) else None
        if self._since is not None and images is not None:
            frames = images.shape[0] * images.shape[1]
            pl_module.log("train/frames_per_s", frames / max(now - self._since, 1e-9), batch_size=frames)
        self._since = now
