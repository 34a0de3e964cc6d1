"""SSD matcher and multibox loss (reproduction notes section 4, TF object_detection semantics).

- IoU: TF `box_list_ops.iou` (normalized, non-inclusive coordinates).
- Matcher: TF `ArgMaxMatcher(0.5, 0.5, force_match_for_each_row=True)`.
- Loss: sigmoid cross-entropy over all C+1 logits + smooth L1 (weight 4), hard negative mining
  (up to 10 negatives per positive, each scaled by 0.3), normalised by the batch's matches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.anchors import BoxCoder

#: Defaults of the loss (reproduction notes section 4).
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_LOC_WEIGHT = 4.0
DEFAULT_MAX_NEGATIVES_PER_POSITIVE = 10
DEFAULT_NEGATIVE_WEIGHT = 0.3


def iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU [..., N, M] of xyxy boxes a [..., N, 4] and b [..., M, 4] (leading dims broadcast).
    Zero where the boxes do not intersect (TF box_list_ops.iou)."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return torch.where(inter > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def match_batch(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
                iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> torch.Tensor:
    """Matched gt index [N, A] (-1 = negative) for padded gt_boxes [N, G, 4] with gt_valid [N, G].

    TF ArgMaxMatcher: an anchor takes its best gt if that IoU >= threshold; then every valid gt is
    force-matched to its best anchor (first anchor on ties); when several gts force-match the
    same anchor the lowest gt index wins (TF takes argmax over the one-hot rows).
    """
    num_frames, num_gt = gt_valid.shape
    num_anchors = anchors.shape[0]
    if num_gt == 0:
        return torch.full((num_frames, num_anchors), -1, dtype=torch.long, device=anchors.device)
    iou = iou_matrix(gt_boxes, anchors)  # [N, G, A]
    iou = torch.where(gt_valid[..., None], iou, -1.0)  # padding never wins
    best_iou, best_gt = iou.max(dim=1)  # [N, A]; the first gt on ties, as argmax
    matches = torch.where(best_iou >= iou_threshold, best_gt, -1)
    # Force match: each valid gt row to its best anchor column.
    best_anchor = iou.argmax(dim=2)  # [N, G]
    gt_index = torch.arange(num_gt, device=anchors.device).expand(num_frames, num_gt)
    gt_index = torch.where(gt_valid, gt_index, num_gt)  # padding proposes "no gt" (= num_gt)
    forced = torch.full((num_frames, num_anchors), num_gt, dtype=torch.long, device=anchors.device)
    forced.scatter_reduce_(1, best_anchor, gt_index, reduce="amin", include_self=True)
    return torch.where(forced < num_gt, forced, matches)


def match(anchors: torch.Tensor, gt_boxes: torch.Tensor,
          iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> torch.Tensor:
    """Matched gt index [A] (-1 = negative) of one frame's gt_boxes [n, 4]; see `match_batch`."""
    valid = torch.ones(1, gt_boxes.shape[0], dtype=torch.bool, device=anchors.device)
    return match_batch(anchors, gt_boxes[None].to(anchors), valid, iou_threshold)[0]


def hard_negative_mask(cls_losses: torch.Tensor, positive: torch.Tensor,
                       max_negatives_per_positive: float | None = DEFAULT_MAX_NEGATIVES_PER_POSITIVE,
                       min_negatives_per_image: int = 0) -> torch.Tensor:
    """Negatives kept per frame [N, A]: the highest-loss negatives, at most
    max(min_negatives_per_image, int(max_negatives_per_positive * num_positives)) of them
    (TF HardExampleMiner._subsample_selection_to_desired_neg_pos_ratio; ties keep the lower index).

    TF's miner first runs NMS (IoU 0.99) on the decoded boxes ranked by loss and keeps at most
    num_hard_examples=3000; we skip that NMS step, and the 3000 cap never binds at A <= 534.
    """
    negative = ~positive
    if max_negatives_per_positive is None:
        return negative
    num_frames, num_anchors = cls_losses.shape
    ranked = cls_losses.detach().masked_fill(positive, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_anchors, device=order.device).expand(num_frames, num_anchors))
    num_positive = positive.sum(dim=1)
    num_negative = (max_negatives_per_positive * num_positive.double()).long().clamp(min=min_negatives_per_image)
    return negative & (rank < num_negative[:, None])


