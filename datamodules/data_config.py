"""The data group of the config (`data.*`): every data default, light to import (no Lightning)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from datamodules.vid import SPLITS


@dataclass
class AugmentConfig:
    """Training augmentation defaults (TF Object Detection API ssd_random_crop + flip)."""

    enabled: bool = True
    no_crop_prob: float = 0.15  # TF ssd_random_crop random_coef: keep the whole image
    min_object_covered: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])  # one chosen uniformly per clip
    aspect_ratio_min: float = 0.5  # crop width/height
    aspect_ratio_max: float = 2.0
    area_min: float = 0.1  # crop area / image area
    area_max: float = 1.0
    max_attempts: int = 100  # TF sample_distorted_bounding_box; whole image if all fail
    flip_prob: float = 0.5
    # Photometric jitter is not in the LSTM-SSD release configs (crop + flip only): off by default.
    photometric: bool = False
    brightness_max_delta: float = 0.2  # TF random_adjust_brightness, in [0, 1] units
    contrast_min: float = 0.8  # TF random_adjust_contrast
    contrast_max: float = 1.25
    saturation_min: float = 0.8  # TF random_adjust_saturation
    saturation_max: float = 1.25
    hue_max_delta: float = 0.02  # TF random_adjust_hue, fraction of a full turn

    def validate(self, prefix: str = "data.augment") -> None:
        """Raise ValueError naming the first invalid key."""
        for key in ("no_crop_prob", "flip_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{prefix}.{key} must be in [0, 1], got {getattr(self, key)}")
        if not self.min_object_covered or not all(0 <= v <= 1 for v in self.min_object_covered):
            raise ValueError(f"{prefix}.min_object_covered must be a non-empty list of values in "
                             f"[0, 1], got {list(self.min_object_covered)}")
        pairs = (("aspect_ratio_min", "aspect_ratio_max"), ("area_min", "area_max"),
                 ("contrast_min", "contrast_max"), ("saturation_min", "saturation_max"))
        for lo, hi in pairs:
            if not 0 < getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"{prefix}.{lo} must be > 0 and <= {prefix}.{hi}, got "
                                 f"{getattr(self, lo)} and {getattr(self, hi)}")
        if self.area_max > 1.0:
            raise ValueError(f"{prefix}.area_max must be <= 1, got {self.area_max}")
        if self.max_attempts < 1:
            raise ValueError(f"{prefix}.max_attempts must be >= 1, got {self.max_attempts}")
        for key in ("brightness_max_delta", "hue_max_delta"):
            if not 0.0 <= getattr(self, key) <= 0.5:
                raise ValueError(f"{prefix}.{key} must be in [0, 0.5], got {getattr(self, key)}")


class EvalProtocol(Enum):
    """Which val frames are evaluated."""

    minival = "minival"  # one random window of minival_frames per video (paper's protocol)
    full = "full"  # every frame of every val video


@dataclass
class DataConfig:
    """Data options (the `data` group of the structured config)."""

    root: Optional[str] = None  # None = synthetic benchmark (resolved by the caller)
    # A synthetic dataset's twin with the class marker on this fraction of frames, generated once into the
    # cache (None: the dataset itself). For the built-in benchmark, or a root written by `tafm data synth`.
    synthetic_cue_prob: Optional[float] = None
    train_split: str = "train"
    val_split: str = "val"
    clip_length: int = 10  # frames unrolled per training clip; also eval chunk length
    frame_stride: int = 1  # training: take every frame_stride-th frame
    eval_protocol: EvalProtocol = EvalProtocol.minival
    minival_frames: int = 20
    batch_size: int = 4  # training clips per batch (eval always streams B = 1)
    num_workers: int = 0  # training DataLoader workers (eval uses at most 1, to keep order)
    seed: int = 0  # training shuffle/augmentation (a suite's --seeds vary it)
    minival_seed: int = 0  # which minival window of each val video: one val set whatever the training seed
    occlusion_p: float = 0.0  # eval-only occlusion probability per gt box (paper Table 6)
    occlusion_seed: int = 0
    strict: bool = False  # raise on the first bad file instead of skipping it
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: Optional[str] = None  # where read_vid pickles the parsed index
    max_train_videos: Optional[int] = None  # first N videos by name (small runs)
    max_val_videos: Optional[int] = None

    def validate(self) -> None:
        """Raise ValueError naming the first invalid key and what is valid."""
        for key in ("clip_length", "frame_stride", "minival_frames", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "seed", "minival_seed", "occlusion_seed"):  # numpy seeds are non-negative
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("train_split", "val_split"):
            if getattr(self, key) not in SPLITS:
                raise ValueError(f"data.{key} must be one of {SPLITS}, got {getattr(self, key)!r}")
        if not isinstance(self.eval_protocol, EvalProtocol):
            raise ValueError(f"data.eval_protocol must be one of "
                             f"{[p.value for p in EvalProtocol]}, got {self.eval_protocol!r}")
        if not 0.0 <= self.occlusion_p <= 1.0:
            raise ValueError(f"data.occlusion_p must be in [0, 1], got {self.occlusion_p}")
        if self.synthetic_cue_prob is not None and not 0.0 <= self.synthetic_cue_prob <= 1.0:
            raise ValueError(f"data.synthetic_cue_prob must be None or in [0, 1], got {self.synthetic_cue_prob}")
        for key in ("max_train_videos", "max_val_videos"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be None or >= 1, got {getattr(self, key)}")
        self.augment.validate("data.augment")
