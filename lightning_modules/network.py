"""LSTM-SSD and Mobilenet-SSD networks (paper Sec. 3, Table 1). `create_model(cfg)` is the only way in.

Layout (lstm_ssd, alpha=1, 320px): MobileNetV1 conv1..conv13 (the paper's names; slim's
Conv2d_13 pruned), recurrent layers at their placements, SSD feature maps fm1..fm4, and a
depthwise box head and class head on each of the five prediction maps
[conv13 (or its recurrent output), fm1, fm2, fm3, fm4].

Recurrence is functional: `forward(frames[T,B,3,H,W], state, reset) -> (box_regression[T,B,A,4],
class_logits[T,B,A,C+1], state)`. Layers outside recurrent cells run on all T*B frames at once;
only the cells unroll over time. `state=None` (or a `reset` flag) means a new video: zeros.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_modules.anchors import generate_anchors, num_anchors_per_location
from lightning_modules.config import (
    MOBILENET_V1,
    Arch,
    CellInit,
    ModelConfig,
    RecurrentType,
    WidthRule,
    recurrent_placements,
    resolve_widths,
    validate_model,
)
from lightning_modules.recurrent import RecurrentCell, State, build_cell

FEATURE_MAP_DEPTHS = (512, 256, 256, 128)  # fm1..fm4 at multiplier 1 (paper Table 1 at alpha_ssd=0.5)


def depth(channels: float, multiplier: float, min_depth: int) -> int:
    """MobileNet channel rule: max(int(c * multiplier), min_depth)."""
    return max(int(channels * multiplier), min_depth)


def feature_map_sizes(input_size: int) -> List[int]:
    """Spatial sizes of the five prediction maps: 10/5/3/2/1 at 320, 8/4/2/1/1 at 256."""
    size = input_size // 32
    sizes = [size]
    for _ in range(4):
        size = (size + 1) // 2  # 3x3 stride 2, 'same' padding
        sizes.append(size)
    return sizes


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int, bn: Tuple[float, float]) -> List[nn.Module]:
    momentum, eps = bn
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps, momentum=momentum),
        nn.ReLU6(inplace=True),
    ]


def _stem(cout: int, bn) -> nn.Sequential:
    """conv1: 3x3 full convolution, stride 2."""
    return nn.Sequential(*_conv_bn_relu6(3, cout, 3, 2, 1, bn))


def _separable(cin: int, cout: int, stride: int, bn) -> nn.Sequential:
    """3x3 depthwise (stride) then 1x1 pointwise to the output channels, each BN + ReLU6."""
    return nn.Sequential(*_conv_bn_relu6(cin, cin, 3, stride, cin, bn), *_conv_bn_relu6(cin, cout, 1, 1, 1, bn))


def _extra_block(cin: int, mid: int, cout: int, bn) -> nn.Sequential:
    """SSD feature map: 1x1 to half depth, 3x3 depthwise stride 2, 1x1 to full depth (paper Table 1)."""
    return nn.Sequential(
        *_conv_bn_relu6(cin, mid, 1, 1, 1, bn), *_conv_bn_relu6(mid, mid, 3, 2, mid, bn), *_conv_bn_relu6(mid, cout, 1, 1, 1, bn)
    )


def _prediction_block(cin: int, cout: int, bn) -> nn.Sequential:
    """Head: 3x3 depthwise (BN + ReLU6) then 1x1 convolution with bias to the predictions."""
    return nn.Sequential(*_conv_bn_relu6(cin, cin, 3, 1, cin, bn), nn.Conv2d(cin, cout, 1, bias=True))


@dataclass(frozen=True)
class Step:
    """One entry of the forward plan: a layer, a recurrent cell, or taking a prediction map."""

    kind: str  # "layer" | "cell" | "map"
    name: str


class LSTMSSD(nn.Module):
    """SSD with recurrent layers at configurable placements; see the module docstring."""

    def __init__(self, cfg: ModelConfig, base_layers: Sequence[Tuple[str, int, int]]):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        widths = resolve_widths(cfg)
        bn = (cfg.bn_momentum, cfg.bn_eps)
        placements = recurrent_placements(cfg)
        self.num_classes = cfg.num_classes
        self.input_size = cfg.input_size
        self.base = nn.ModuleDict()
        self.fm = nn.ModuleDict()
        self.cells = nn.ModuleDict()
        self.heads_box = nn.ModuleList()
        self.heads_class = nn.ModuleList()
        self.plan: List[Step] = []
        self._cell_placement = {}

        def add_cells(where: str, channels: int, width_position: str) -> int:
            for index in range(placements.count(where)):
                n = self._cell_width(width_position, channels, widths.alpha_lstm)
                key = f"{where}_{index}"
                self.cells[key] = build_cell(cfg.recurrent.type, channels, n, cfg.recurrent)
                self.plan.append(Step("cell", key))
                channels = self.cells[key].out_channels
            return channels

        channels = 3
        last_base = base_layers[-1][0]
        map_channels = []
        for name, nominal, stride in base_layers:
            cout = depth(nominal, widths.alpha_base, cfg.min_depth)
            self.base[name] = _stem(cout, bn) if name == "conv1" else _separable(channels, cout, stride, bn)
            self.plan.append(Step("layer", name))
            channels = cout
            if name == "conv3":
                channels = add_cells("conv3", channels, "conv3")
        # `conv13` names the base's output: slim Conv2d_13 in the unpruned mobilenet_ssd base
        channels = add_cells("conv13", channels, "conv13")
        self.plan.append(Step("map", last_base))
        map_channels.append(channels)
        for index, nominal in enumerate(FEATURE_MAP_DEPTHS, start=1):
            name = f"fm{index}"
            cout = depth(nominal, widths.alpha_ssd, cfg.min_depth)
            mid = depth(nominal / 2, widths.alpha_ssd, cfg.min_depth)
            self.fm[name] = _extra_block(channels, mid, cout, bn)
            self.plan.append(Step("layer", name))
            channels = add_cells(name, cout, name)
            self.plan.append(Step("map", name))
            map_channels.append(channels)
        # `outputs`: a recurrent layer after each prediction map, feeding only its heads (paper Table 2)
        self.output_cells: List[List[str]] = []
        anchors_per_location = num_anchors_per_location(
            len(map_channels), reduce_boxes_in_lowest_layer=cfg.reduce_boxes_in_lowest_layer)
        for index, cin in enumerate(map_channels):
            keys = []
            position = "conv13" if index == 0 else f"fm{index}"
            for stack in range(placements.count("outputs")):
                n = self._cell_width(position, cin, widths.alpha_lstm)
                key = f"outputs{index}_{stack}"
                self.cells[key] = build_cell(cfg.recurrent.type, cin, n, cfg.recurrent)
                cin = self.cells[key].out_channels
                keys.append(key)
            self.output_cells.append(keys)
            k = anchors_per_location[index]
            self.heads_box.append(_prediction_block(cin, k * 4, bn))
            self.heads_class.append(_prediction_block(cin, k * (cfg.num_classes + 1), bn))
        self.cell_order = [s.name for s in self.plan if s.kind == "cell"] + [k for ks in self.output_cells for k in ks]
        self._init_weights()
        if cfg.recurrent.init in (CellInit.identity, CellInit.leaky):
            for cell in self.cells.values():
                cell.init_identity()
                if cfg.recurrent.init == CellInit.leaky:
                    cell.init_memory(1.0 - cfg.recurrent.averaging_weight)

    def _init_weights(self) -> None:
        """He-normal (fan-in) convolutions, zero biases, unit BatchNorm: keeps activations alive
        through 13 layers from the first step (PyTorch's default conv init makes them vanish)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        prior = self.cfg.class_prior
        if prior is not None:  # model.class_prior: background 1 - p, each class p at every anchor
            logit = math.log((1.0 - prior) / prior)
            for head in self.heads_class:
                conv = head[-1]
                nn.init.normal_(conv.weight, std=0.01)
                with torch.no_grad():
                    bias = conv.bias.view(-1, self.num_classes + 1)  # [anchors, C + 1], background first
                    bias[:, 0] = logit
                    bias[:, 1:] = -logit

    def _cell_width(self, position: str, m: int, alpha_lstm: float) -> int:
        """Output width N of a recurrent layer with input width M at `position` (paper Sec. 3.3, 4.2)."""
        cfg = self.cfg
        if cfg.recurrent.type != RecurrentType.bottleneck_lstm or cfg.recurrent.same_width:
            return m  # the other types are not designed for bottlenecking (paper Sec. 4.2)
        if position == "conv13":
            return depth(1024, alpha_lstm, cfg.min_depth)  # alpha_lstm * 1024 (paper Sec. 3.3)
        if position in ("fm3", "fm4"):
            return m  # "we do not further bottleneck" after FM3, FM4 (paper Sec. 4.2)
        divisor = {WidthRule.quarter: 4, WidthRule.half: 2, WidthRule.same: 1}[cfg.recurrent.fm_width_rule]
        return max(m // divisor, cfg.min_depth)

    @property
    def feature_map_sizes(self) -> List[int]:
        return feature_map_sizes(self.input_size)

    def anchors(self) -> Tensor:
        """The SSD anchors [A, 4] the heads predict for, in their order (normalized xyxy)."""
        return generate_anchors(self.feature_map_sizes,
                                reduce_boxes_in_lowest_layer=self.cfg.reduce_boxes_in_lowest_layer)

    @property
    def num_recurrent_layers(self) -> int:
        return len(self.cell_order)

    def _unroll(self, key: str, x: Tensor, steps: int, state: Optional[State], reset: Optional[Tensor]):
        """Run one recurrent cell over the time axis of x [T*B, C, H, W]."""
        cell: RecurrentCell = self.cells[key]
        frames = x.unflatten(0, (steps, -1))
        outputs = []
        for t in range(steps):
            if state is None:
                state = cell.zero_state(frames[t])
            elif reset is not None:
                keep = (~reset[t]).to(frames.dtype).view(-1, 1, 1, 1)
                state = tuple(s * keep for s in state)
            out, state = cell(frames[t], state)
            outputs.append(out)
        return torch.stack(outputs).flatten(0, 1), state

    def forward(
        self, frames: Tensor, state: Optional[Sequence[State]] = None, reset: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tuple[State, ...]]:
        """frames [T, B, 3, S, S] scaled to [-1, 1]; reset [T, B] bool zeroes a stream's state before a frame."""
        return self._run(frames.flatten(0, 1), frames.shape[0], 0, state, reset)

    def forward_after(self, layer: str, features: Tensor, steps: int,
                      reset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """forward()'s boxes and logits from `features` [T*B, C, H, W], the output of base layer `layer` (zero
        state): a network whose layers up to `layer` are another's (a stage-2 distillation teacher and its frozen
        student) takes that one's features instead of computing them again."""
        start = self.plan.index(Step("layer", layer)) + 1
        if any(step.kind != "layer" for step in self.plan[:start]):
            raise ValueError(f"forward_after({layer!r}): a recurrent cell or prediction map comes before it")
        box_regression, class_logits, _ = self._run(features, steps, start, None, reset)
        return box_regression, class_logits

    def _run(self, x: Tensor, steps: int, start: int, state: Optional[Sequence[State]],
             reset: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tuple[State, ...]]:
        """The plan from step `start` on, x [T*B, C, H, W] its input."""
        old = dict(zip(self.cell_order, state)) if state is not None else {}
        new = {}
        maps = []
        for step in self.plan[start:]:
            if step.kind == "layer":
                module = self.base[step.name] if step.name in self.base else self.fm[step.name]
                x = module(x)
            elif step.kind == "cell":
                x, new[step.name] = self._unroll(step.name, x, steps, old.get(step.name), reset)
            else:
                maps.append(x)
        boxes, logits = [], []
        for index, feature in enumerate(maps):
            for key in self.output_cells[index]:
                feature, new[key] = self._unroll(key, feature, steps, old.get(key), reset)
            boxes.append(self._flatten_head(self.heads_box[index](feature), 4))
            logits.append(self._flatten_head(self.heads_class[index](feature), self.num_classes + 1))
        box_regression = torch.cat(boxes, dim=1).unflatten(0, (steps, -1))
        class_logits = torch.cat(logits, dim=1).unflatten(0, (steps, -1))
        return box_regression, class_logits, tuple(new[k] for k in self.cell_order)

    @staticmethod
    def _flatten_head(out: Tensor, per_anchor: int) -> Tensor:
        """[N, k*c, H, W] -> [N, H*W*k, c]: anchors ordered map, row, column, anchor."""
        n, _, h, w = out.shape
        return out.permute(0, 2, 3, 1).reshape(n, h * w * (out.shape[1] // per_anchor), per_anchor)

    def step(self, image: Tensor, state: Optional[Sequence[State]] = None) -> Tuple[Tensor, Tensor, Tuple[State, ...]]:
        """One frame [B, 3, S, S] -> (box_regression [B, A, 4], class_logits [B, A, C+1], state): the export form."""
        box_regression, class_logits, state = self.forward(image.unsqueeze(0), state)
        return box_regression[0], class_logits[0], state

    def zero_state(self, batch_size: int, device=None, dtype=torch.float32) -> Tuple[State, ...]:
        """Explicit zero state (a new video) for every recurrent layer, in `cell_order`."""
        with torch.no_grad():
            probe = torch.zeros(1, batch_size, 3, self.input_size, self.input_size, device=device, dtype=dtype)
            was_training = self.training
            self.eval()
            _, _, state = self.forward(probe)
            self.train(was_training)
        return tuple(tuple(torch.zeros_like(s) for s in cell_state) for cell_state in state)


def _lstm_ssd_base() -> Tuple[Tuple[str, int, int], ...]:
    return MOBILENET_V1[:-1]  # "we prune the MobileNet base network by removing the final layer" (paper Sec. 3.1)


def _mobilenet_ssd_base() -> Tuple[Tuple[str, int, int], ...]:
    return MOBILENET_V1


_BASES = {Arch.lstm_ssd: _lstm_ssd_base, Arch.mobilenet_ssd: _mobilenet_ssd_base}


def create_model(cfg: Optional[ModelConfig] = None) -> LSTMSSD:
    """Build the network of `cfg` (default: LSTM-SSD, alpha=1, 320px, one Bottleneck-LSTM after conv13).

    Example:
        >>> from lightning_modules.config import ModelConfig
        >>> net = create_model(ModelConfig(alpha=0.5, input_size=256))
        >>> boxes, logits, state = net(torch.zeros(10, 2, 3, 256, 256))
        >>> tuple(boxes.shape), tuple(logits.shape)
        ((10, 2, 324, 4), (10, 2, 324, 31))
    """
    cfg = cfg if cfg is not None else ModelConfig()
    return LSTMSSD(cfg, _BASES[cfg.arch]())