def _pad_ground_truth(gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], num_classes: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-frame gt lists into boxes [N, G, 4], labels [N, G], valid [N, G]; padding boxes are
    the whole image (finite codes) and padding labels 0. One scatter for the whole batch."""
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"loss.py MultiboxLoss: gt_boxes has {len(gt_boxes)} frames but gt_labels has "
                         f"{len(gt_labels)}")
    for i, (b, l) in enumerate(zip(gt_boxes, gt_labels)):
        if b.ndim != 2 or b.shape[-1] != 4 or l.shape != (b.shape[0],):
            raise ValueError(f"loss.py MultiboxLoss: frame {i} needs gt_boxes [n, 4] and gt_labels [n], "
                             f"got {tuple(b.shape)} and {tuple(l.shape)}")
    counts = [len(b) for b in gt_boxes]
    num_gt = max(counts, default=0)
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).repeat(len(gt_boxes), num_gt, 1)
    labels = torch.zeros(len(gt_boxes), num_gt, dtype=torch.long, device=device)
    valid = torch.zeros(len(gt_boxes), num_gt, dtype=torch.bool, device=device)
    if sum(counts):
        frame = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        start = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
        slot = torch.arange(len(frame)) - start[frame]
        frame, slot = frame.to(device), slot.to(device)
        boxes[frame, slot] = torch.cat(gt_boxes).to(device=device, dtype=boxes.dtype)
        labels[frame, slot] = torch.cat(gt_labels).to(device=device, dtype=torch.long)
        valid[frame, slot] = True
        real = labels[frame, slot]
        if bool(((real < 1) | (real > num_classes)).any()):
            raise ValueError(f"loss.py MultiboxLoss: gt_labels must be in 1..{num_classes} (0 is background), "
                             f"got values in {int(real.min())}..{int(real.max())}")
    return boxes, labels, valid


class MultiboxLoss(nn.Module):
    """SSD loss of LSTM-SSD training (reproduction notes section 4; TF ssd_meta_arch.loss).

    forward(box_regression [N, A, 4], class_logits [N, A, C+1], gt_boxes list[N] of [n, 4] normalized
    xyxy, gt_labels list[N] of [n] in 1..C) -> dict(loss, loc_loss, cls_loss, num_matched), where
    loss = cls_loss + loc_weight * loc_loss, both divided by max(1, matched anchors in the batch).
    Box regression channels are (ty, tx, th, tw) as `BoxCoder`.
    """

    def __init__(self, anchors: torch.Tensor, box_coder: BoxCoder, num_classes: int = 30,
                 iou_threshold: float = DEFAULT_IOU_THRESHOLD, loc_weight: float = DEFAULT_LOC_WEIGHT,
                 max_negatives_per_positive: float | None = DEFAULT_MAX_NEGATIVES_PER_POSITIVE,
                 negative_weight: float = DEFAULT_NEGATIVE_WEIGHT, min_negatives_per_image: int = 0) -> None:
        super().__init__()
        if anchors.ndim != 2 or anchors.shape[1] != 4:
            raise ValueError(f"loss.py MultiboxLoss: anchors must be [A, 4], got {tuple(anchors.shape)}")
        # Not persistent: anchors follow the input size, so checkpoints must not pin them.
        self.register_buffer("anchors", anchors.float(), persistent=False)
        self.box_coder = box_coder
        self.num_classes = num_classes
        self.iou_threshold = iou_threshold
        self.loc_weight = loc_weight
        self.max_negatives_per_positive = max_negatives_per_positive
        self.negative_weight = negative_weight
        self.min_negatives_per_image = min_negatives_per_image

    def _check_shapes(self, box_regression: torch.Tensor, class_logits: torch.Tensor, num_gt_frames: int) -> None:
        num_anchors = self.anchors.shape[0]
        if box_regression.ndim != 3 or box_regression.shape[1:] != (num_anchors, 4):
            raise ValueError(f"loss.py MultiboxLoss: box_regression must be [N, {num_anchors}, 4], "
                             f"got {tuple(box_regression.shape)}")
        expected = (box_regression.shape[0], num_anchors, self.num_classes + 1)
        if tuple(class_logits.shape) != expected:
            raise ValueError(f"loss.py MultiboxLoss: class_logits must be {list(expected)} "
                             f"(background + {self.num_classes} classes), got {tuple(class_logits.shape)}")
        if num_gt_frames != box_regression.shape[0]:
            raise ValueError(f"loss.py MultiboxLoss: {box_regression.shape[0]} frames of predictions but "
                             f"{num_gt_frames} frames of ground truth")

    def forward(self, box_regression: torch.Tensor, class_logits: torch.Tensor,
                gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_shapes(box_regression, class_logits, len(gt_boxes))
        anchors = self.anchors
        boxes, labels, valid = _pad_ground_truth(gt_boxes, gt_labels, self.num_classes, anchors.device)
        matches = match_batch(anchors, boxes, valid, self.iou_threshold)  # [N, A]
        positive = matches >= 0
        index = matches.clamp(min=0)
        if boxes.shape[1] > 0:
            target_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
            target_labels = torch.where(positive, labels.gather(1, index), 0)
        else:
            target_boxes = anchors.expand_as(box_regression)
            target_labels = torch.zeros_like(matches)
        loc_targets = self.box_coder.encode(target_boxes, anchors)

        # Per-anchor losses: Huber (delta 1) summed over 4 codes; sigmoid CE summed over C+1 logits.
        loc_losses = F.smooth_l1_loss(box_regression.float(), loc_targets, reduction="none", beta=1.0).sum(-1)
        one_hot = F.one_hot(target_labels, self.num_classes + 1).float()
        cls_losses = F.binary_cross_entropy_with_logits(class_logits.float(), one_hot, reduction="none").sum(-1)

        kept_negative = hard_negative_mask(cls_losses, positive, self.max_negatives_per_positive,
                                           self.min_negatives_per_image)
        cls_weights = positive.float() + self.negative_weight * kept_negative.float()
        num_matched = positive.sum().float()
        normalizer = num_matched.clamp(min=1.0)
        loc_loss = torch.where(positive, loc_losses, 0.0).sum() / normalizer
        cls_loss = (cls_losses * cls_weights).sum() / normalizer
        return {
            "loss": cls_loss + self.loc_weight * loc_loss,
            "loc_loss": loc_loss,
            "cls_loss": cls_loss,
            "num_matched": num_matched.detach(),
        }
