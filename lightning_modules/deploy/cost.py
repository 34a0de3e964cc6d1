"""Parameter and multiply-add (MAC) counts as the paper counts them (paper Tables 3-5).

Parameters: convolution weights + biases, no BatchNorm. MACs: convolutions of one frame, counted
by fvcore's FlopCountAnalysis (one fvcore "flop" is one multiply-add); BatchNorm and element-wise
ops are not counted. Components: `base`, one entry per recurrent layer (`lstm:<placement>_<k>`),
`ssd_feature_maps` (fm1..fm4) and `heads`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from lightning_modules.network import LSTMSSD

COUNTING_RULE = (
    "params = conv weights + biases (no BatchNorm), MACs = conv multiply-adds per frame "
    "(fvcore FlopCountAnalysis, BatchNorm and element-wise ops excluded), as the paper counts"
)


@dataclass
class Cost:
    params: int
    macs: int
    input_size: int
    components: Dict[str, Dict[str, int]] = field(default_factory=dict)
    recurrent: List[str] = field(default_factory=list)  # the components that are recurrent layers

    def recurrent_total(self, what: str) -> int:
        """Parameters (`params`) or MACs (`macs`) of the recurrent layers together."""
        return sum(self.components[name][what] for name in self.recurrent)

    def as_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "input_size": self.input_size, "components": self.components}


def _component(net: LSTMSSD, module_name: str) -> str:
    """Map a module path of LSTMSSD to its cost component; a recurrent cell names its own group."""
    top = module_name.split(".")[0]
    if top == "cells":
        key = module_name.split(".")[1]
        return f"{net.cells[key].cost_group}:{key}"
    return {"base": "base", "fm": "ssd_feature_maps", "heads_box": "heads", "heads_class": "heads"}[top]


class _OneFrame(nn.Module):
    """One frame from a zero state: what the paper counts per frame."""

    def __init__(self, net: LSTMSSD):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        box_regression, class_logits, _ = self.net.step(image)
        return box_regression, class_logits


def count_cost(net: LSTMSSD) -> Cost:
    """Count parameters and MACs of `net` per component (see the module docstring)."""
    from fvcore.nn import FlopCountAnalysis

    components: Dict[str, Dict[str, int]] = {}
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            entry = components.setdefault(_component(net, name), {"params": 0, "macs": 0})
            entry["params"] += sum(p.numel() for p in module.parameters(recurse=False))
    was_training = net.training
    net.eval()
    image = torch.zeros(1, 3, net.input_size, net.input_size)
    analysis = FlopCountAnalysis(_OneFrame(net), (image,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    with torch.no_grad():
        by_module = analysis.by_module_and_operator()
    net.train(was_training)
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            components[_component(net, name)]["macs"] += int(by_module.get("net." + name, {}).get("conv", 0))
    total_params = sum(c["params"] for c in components.values())
    total_macs = sum(c["macs"] for c in components.values())
    if total_macs != int(analysis.by_operator()["conv"]):  # every conv belongs to a component
        raise RuntimeError(f"cost: per-component MACs {total_macs} != fvcore conv total {analysis.by_operator()['conv']}")
    recurrent = sorted({_component(net, f"cells.{key}") for key in net.cells})
    return Cost(total_params, total_macs, net.input_size, dict(sorted(components.items())),
                [name for name in recurrent if name in components])


def bottleneck_conv_macs(net: LSTMSSD, key: str) -> int:
    """MACs of a Bottleneck-LSTM's bottleneck conv alone (dw3x3 + 1x1 to N), the figure paper Table 3 prints."""
    cell = net.cells[key]
    size = {name: s for name, s in zip(["map0", "fm1", "fm2", "fm3", "fm4"], net.feature_map_sizes)}
    side = size["map0"] if key.startswith("conv13") else size[key.split("_")[0]]
    dw_channels = cell.bottleneck_dw.in_channels
    return side * side * (dw_channels * 9 + (cell.in_channels + cell.out_channels) * cell.out_channels)
