"""The model's structured config: the single source of the network's defaults.

Every choice the paper leaves open is a value here, with the default named in
`../shared/reference/lstm_ssd_reproduction.md`. Enums (not Literal) keep it working on
omegaconf 2.3, which executorch's hydra-core pins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional


class Arch(Enum):
    """Which detector family (paper Table 5 compares the two)."""

    lstm_ssd = "lstm_ssd"  # pruned MobileNetV1 (no slim Conv2d_13), FM widths alpha_ssd*[512,256,256,128]
    mobilenet_ssd = "mobilenet_ssd"  # full MobileNetV1 + extra layers at alpha*[512,256,256,128]


class RecurrentType(Enum):
    """Recurrent layer types of paper Table 3 (plus none = single-frame SSD)."""

    none = "none"
    averaging = "averaging"
    lstm = "lstm"
    gru = "gru"
    bottleneck_lstm = "bottleneck_lstm"


def add_recurrent_type(name: str) -> RecurrentType:
    """Make `name` a value of model.recurrent.type (lightning_modules.recurrent.register_cell calls this):
    the config validates the type against the enum, so a registered cell joins it."""
    if name in RecurrentType.__members__:
        return RecurrentType[name]
    member = object.__new__(RecurrentType)
    member._name_, member._value_ = name, name
    member.__objclass__ = RecurrentType
    RecurrentType._member_names_.append(name)
    RecurrentType._member_map_[name] = member
    RecurrentType._value2member_map_[name] = member
    return member


class Activation(Enum):
    """phi of the LSTM equations: the paper says ReLU, the released code uses ReLU6."""

    relu = "relu"
    relu6 = "relu6"
    tanh = "tanh"


class DepthwiseInput(Enum):
    """What the Bottleneck-LSTM's first 3x3 depthwise sees: paper Eq. 2 / the code use [x, h];
    paper Table 1 draws it over x only (h then joins at the 1x1)."""

    x_h = "x_h"
    x = "x"


class CellInit(Enum):
    """How a recurrent layer's weights start (the paper does not say)."""

    random = "random"  # He-normal, like every other convolution
    identity = "identity"  # output = input (as far as the widths allow): stage 2 starts from stage 1's function
    # identity, but the memory gates keep 1 - averaging_weight of the state each frame (forget 0.25, input 0.75 at
    # the paper's weight): the cell starts as an exponential average of the features instead of forgetting all
    leaky = "leaky"


class WidthRule(Enum):
    """Output width N of a Bottleneck-LSTM placed after conv3, FM1 or FM2 (the paper leaves it open)."""

    quarter = "quarter"  # N = M / 4, the most literal reading of alpha_lstm = 0.25 * alpha_base
    half = "half"  # N = M / 2
    same = "same"  # N = M


# MobileNetV1 (paper Table 1): (name, output channels at alpha=1, stride); conv1 is a full 3x3
# conv, the rest are 3x3 depthwise + 1x1 pointwise. conv14 is slim's Conv2d_13, which LSTM-SSD prunes.
MOBILENET_V1 = (
    ("conv1", 32, 2), ("conv2", 64, 1), ("conv3", 128, 2), ("conv4", 128, 1), ("conv5", 256, 2),
    ("conv6", 256, 1), ("conv7", 512, 2), ("conv8", 512, 1), ("conv9", 512, 1), ("conv10", 512, 1),
    ("conv11", 512, 1), ("conv12", 512, 1), ("conv13", 1024, 2), ("conv14", 1024, 1),
)

#: Where a recurrent layer may be placed (paper Tables 2 and 4). `outputs` = one layer after
#: each of the five prediction maps, feeding only the heads.
PLACEMENTS = ("conv3", "conv13", "fm1", "fm2", "fm3", "fm4", "outputs")


@dataclass
class RecurrentConfig:
    type: RecurrentType = RecurrentType.bottleneck_lstm
    # layer names from PLACEMENTS; a name repeated means stacked layers (paper Table 4 row 2)
    after: List[str] = field(default_factory=lambda: ["conv13"])
    activation: Activation = Activation.relu
    forget_bias: float = 1.0
    depthwise_input: DepthwiseInput = DepthwiseInput.x_h
    fm_width_rule: WidthRule = WidthRule.quarter
    averaging_weight: float = 0.75  # paper Sec. 4.2: 0.75 * x_t + 0.25 * x_{t-1}
    init: CellInit = CellInit.random
    # True: a Bottleneck-LSTM outputs as many channels as it takes in (N = M) at every placement, so the
    # layers after it keep their stage-1 weights (the synthetic profile); False: the paper's widths
    same_width: bool = False


