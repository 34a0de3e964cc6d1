"""The root config: one structured default, overridden by a suite YAML and `key=value` pairs.

An unknown key or a bad value is a `ConfigError` that names the key and what is valid; every mistake
of the user's (config, suite, storage, data) is a `UserError`, which a suite never retries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from datamodules.data_config import DataConfig
from lightning_modules.config import ModelConfig, flatten, validate_model
from lightning_modules.config import flat_config as to_flat_dict  # noqa: F401  (the name the sweep uses)
from lightning_modules.train_config import LrSchedule, TrainConfig


#: keys that change how fast or how verbosely a stage runs, not what it computes (threads, folded BatchNorm,
#: torch.compile: the same losses to float rounding): out of the stage hash (ablations/runner.py), and free to
#: differ when a suite's study is resumed (ablations/harness.py)
SPEED_KEYS = ("train.threads", "train.reuse_memory", "train.fold_bn", "train.compile", "data.num_workers",
              "data.cache_dir", "train.csv_logger", "train.log_every_n_steps", "train.checkpoint_every_n_steps", "sweep.lend_idle_cores")


@dataclass
class SweepConfig:
    """How a suite trial is run (the `sweep` group)."""

    stage1_max_steps: Optional[int] = None  # stage-1 length; None: train.max_steps
    stage1_lr: Optional[float] = None  # None: train.lr
    stage1_ema_decay: Optional[float] = None  # stage 1's weight EMA (what it is scored with); None: train.ema_decay
    stage1_rms_init: Optional[float] = None  # stage 1's RMSprop mean square at step 0; None: train.rms_init
    stage1_lr_schedule: Optional[LrSchedule] = None  # stage 1's (train.lr_schedule: step, cosine); None: train's
    stage1_clip_length: Optional[int] = None  # single-frame stage: short clips, more videos per step; None: data.clip_length
    stage1_batch_size: Optional[int] = None  # None: data.batch_size
    stage1_data_root: Optional[str] = None  # stage 1 trains (and is scored) on this dataset; None: data.root
    # stage 1 trains on its dataset's twin with the marker on this share of frames (data.synthetic_cue_prob),
    # where that dataset is synthetic; None, or a real dataset: on the dataset itself
    stage1_cue_prob: Optional[float] = None
    progressive: bool = True  # stacked/multi-LSTM trials finetune from the trial with one layer fewer (paper Sec. 4.2)
    # A `type=none` trial also gets stage 2 (base frozen, no recurrent layer, the recurrent trials' steps
    # and clips), so every row of a table has the same training budget. For short CPU budgets, where
    # stage 1 is far from converged and the extra stage-2 steps alone lift mAP; the paper's baseline
    # is the converged stage 1 (False).
    single_frame_stage2: bool = False
    # the control's stage 2 lasts this many recurrent stages (train.max_steps each): a suite whose rows stack
    # k layers progressively (k stages of train.max_steps) gives it k, so the control has their budget
    control_stages: int = 1
    # a recurrent row trains this many more stages of train.max_steps, each from the last one's checkpoint with
    # a fresh schedule, as a progressive row does for each layer it adds but adding none: one layer with
    # extra_stages k - 1 has the stage-2 steps of k stacked layers, the same-steps baseline of Table 4's rows
    extra_stages: int = 0
    # a stage other workers wait for trains on one more thread per waiting worker (ablations/cores.py):
    # a suite's first stage 1 uses the whole laptop; false on a machine shared with other jobs
    lend_idle_cores: bool = True
    latency: bool = False  # also export and time the trained model (paper Table 7)
    latency_frames: int = 200

    def validate(self, recurrent_type: str) -> None:
        if self.stage1_ema_decay is not None and not 0.0 <= self.stage1_ema_decay < 1.0:
            raise ValueError(f"sweep.stage1_ema_decay must be in [0, 1) (0 disables the EMA) or null "
                             f"(train.ema_decay), got {self.stage1_ema_decay}")
        if self.stage1_rms_init is not None and not self.stage1_rms_init >= 0:
            raise ValueError(f"sweep.stage1_rms_init must be >= 0 or null (train.rms_init), got {self.stage1_rms_init}")
        if self.control_stages < 1:
            raise ValueError(f"sweep.control_stages must be >= 1 (stages of train.max_steps), got {self.control_stages}")
        if self.extra_stages < 0:
            raise ValueError(f"sweep.extra_stages must be >= 0 (stages after the row's own), got {self.extra_stages}")
        if self.extra_stages and recurrent_type == "none":
            raise ValueError("sweep.extra_stages continues a recurrent row's stage 2; a single-frame row has none "
                             "(its finetuning length is sweep.control_stages)")


class UserError(ValueError):
    """A mistake in what the user gave (arguments, suite, config, storage URL, data): the message says
    what was wrong, where, and what would be valid. Rerunning cannot fix it, so it is never retried."""


class ConfigError(UserError):
    """A user's config was wrong: the message says where and what is valid."""


@dataclass
class TafmConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _valid_keys(node, prefix: str) -> List[str]:
    if not isinstance(node, DictConfig):
        return []
    return [f"{prefix}{k}" for k in node.keys()]


def _parent(cfg: DictConfig, dotted: str):
    """The deepest existing node on the path `dotted`, and its dotted prefix."""
    node, prefix = cfg, ""
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node, prefix = node[part], f"{prefix}{part}."
        else:
            break
    return node, prefix


def _explain(cfg: DictConfig, key: str, error: OmegaConfBaseException, source: str) -> ConfigError:
    where = f" (in {source})" if source else ""
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        node, prefix = _parent(cfg, key)
        valid = ", ".join(_valid_keys(node, prefix))
        return ConfigError(f"unknown config key {key!r}{where}; valid keys here: {valid}")
    message = str(error).split("\n")[0]
    return ConfigError(f"bad value for config key {key!r}{where}: {message}")


def _merge_one(cfg: DictConfig, key: str, value, source: str) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (ValidationError, ConfigKeyError, ConfigAttributeError) as error:
        raise _explain(cfg, key, error, source) from None


def parse_override(item: str) -> tuple:
    """`a.b=value` -> ("a.b", parsed value) with YAML typing (lists as [x,y])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. model.alpha=0.5)")
    key, _ = item.split("=", 1)
    parsed = OmegaConf.from_dotlist([item])
    value = OmegaConf.select(parsed, key.strip())
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return key.strip(), value


def load_config(overrides: Iterable[str] = (), delta: Optional[dict] = None, delta_source: str = "") -> TafmConfig:
    """Default config <- `delta` (e.g. a suite YAML's mapping) <- `key=value` overrides; validated."""
    cfg = OmegaConf.structured(TafmConfig)
    for key, value in flatten(delta or {}).items():
        _merge_one(cfg, key, value, delta_source)
    for item in overrides:
        key, value = parse_override(item)
        _merge_one(cfg, key, value, "--set")
    try:
        obj: TafmConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config: {str(error).splitlines()[0]}") from None
    try:
        validate_model(obj.model)
        obj.data.validate()
        obj.train.validate()
        obj.sweep.validate(obj.model.recurrent.type.value)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return obj

