"""Stage-2 warm start by distillation (`train.distill_steps`; not in the paper).

A stage 2 starts its recurrent cell (and, for a Bottleneck-LSTM, FM1's first 1x1 conv and the first
map's heads, whose input width changes) from scratch on a frozen base. For its first
`train.distill_steps` steps the loss adds how far the network's outputs are from those of the
checkpoint it was initialised from (the teacher, frozen, in eval mode) on the same clip frames, so
the fresh layers first learn to reproduce the single-frame network and the detection loss then
teaches them what to carry across frames.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.config import ModelConfig, as_config
from lightning_modules.network import LSTMSSD, create_model
from lightning_modules.stages import read_net_state


def load_teacher(path: str | Path, use_ema: bool) -> LSTMSSD:
    """The network of a tafm checkpoint (its own model config from the hparams), frozen, in eval mode."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    hparams = obj.get("hyper_parameters", {}) if isinstance(obj, dict) else {}
    if "model" not in hparams:
        raise ValueError(f"train.distill_steps needs a tafm Lightning checkpoint as train.init_checkpoint "
                         f"(its model config is in the hparams); {path} has none")
    net = create_model(as_config(ModelConfig, hparams["model"]))
    net.load_state_dict(read_net_state(path, use_ema))
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def distillation_loss(box_regression: Tensor, class_logits: Tensor,
                      teacher: Tuple[Tensor, Tensor]) -> Tensor:
    """Per frame, summed over anchors: sigmoid cross-entropy of the class logits against the
    teacher's probabilities, plus the Huber distance of the box codes weighted by the teacher's
    foreground probability (its most likely class); averaged over frames. Shapes [..., A, 4|C+1]."""
    teacher_box, teacher_logits = teacher
    target = torch.sigmoid(teacher_logits.float())
    cls = F.binary_cross_entropy_with_logits(class_logits.float(), target, reduction="none").sum(-1)
    foreground = target[..., 1:].max(-1).values
    box = F.smooth_l1_loss(box_regression.float(), teacher_box.float(), reduction="none", beta=1.0).sum(-1)
    per_anchor = cls + foreground * box
    return per_anchor.sum(-1).mean()


class Teacher:
    """Holds the teacher outside the LightningModule's submodules (never saved, never trained)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    @torch.no_grad()
    def __call__(self, images: Tensor, reset: Tensor) -> Tuple[Tensor, Tensor]:
        self.net.to(images.device)
        box_regression, class_logits, _ = self.net(images, None, reset)
        return box_regression, class_logits
