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
from lightning_modules.network import LSTMSSD, Step, create_model
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

    @torch.no_grad()
    def after(self, layer: str, features: Tensor, steps: int, reset: Tensor) -> Tuple[Tensor, Tensor]:
        """Its outputs from `features`, its base layer `layer`'s output computed by a student that shares its
        weights up to there (`shares_base_with`): the same numbers as __call__, without the base."""
        self.net.to(features.device)
        return self.net.forward_after(layer, features, steps, reset)

    def shares_base_with(self, student: nn.Module, layer: str) -> bool:
        """Whether `student` computes exactly what this teacher computes up to base layer `layer`: the same plan
        of layers up to it (no recurrent cell before it), every weight and running statistic equal, none of
        them trained, and their BatchNorms in eval mode (stage 2's frozen base, `frozen_bn_eval`)."""
        teacher = self.net
        if not (hasattr(teacher, "plan") and hasattr(student, "plan") and layer in teacher.base and layer in student.base):
            return False
        prefix = teacher.plan[:teacher.plan.index(Step("layer", layer)) + 1]
        if student.plan[:len(prefix)] != prefix or any(step.kind != "layer" for step in prefix):
            return False
        for step in prefix:
            ours, theirs = student.base[step.name], teacher.base[step.name]
            if any(p.requires_grad for p in ours.parameters()) or any(
                    m.training for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
                return False
            mine, other = ours.state_dict(), theirs.state_dict()
            if mine.keys() != other.keys() or not all(torch.equal(mine[k], other[k].to(mine[k].device)) for k in mine):
                return False
        return True
