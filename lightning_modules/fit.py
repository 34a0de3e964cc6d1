"""`fit(model, data, train)`: one LSTM-SSD training stage end to end (datamodule, module, Trainer,
checkpoints, resume, final online evaluation).

Resume: `fit(..., resume=True)` restarts from `<train.out_dir>/checkpoints/last.ckpt`. The training
stream's order is a function of (data.seed, epoch) only (`TrainClipDataset`), and `ResumableLoader`
records how many batches of the current epoch were consumed, so a run resumed mid-epoch skips them
and ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from datamodules.clips import DataConfig, EvalClipDataset, VidClipDataModule, collate_clips
from lightning_modules.backbone import load_backbone
from lightning_modules.config import validate_model
from lightning_modules.curves import TrainingCurves
from lightning_modules.ema import EMACallback
from lightning_modules.speed import cpu_threads, prepare_module, reuse_freed_memory
from lightning_modules.stages import init_from_checkpoint, read_net_state
from lightning_modules.training import LSTMSSDModule, TrainConfig

LAST_CHECKPOINT = "last.ckpt"


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


class ResumableLoader:
    """The training DataLoader plus the `state_dict` / `load_state_dict` Lightning saves in checkpoints:
    the epoch and the number of batches handed out in it. After `load_state_dict`, the first pass over
    the same epoch skips that many batches: without decoding them where the loader can skip
    (EpochDataLoader.skip_batches), else decoded and dropped. The pass starts lazily, at the first
    batch, so it sees the epoch Lightning is really in (Lightning creates iterators before it moves a
    run resumed at an epoch end on to the next epoch)."""

    def __init__(self, loader: DataLoader, epoch_fn: Callable[[], Optional[int]]) -> None:
        self.loader, self.epoch_fn = loader, epoch_fn
        self.epoch: Optional[int] = None
        self.served = 0
        self._resume: Optional[Dict[str, int]] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        self.epoch, self.served = self.epoch_fn(), 0
        resume, self._resume = self._resume, None
        skip = resume["served"] if resume is not None and resume["epoch"] == self.epoch else 0
        if skip and hasattr(self.loader, "skip_batches"):
            self.loader.skip_batches, self.served, skip = skip, skip, 0
        iterator = iter(self.loader)  # EpochDataLoader selects the epoch's shuffle here
        for _ in range(skip):
            next(iterator, None)
            self.served += 1
        for batch in iterator:
            self.served += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": -1 if self.epoch is None else int(self.epoch), "served": int(self.served)}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "served": int(state_dict["served"])}


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint writing last.ckpt every N steps and, inside the loop, at the run's final step
    (train.max_steps). Lightning's own end-of-training save is skipped when that step is already
    saved: written after the loop, it records a partial epoch as finished, so a later run with more
    steps would not resume where this one stopped (it uses ModelCheckpoint's step bookkeeping)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if 0 < trainer.max_steps <= step and self._last_global_step_saved != step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            super().on_train_end(trainer, pl_module)


class TrainingDataModule(VidClipDataModule):
    """VidClipDataModule with a resumable training loader and, when data.occlusion_p > 0 and
    `clean_and_occluded`, two eval streams: clean (`val`) and occluded (`val_occluded`)."""

    def __init__(self, cfg: DataConfig, input_size: int, root: Path | str, clean_and_occluded: bool = True) -> None:
        super().__init__(cfg, input_size, root)
        self.clean_and_occluded = clean_and_occluded and cfg.occlusion_p > 0

    @property
    def stream_names(self) -> List[str]:
        """Metric prefix of each val dataloader."""
        return ["val", "val_occluded"] if self.clean_and_occluded else ["val"]

    def train_dataloader(self) -> ResumableLoader:
        return ResumableLoader(super().train_dataloader(), self._current_epoch)

    def val_dataloader(self) -> DataLoader | List[DataLoader]:
        occluded = super().val_dataloader()
        if not self.clean_and_occluded:
            return occluded
        clean = EvalClipDataset(self.val_videos, replace(self.cfg, occlusion_p=0.0), self.input_size,
                                counters=self.counters)
        return [DataLoader(clean, batch_size=1, collate_fn=collate_clips,
                           num_workers=min(self.cfg.num_workers, 1)), occluded]


def resolve_root(data: DataConfig, root: Optional[Path | str] = None) -> Path:
    """The VID root: `root`, else data.root, else the default synthetic benchmark (generated once); with
    data.synthetic_cue_prob, that synthetic dataset's twin with the marker on that share of frames."""
    root = root if root is not None else data.root
    if data.synthetic_cue_prob is None:
        if root is not None:
            return Path(root)
        from datamodules.synthetic import ensure_synthetic

        return ensure_synthetic(progress=False)
    from datamodules.synthetic import synthetic_twin

    return synthetic_twin(root, data.synthetic_cue_prob)


