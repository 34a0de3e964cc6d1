"""The train group of the config (`train.*`): every training default, light to import (no Lightning)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from lightning_modules.config import MOBILENET_V1, ModelConfig

#: Paper Sec. 4.1 learning rates: 0.003 for alpha = 1 (320px), 0.002 for alpha = 0.5 (256px).
PAPER_LR_ALPHA_1 = 0.003
PAPER_LR_ALPHA_HALF = 0.002
BASE_LAYER_NAMES = tuple(name for name, _, _ in MOBILENET_V1)


class LrSchedule(Enum):
    """How the learning rate falls over a run."""

    step = "step"  # x lr_decay_factor every lr_decay_steps (TF exponential_decay, staircase: the paper's)
    cosine = "cosine"  # half a cosine from lr to 0 over the run's steps (not in the paper)


class FreezeMode(Enum):
    """How stage 2 freezes the base through Conv13 (reproduction notes Sec. 4)."""

    frozen_bn_eval = "frozen_bn_eval"  # requires_grad False AND those BatchNorms stay in eval mode
    naive = "naive"  # requires_grad False only: BN running statistics keep updating
    none = "none"  # nothing frozen


@dataclass
class TrainConfig:
    """Every training default (the `train` group of the root config)."""

    # optimiser: TF1 RMSprop (paper Sec. 4.1; reproduction notes Sec. 4)
    lr: Optional[float] = None  # None: 0.003 when model.alpha >= 1, else 0.002 (paper Sec. 4.1)
    rms_decay: float = 0.9
    rms_init: float = 1.0  # RMSprop's mean square at step 0 (TF: 1, slow first ~50 steps; PyTorch: 0)
    momentum: float = 0.9
    epsilon: float = 1.0
    weight_decay: float = 4e-5  # TF l2_regularizer scale, on conv weights only
    lr_decay_steps: int = 200_000  # lr x lr_decay_factor every lr_decay_steps (staircase)
    lr_decay_factor: float = 0.95
    lr_schedule: LrSchedule = LrSchedule.step  # cosine: to 0 over train.max_steps (lr_decay_* unused)
    grad_clip_norm: float = 10.0  # clip by global norm; 0 disables
    ema_decay: float = 0.9999  # weight EMA used for evaluation; 0 disables
    ema_warmup: bool = True  # TF num_updates: decay_t = min(decay, (1 + t) / (10 + t))
    # loss (reproduction notes Sec. 4)
    loc_weight: float = 4.0
    max_negatives_per_positive: float = 10.0
    negative_weight: float = 0.3
    # stages
    init_checkpoint: Optional[str] = None  # stage 2: load matching names+shapes from this checkpoint
    init_from_ema: bool = False  # take the checkpoint's EMA weights instead of its raw ones (TF: raw)
    freeze: FreezeMode = FreezeMode.frozen_bn_eval  # applied only when init_checkpoint is set
    freeze_through: str = "conv13"  # last frozen base layer (the paper's Conv13)
    backbone_weights: Optional[str] = None  # timm mobilenetv1_100 state-dict file (stage 1)
    # stage-2 warm start (not in the paper): the first N steps also fit the outputs to those of the
    # init checkpoint's network on the same frames (lightning_modules/distill.py); 0 disables
    distill_steps: int = 0
    distill_weight: float = 1.0
    # the recurrent cells' learning rate is lr x this (not in the paper): in stage 2 they are the only fresh layers
    recurrent_lr_factor: float = 1.0
    # evaluation post-processing (reproduction notes Sec. 4)
    score_threshold: float = 0.01
    nms_iou: float = 0.5
    max_per_class: int = 100
    max_total: int = 100
    eval_clean_and_occluded: bool = True  # with data.occlusion_p > 0: also evaluate the clean stream
    # run
    seed: int = 0
    max_steps: int = -1  # -1: no step limit
    max_epochs: Optional[int] = 10
    val_every_n_steps: Optional[int] = None  # None: validate at the end of every val_every_n_epochs
    val_every_n_epochs: int = 1
    checkpoint_every_n_steps: int = 1000
    out_dir: str = "runs/train"
    csv_logger: bool = True
    log_every_n_steps: int = 50
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # e.g. ddp, ddp_spawn (gloo on CPU)
    precision: str = "32-true"  # or bf16-mixed, 16-mixed
    # speed, same maths (lightning_modules/speed.py; measured by benchmarks/bench_training.py, README)
    threads: int = 1  # torch intra-op threads while training/evaluating; 0: torch's default (one per core)
    reuse_memory: bool = True  # glibc keeps freed memory for the next step instead of faulting in fresh pages
    fold_bn: bool = True  # conv + eval BatchNorm (+ ReLU6) as one NHWC conv where no gradient flows (frozen base, eval)
    channels_last: bool = True  # the whole net in NHWC, BatchNorm summed exactly: stage 1 on one thread ~1.2-1.3x faster
    compile: bool = False  # torch.compile the network (kernels cached under the tafm cache); slow first compile

    def validate(self) -> None:
        """Raise ValueError naming the first invalid key, its value and what is valid."""
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"train.lr must be > 0 (or null for the paper's default), got {self.lr}")
        for key in ("rms_decay", "momentum", "lr_decay_factor", "negative_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"train.{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay}")
        if not self.recurrent_lr_factor > 0:
            raise ValueError(f"train.recurrent_lr_factor must be > 0, got {self.recurrent_lr_factor}")
        for key in ("epsilon", "rms_init", "weight_decay", "grad_clip_norm", "loc_weight", "max_negatives_per_positive",
                    "score_threshold", "distill_steps", "distill_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr_decay_steps", "max_per_class", "max_total", "val_every_n_epochs",
                    "checkpoint_every_n_steps", "log_every_n_steps", "devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"train.nms_iou must be in [0, 1], got {self.nms_iou}")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ValueError(f"train.max_steps must be -1 (no limit) or >= 1, got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"train.max_epochs must be null or >= 1, got {self.max_epochs}")
        if self.max_epochs is None and self.max_steps == -1:
            raise ValueError("train.max_steps=-1 and train.max_epochs=null would train forever; set one")
        if self.val_every_n_steps is not None and self.val_every_n_steps < 1:
            raise ValueError(f"train.val_every_n_steps must be null or >= 1, got {self.val_every_n_steps}")
        if self.freeze_through not in BASE_LAYER_NAMES:
            raise ValueError(f"train.freeze_through must be a base layer, one of {', '.join(BASE_LAYER_NAMES)}; "
                             f"got {self.freeze_through!r}")
        if not isinstance(self.freeze, FreezeMode):
            raise ValueError(f"train.freeze must be one of {[m.value for m in FreezeMode]}, got {self.freeze!r}")
        valid_precision = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
        if str(self.precision) not in valid_precision:
            raise ValueError(f"train.precision must be one of {', '.join(valid_precision)}, got {self.precision!r}")

    @property
    def stage(self) -> int:
        """2 when initialised from an earlier checkpoint (paper Sec. 4.1 two-stage training), else 1."""
        return 2 if self.init_checkpoint else 1


def resolve_lr(train: TrainConfig, model: ModelConfig) -> float:
    """train.lr, or the paper's value for the model width (paper Sec. 4.1)."""
    if train.lr is not None:
        return float(train.lr)
    return PAPER_LR_ALPHA_1 if model.alpha >= 1.0 else PAPER_LR_ALPHA_HALF