@dataclass
class ModelConfig:
    arch: Arch = Arch.lstm_ssd
    alpha: float = 1.0
    alpha_base: Optional[float] = None  # None: alpha (paper Sec. 3.3)
    alpha_ssd: Optional[float] = None  # None: 0.5 * alpha (lstm_ssd) or alpha (mobilenet_ssd)
    alpha_lstm: Optional[float] = None  # None: 0.25 * alpha
    input_size: int = 320
    # Multiplies every resolved width multiplier (alpha_base, alpha_ssd, alpha_lstm): 0.5 trains a
    # suite's alpha 1 and 0.5 points at half those widths (the two-width suites' synthetic profiles,
    # sized to a 2-core CPU); model.alpha stays the paper's label the report is keyed by.
    width_scale: float = 1.0
    min_depth: int = 16
    num_classes: int = 30
    # PyTorch BatchNorm momentum; the paper's TF decay 0.9997 is 0.0003. Short CPU runs need more.
    bn_momentum: float = 0.0003
    bn_eps: float = 1e-3
    # TF reduce_boxes_in_lowest_layer: the first map gets 3 anchors (0.1 square, 0.2 at 2:1 and 1:2)
    # instead of the full 6 (0.2 at every ratio, 0.28 square). False suits small frames whose objects
    # are ~0.2-0.35 of the side (the synthetic profile), where the reduced set only has oblong anchors.
    reduce_boxes_in_lowest_layer: bool = True
    # None: the class heads' last convolution starts like every other (He-normal, zero bias). A prior p
    # in (0, 1): it starts near zero (std 0.01) with biases that give every anchor background 1 - p and
    # each class p (RetinaNet's prior initialisation), so the first steps do not spend themselves on the
    # ~0.5 sigmoid outputs of 31 logits at every anchor.
    class_prior: Optional[float] = None
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)


@dataclass(frozen=True)
class Widths:
    alpha_base: float
    alpha_ssd: float
    alpha_lstm: float


def resolve_widths(cfg: ModelConfig) -> Widths:
    """The extended width multipliers of paper Sec. 3.3, defaults filled in."""
    ssd_default = 0.5 * cfg.alpha if cfg.arch == Arch.lstm_ssd else cfg.alpha
    scale = cfg.width_scale
    return Widths(
        alpha_base=scale * (cfg.alpha if cfg.alpha_base is None else cfg.alpha_base),
        alpha_ssd=scale * (ssd_default if cfg.alpha_ssd is None else cfg.alpha_ssd),
        alpha_lstm=scale * (0.25 * cfg.alpha if cfg.alpha_lstm is None else cfg.alpha_lstm),
    )


def recurrent_placements(cfg: ModelConfig) -> List[str]:
    """The placements that carry a layer: none when the type is `none`."""
    if cfg.recurrent.type == RecurrentType.none:
        return []
    return list(cfg.recurrent.after)


def validate_model(cfg: ModelConfig) -> None:
    """Raise ValueError naming the key, the bad value and what is valid."""
    for key in ("alpha", "alpha_base", "alpha_ssd", "alpha_lstm", "width_scale"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ValueError(f"model.{key} must be > 0, got {value}")
    if cfg.input_size < 32 or cfg.input_size % 32:
        raise ValueError(
            f"model.input_size must be a positive multiple of 32 (the base has output stride 32), "
            f"got {cfg.input_size}; e.g. 320 or 256"
        )
    if cfg.min_depth < 1:
        raise ValueError(f"model.min_depth must be >= 1, got {cfg.min_depth}")
    if cfg.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if not 0.0 <= cfg.bn_momentum <= 1.0:
        raise ValueError(f"model.bn_momentum must be in [0, 1], got {cfg.bn_momentum}")
    if cfg.class_prior is not None and not 0.0 < cfg.class_prior < 1.0:
        raise ValueError(f"model.class_prior must be null or in (0, 1) (e.g. 0.01), got {cfg.class_prior}")
    for name in cfg.recurrent.after:
        if name not in PLACEMENTS:
            raise ValueError(
                f"model.recurrent.after: unknown layer {name!r}; valid: {', '.join(PLACEMENTS)}"
            )
    if cfg.recurrent.type != RecurrentType.none and not cfg.recurrent.after:
        raise ValueError(
            f"model.recurrent.after is empty but model.recurrent.type={cfg.recurrent.type.value}; "
            f"name at least one of {', '.join(PLACEMENTS)} or set model.recurrent.type=none"
        )
    if not 0.0 <= cfg.recurrent.averaging_weight <= 1.0:
        raise ValueError(
            f"model.recurrent.averaging_weight must be in [0, 1], got {cfg.recurrent.averaging_weight}"
        )
    if cfg.recurrent.init == CellInit.leaky and not 0.0 < cfg.recurrent.averaging_weight < 1.0:
        raise ValueError(
            f"model.recurrent.init=leaky keeps 1 - model.recurrent.averaging_weight of a cell's state: the weight "
            f"must be in (0, 1), got {cfg.recurrent.averaging_weight} (for no memory use init=identity)"
        )


def as_config(cls: type, value: Any) -> Any:
    """A dataclass config from itself, a dict or a DictConfig (checkpoint hparams are plain dicts)."""
    from omegaconf import OmegaConf

    if isinstance(value, cls):
        return value
    merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(value or {}))
    return OmegaConf.to_object(merged)


# ---------------------------------------------------------------- plain, flat and nested configs
# One place for every config <-> dict conversion: records, checkpoints, hparams, suite deltas.

def plain_config(cfg: Any) -> Dict[str, Any]:
    """A config dataclass as a plain nested dict (enums as strings): what hparams and the logger store."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    nested: Dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def flat_config(cfg: Any) -> Dict[str, Any]:
    """A config dataclass as one flat {dotted.key: plain value} dict (W&B config, records, checkpoints)."""
    return flatten(plain_config(cfg))