@dataclass
class FitResult:
    """What one stage produced: final online-eval metrics (EMA weights when enabled), the checkpoint
    to resume from or to start the next stage from, and the module (raw, non-EMA weights)."""

    metrics: Dict[str, float]
    checkpoint: Path
    module: LSTMSSDModule
    init_summary: Optional[str]


def build_trainer(train: TrainConfig, callbacks: Sequence[Callback], overrides: Optional[Dict[str, Any]] = None,
                  loggers: Sequence[Logger] = ()) -> pl.Trainer:
    """Trainer with the paper's clipping, the run's schedule, device and precision settings; logging to
    logs/metrics.csv (train.csv_logger) and to `loggers` (a W&B run, see ablations/tracking.py)."""
    steps = train.val_every_n_steps
    every = [CSVLogger(train.out_dir, name="logs", version="")] if train.csv_logger else []
    every += list(loggers)
    kwargs: Dict[str, Any] = dict(
        accelerator=train.accelerator, devices=train.devices, num_nodes=train.num_nodes,
        strategy=train.strategy, precision=train.precision, max_steps=train.max_steps,
        max_epochs=train.max_epochs if train.max_epochs is not None else -1,
        gradient_clip_val=train.grad_clip_norm if train.grad_clip_norm > 0 else None,
        gradient_clip_algorithm="norm", val_check_interval=steps,
        check_val_every_n_epoch=None if steps is not None else train.val_every_n_epochs,
        num_sanity_val_steps=0, log_every_n_steps=train.log_every_n_steps, callbacks=list(callbacks),
        logger=every or False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    kwargs.update(overrides or {})
    return pl.Trainer(**kwargs)


def _split(model: Any, data: Optional[DataConfig], train: Optional[TrainConfig]):
    if data is None and train is None and hasattr(model, "model"):
        return model.model, model.data, model.train
    if data is None or train is None:
        raise TypeError("fit(model, data, train): pass the three configs, or one object with .model, .data, .train")
    return model, data, train


def initialise_weights(module: LSTMSSDModule, train: TrainConfig) -> Optional[str]:
    """Stage-2 weights from train.init_checkpoint, else the ImageNet backbone; a one-line summary."""
    if train.init_checkpoint:
        summary = init_from_checkpoint(module.net, train.init_checkpoint, train.init_from_ema).format()
        return f"stage 2 init from {train.init_checkpoint}: {summary}"
    if train.backbone_weights:
        loaded = load_backbone(module.net, train.backbone_weights)
        return f"backbone from {train.backbone_weights}: loaded {len(loaded)} tensors into base"
    return None


def fit(model: Any, data: Optional[DataConfig] = None, train: Optional[TrainConfig] = None, *,
        resume: bool = False, root: Optional[Path | str] = None, callbacks: Sequence[Callback] = (),
        trainer_overrides: Optional[Dict[str, Any]] = None, loggers: Sequence[Logger] = ()) -> FitResult:
    """Train one stage and evaluate it online.

    fit(model_cfg, data_cfg, train_cfg) or fit(cfg) with cfg.model/.data/.train. resume=True restarts
    from <train.out_dir>/checkpoints/last.ckpt when it exists (else starts fresh). `root` overrides
    data.root; with neither, the default synthetic benchmark is used. `loggers` receive the training
    curves (loss parts, lr, grad norm, frames/s) and every validation metric as it is computed.
    Returns FitResult.
    """
    model, data, train = _split(model, data, train)
    validate_model(model)
    data.validate()
    train.validate()
    reuse_freed_memory(train)
    with cpu_threads(train):
        return _fit(model, data, train, resume, root, callbacks, trainer_overrides, loggers)


def _fit(model, data: DataConfig, train: TrainConfig, resume: bool, root: Optional[Path | str],
         callbacks: Sequence[Callback], trainer_overrides: Optional[Dict[str, Any]],
         loggers: Sequence[Logger] = ()) -> FitResult:
    pl.seed_everything(train.seed, workers=True, verbose=False)
    ckpt_dir = Path(train.out_dir) / "checkpoints"
    last = ckpt_dir / LAST_CHECKPOINT
    datamodule = TrainingDataModule(data, model.input_size, resolve_root(data, root), train.eval_clean_and_occluded)
    module = LSTMSSDModule(model, train)
    module.val_stream_names = datamodule.stream_names
    ckpt_path = str(last) if resume and last.is_file() else None
    if resume and ckpt_path is None:
        _say(f"fit: resume requested but {last} does not exist; starting fresh")
    summary = None if ckpt_path else initialise_weights(module, train)
    if summary:
        _say(summary)
    prepare_module(module, train)
    checkpoint = StepCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", save_last=True, save_top_k=0, enable_version_counter=False,
                                 every_n_train_steps=train.checkpoint_every_n_steps, auto_insert_metric_name=False)
    extra: List[Callback] = [EMACallback(train.ema_decay, train.ema_warmup)] if train.ema_decay > 0 else []
    trainer = build_trainer(train, [*extra, TrainingCurves(), *callbacks, checkpoint], trainer_overrides, loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
    return FitResult(metrics=metrics, checkpoint=last, module=module, init_summary=summary)


def evaluate(model: Any, data: Optional[DataConfig] = None, train: Optional[TrainConfig] = None, *,
             checkpoint: Optional[Path | str] = None, use_ema: Optional[bool] = None,
             root: Optional[Path | str] = None, trainer_overrides: Optional[Dict[str, Any]] = None,
             matches: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, float]:
    """Online evaluation only (the validation streams of `data`): the weights of `checkpoint` (its EMA
    weights when it has them and use_ema is not False), or the seeded initialisation of `fit` when
    checkpoint is None. Returns the logged val*/ metrics; a `matches` dict is filled with each stream's
    devkit matches by video (`VidEvaluator.per_video`, for reports.significance)."""
    model, data, train = _split(model, data, train)
    reuse_freed_memory(train)
    with cpu_threads(train):
        return _evaluate(model, data, train, checkpoint, use_ema, root, trainer_overrides, matches)


def _evaluate(model, data: DataConfig, train: TrainConfig, checkpoint: Optional[Path | str], use_ema: Optional[bool],
              root: Optional[Path | str], trainer_overrides: Optional[Dict[str, Any]],
              matches: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, float]:
    pl.seed_everything(train.seed, workers=True, verbose=False)
    datamodule = TrainingDataModule(data, model.input_size, resolve_root(data, root), train.eval_clean_and_occluded)
    module = LSTMSSDModule(model, train)
    module.val_stream_names = datamodule.stream_names
    if checkpoint is not None:
        module.net.load_state_dict(read_net_state(checkpoint, use_ema))
    prepare_module(module, train)
    kwargs: Dict[str, Any] = dict(accelerator=train.accelerator, devices=1, precision=train.precision, logger=False,
                                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    kwargs.update(trainer_overrides or {})
    trainer = pl.Trainer(**kwargs)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    if matches is not None:
        matches.update(module.val_matches)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
