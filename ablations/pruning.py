"""Optuna pruning for pytorch_lightning: report the suite metric after each validation, stop hopeless
trials (never at the run's last validation: a finished trial keeps its value). Our own callback:
optuna-integration's imports `lightning.pytorch`, which does not mix with `pytorch_lightning` objects.
"""
from __future__ import annotations

import optuna
import pytorch_lightning as pl


class OptunaPruning(pl.Callback):
    def __init__(self, trial: optuna.trial.BaseTrial, monitor: str):
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        step = trainer.global_step
        prune = False
        if trainer.is_global_zero:
            self.trial.report(float(value), step)
            prune = self.trial.should_prune() and not _last_validation(trainer)
        prune = trainer.strategy.broadcast(prune)  # every rank stops together under DDP
        if prune:
            raise optuna.TrialPruned(f"{self.monitor}={float(value):.4f} at step {step} is below the median")


def _last_validation(trainer: pl.Trainer) -> bool:
    """No validation follows this one: the trial has finished training and is told its value instead."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
