"""Weight EMA used for evaluation (reproduction notes Sec. 4: "EMA 0.9999 of the weights").

TF's `ExponentialMovingAverage(decay, num_updates=global_step)`: the shadow starts at the initial
weights and after each optimiser step t (0-based) becomes
    shadow <- shadow + (1 - d_t) * (w - shadow),  d_t = min(decay, (1 + t) / (10 + t))
so a short run's EMA follows the weights instead of staying at the initialisation. Only trainable
parameters are averaged; BatchNorm running statistics and frozen parameters are used as they are
(TF averages trainable variables only). Validation swaps the shadow in and the raw weights back.
Checkpoints keep the raw weights in `state_dict` (resume) and the evaluated network in
`ema_state_dict` (stage-2 init with train.init_from_ema, export).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_modules.stages import EMA_STATE_KEY, NET_PREFIX


def ema_decay_at(decay: float, step: int, warmup: bool = True) -> float:
    """d_t of TF ExponentialMovingAverage with num_updates = t."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class EMACallback(pl.Callback):
    """Exponential moving average of the module's trainable parameters (see module docstring)."""

    def __init__(self, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) for the EMA callback, got {decay}")
        self.decay, self.warmup = decay, warmup
        self.shadow: Optional[Dict[str, Tensor]] = None
        self._loaded: Optional[Dict[str, Tensor]] = None
        self._backup: Optional[Dict[str, Tensor]] = None
        self.updates = 0

    def _params(self, pl_module: pl.LightningModule) -> Dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        source = self._loaded if self._loaded is not None else {n: p.detach() for n, p in params.items()}
        missing = sorted(set(params) - set(source))
        if missing:
            raise ValueError(f"ema.py: the checkpoint's EMA lacks {len(missing)} trainable tensors "
                             f"(first: {missing[0]}); it was written by a different model")
        self.shadow = {n: source[n].detach().to(p.device, torch.float32).clone() for n, p in params.items()}
        self._loaded = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.shadow is None or trainer.global_step <= self.updates:
            return  # no optimiser step on this batch (gradient accumulation)
        decay = ema_decay_at(self.decay, trainer.global_step - 1, self.warmup)
        with torch.no_grad():
            for name, param in self._params(pl_module).items():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.updates = trainer.global_step

    def _copy_in(self, pl_module: pl.LightningModule, values: Dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, param in self._params(pl_module).items():
                param.copy_(values[name])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shadow is not None:
            self._backup = {n: p.detach().clone() for n, p in self._params(pl_module).items()}
            self._copy_in(pl_module, self.shadow)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backup is not None:
            self._copy_in(pl_module, self._backup)
            self._backup = None

    def ema_net_state(self, pl_module: pl.LightningModule) -> Dict[str, Tensor]:
        """The evaluated network: `net.state_dict()` with the shadow in place of trainable weights."""
        assert self.shadow is not None
        state = {}
        for name, value in pl_module.net.state_dict().items():
            shadow = self.shadow.get(NET_PREFIX + name)
            state[name] = (shadow.to(value.dtype) if shadow is not None else value).detach().cpu().clone()
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        if self.shadow is not None:
            checkpoint[EMA_STATE_KEY] = self.ema_net_state(pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        if EMA_STATE_KEY in checkpoint:
            self._loaded = {NET_PREFIX + k: v for k, v in checkpoint[EMA_STATE_KEY].items()}
