"""ImageNet MobileNetV1 weights for the base (stage-1 initialisation), from a local state-dict file of
timm's `mobilenetv1_100` (no download at run time; `train.backbone_weights`).

timm builds mobilenetv1_100 with its EfficientNet builder (`_gen_mobilenet_v1`): a stem
(`conv_stem` 3x3 s2 + `bn1`) and five stages of `dsa` DepthwiseSeparableConv blocks
(`conv_dw` 3x3 depthwise, `bn1`, `conv_pw` 1x1, `bn2`; ReLU6; no residual) with repeats
1, 2, 2, 6, 2 and 64, 128, 256, 512, 1024 channels; no head conv; `classifier` 1024 -> 1000.
Its ImageNet weights (`ra4_e3600_r224_in1k`) use Inception mean/std 0.5/0.5, i.e. inputs
2*x/255 - 1: exactly our input scaling, so the weights load unchanged. timm's BatchNorm eps is
1e-5 (ours model.bn_eps, 1e-3 by default): the running statistics are loaded as they are.

| timm key                              | ours (paper Table 1)        |
|---------------------------------------|-----------------------------|
| conv_stem.weight                      | base.conv1.0.weight         |
| bn1.{weight,bias,running_*}           | base.conv1.1.*              |
| blocks.0.0.*                          | base.conv2.*                |
| blocks.1.0.*, blocks.1.1.*            | base.conv3.*, base.conv4.*  |
| blocks.2.0.*, blocks.2.1.*            | base.conv5.*, base.conv6.*  |
| blocks.3.0.* .. blocks.3.5.*          | base.conv7.* .. base.conv12.* |
| blocks.4.0.*                          | base.conv13.* (the paper's Conv13, stride 2, 1024) |
| blocks.4.1.*                          | base.conv14.* (mobilenet_ssd only; LSTM-SSD prunes it) |
| blocks.i.j.conv_dw.weight             | base.convK.0.weight (3x3 depthwise) |
| blocks.i.j.bn1.*                      | base.convK.1.*              |
| blocks.i.j.conv_pw.weight             | base.convK.3.weight (1x1 pointwise) |
| blocks.i.j.bn2.*                      | base.convK.4.*              |
| conv_head.*, bn2.*, classifier.*      | ignored (classification head) |

Weights load into a model of any width only where every shape matches (alpha_base = 1.0 for
mobilenetv1_100); otherwise a one-line error names the key, both shapes and what is valid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

#: timm (stage, block) of our conv2 .. conv14, in order.
TIMM_BLOCKS: Tuple[Tuple[int, int], ...] = (
    (0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (4, 0), (4, 1))
SEPARABLE_LAYERS = tuple(f"conv{k}" for k in range(2, 15))
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
OPTIONAL_SUFFIX = ".num_batches_tracked"  # some exports drop it
IGNORED_PREFIXES = ("conv_head.", "bn2.", "classifier.")
VALID = ("a timm mobilenetv1_100 state dict (conv_stem.weight, bn1.*, blocks.{stage}.{block}.conv_dw/bn1/"
         "conv_pw/bn2) saved with torch.save, whose width matches model.alpha_base (mobilenetv1_100: 1.0)")


def _bn(timm_prefix: str, ours_prefix: str) -> Dict[str, str]:
    return {f"{timm_prefix}.{t}": f"{ours_prefix}.{t}" for t in BN_TENSORS}


def timm_key_map(include_conv14: bool = True) -> Dict[str, str]:
    """timm mobilenetv1_100 key -> our `net.state_dict()` key (the table in the module docstring)."""
    mapping = {"conv_stem.weight": "base.conv1.0.weight", **_bn("bn1", "base.conv1.1")}
    for layer, (stage, block) in zip(SEPARABLE_LAYERS, TIMM_BLOCKS):
        if layer == "conv14" and not include_conv14:
            continue
        prefix, ours = f"blocks.{stage}.{block}", f"base.{layer}"
        mapping[f"{prefix}.conv_dw.weight"] = f"{ours}.0.weight"
        mapping.update(_bn(f"{prefix}.bn1", f"{ours}.1"))
        mapping[f"{prefix}.conv_pw.weight"] = f"{ours}.3.weight"
        mapping.update(_bn(f"{prefix}.bn2", f"{ours}.4"))
    return mapping


def _shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _read(path: str | Path) -> Dict[str, Tensor]:
    """A state dict from a torch.save file; unwraps {'state_dict': ...} / {'model': ...} and 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train.backbone_weights: no file at {path}; valid: {VALID}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"train.backbone_weights {path}: holds a {type(obj).__name__}, not a state dict; valid: {VALID}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_backbone(net: nn.Module, source: str | Path | Mapping[str, Tensor]) -> List[str]:
    """Copy ImageNet MobileNetV1 weights (timm mobilenetv1_100 layout) into `net.base`; returns the
    loaded keys of `net.state_dict()`. Raises ValueError naming the first key that does not fit."""
    where = f"train.backbone_weights {source}" if isinstance(source, (str, Path)) else "load_backbone(state dict)"
    state = _read(source) if isinstance(source, (str, Path)) else dict(source)
    ours = net.state_dict()
    mapping = timm_key_map(include_conv14="base.conv14.0.weight" in ours)
    known = set(timm_key_map(include_conv14=True))
    for key in state:
        if key not in known and not key.startswith(IGNORED_PREFIXES):
            raise ValueError(f"{where}: unexpected key {key!r} (not part of MobileNetV1); valid: {VALID}")
    update: Dict[str, Tensor] = {}
    for timm_key, our_key in mapping.items():
        if timm_key not in state:
            if timm_key.endswith(OPTIONAL_SUFFIX):
                continue
            raise ValueError(f"{where}: missing key {timm_key!r} (for {our_key}); valid: {VALID}")
        value, target = state[timm_key], ours[our_key]
        if tuple(value.shape) != tuple(target.shape):
            alpha = getattr(getattr(net, "cfg", None), "alpha_base", None) or getattr(getattr(net, "cfg", None), "alpha", "?")
            raise ValueError(f"{where}: {timm_key!r} has shape {_shape(value)} but {our_key} of this model "
                             f"(model.alpha_base={alpha}) expects {_shape(target)}; valid: {VALID}")
        update[our_key] = value.to(target.dtype)
    net.load_state_dict(update, strict=False)
    return sorted(update)


def to_timm_state_dict(net: nn.Module, num_classes: int = 1000) -> Dict[str, Tensor]:
    """Our base in timm mobilenetv1_100 layout plus a classifier (the inverse of `load_backbone`)."""
    ours = net.state_dict()
    state = {timm_key: ours[our_key].clone() for timm_key, our_key in timm_key_map().items() if our_key in ours}
    last = "base.conv14.3.weight" if "base.conv14.3.weight" in ours else "base.conv13.3.weight"
    width = ours[last].shape[0]  # timm's classifier sits on the 1024-channel conv14
    state["classifier.weight"] = torch.zeros(num_classes, width)
    state["classifier.bias"] = torch.zeros(num_classes)
    return state

