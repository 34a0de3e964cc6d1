"""Detection post-processing: decode, per-class NMS, top-k (TF batch_multiclass_non_max_suppression).

Pure torch (no torchvision). Greedy NMS is computed exactly without a Python loop over boxes:
with boxes sorted by score, "i is kept iff no kept j < i overlaps it by IoU > threshold" defines
the greedy result recursively, so it is the unique fixed point of that rule; iterating the rule
from "all kept" reaches it after at most (longest suppression chain + 1) steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.anchors import BoxCoder
from lightning_modules.loss import iou_matrix

#: Defaults of the post-processing (reproduction notes section 4).
DEFAULT_SCORE_THRESHOLD = 0.01
DEFAULT_NMS_IOU_THRESHOLD = 0.5
DEFAULT_MAX_PER_CLASS = 100
DEFAULT_MAX_TOTAL = 100


def _greedy_keep(suppresses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Greedy-NMS keep mask [..., K] from suppresses [..., K, K] (true where box j ranks before box i
    by score and IoU > threshold) and valid [..., K]; the fixed point of the module docstring."""
    # "any kept j suppresses i" as a 0/1 float matrix product: exact (integer counts) and far
    # faster than a boolean any() over the second-to-last dim.
    weights = suppresses.to(torch.float32, memory_format=torch.contiguous_format)
    keep = valid.clone()
    for _ in range(valid.shape[-1] + 1):
        suppressed = (keep.to(weights.dtype)[..., None, :] @ weights)[..., 0, :] > 0
        new_keep = valid & ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Per-label greedy NMS of boxes [K, 4] (xyxy) with scores [K] and labels [K]: indices kept,
    highest score first (ties: lower index first). Boxes of different labels never suppress each
    other (a same-label mask on the IoU matrix, exact, instead of the coordinate-offset trick).
    Memory is O(K^2)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],) \
            or labels.shape != (boxes.shape[0],):
        raise ValueError(f"postprocess.py nms: need boxes [K, 4], scores [K], labels [K], got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_labels = labels[order]
    suppresses = (iou_matrix(boxes[order], boxes[order]) > iou_threshold).triu_(diagonal=1)  # j before i
    suppresses &= sorted_labels[:, None] == sorted_labels[None, :]
    keep = _greedy_keep(suppresses, torch.ones_like(order, dtype=torch.bool))
    return order[keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of boxes [K, 4] (xyxy) with scores [K]: indices kept, highest score first (ties:
    lower index first); a box is dropped when IoU > iou_threshold with a kept box (TF, torchvision)."""
    return batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), iou_threshold)


def _empty_detections(device: torch.device) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device)}


def _keep_in_score_order(boxes: torch.Tensor, valid: torch.Tensor, order: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
    """Per-class greedy NMS keep mask [C', U], in each class's score order, for boxes [U, 4] shared by
    all classes, candidates valid [C', U] (box order) and score order `order` [C', U] (candidates
    first). One IoU matrix serves every class; the cheaper of two equivalent routes builds the
    per-class "j ranks before i and overlaps it" matrices."""
    overlaps = iou_matrix(boxes, boxes) > iou_threshold  # [U, U]
    num_boxes = boxes.shape[0]
    num_ranked = int(valid.sum(dim=1).max())
    if 2 * num_ranked * num_ranked <= num_boxes * num_boxes:
        # Few candidates per class: take each class's K x K block in score order (cost C' K^2).
        ranked = order[:, :num_ranked]
        suppresses = overlaps.reshape(-1).take(ranked[:, :, None] * num_boxes + ranked[:, None, :])
        keep = _greedy_keep(suppresses.triu_(diagonal=1), valid.gather(1, ranked))
        return F.pad(keep, (0, num_boxes - num_ranked), value=False)
    # Most boxes are candidates: stay in box order and compare ranks (cost C' U^2, no gather).
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_boxes, device=order.device).expand_as(order))
    rank = rank.float()  # exact below 2**24 boxes; float compares are the fastest here
    suppresses = (rank[:, :, None] < rank[:, None, :]) & overlaps  # [C', U, U]
    return _greedy_keep(suppresses, valid).gather(1, order)


def _frame_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float,
                      iou_threshold: float, max_per_class: int, max_total: int) -> dict[str, torch.Tensor]:
    """One frame: boxes [A, 4] (clipped), class scores [A, C] -> detections (TF
    multiclass_non_max_suppression with clip_window [0, 0, 1, 1])."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Strictly above the threshold (TF), and boxes empty after clipping are dropped (TF clip_to_window).
    candidate = (scores > score_threshold) & (area > 0)[:, None]  # [A, C]
    classes = candidate.any(dim=0).nonzero().squeeze(1)  # classes with any candidate
    if classes.numel() == 0:
        return _empty_detections(boxes.device)
    anchors = candidate.any(dim=1).nonzero().squeeze(1)  # anchors that are a candidate of some class
    boxes = boxes[anchors]
    valid = candidate[anchors][:, classes].T.contiguous()  # [C', U]
    class_scores = torch.where(valid, scores[anchors][:, classes].T, -1.0)
    order = torch.sort(class_scores, dim=1, descending=True, stable=True).indices  # ties: lower index
    keep = _keep_in_score_order(boxes, valid, order, iou_threshold)
    keep &= keep.long().cumsum(dim=1) <= max_per_class  # TF NMS max_output_size per class
    class_pos, position = keep.nonzero(as_tuple=True)  # ordered by class, then score
    index = order[class_pos, position]
    kept_scores = class_scores[class_pos, index]
    top = torch.sort(kept_scores, descending=True, stable=True).indices[:max_total]
    return {"boxes": boxes[index[top]], "scores": kept_scores[top], "labels": classes[class_pos[top]] + 1}


def postprocess(box_regression: torch.Tensor, class_logits: torch.Tensor, anchors: torch.Tensor,
                box_coder: BoxCoder, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                iou_threshold: float = DEFAULT_NMS_IOU_THRESHOLD, max_per_class: int = DEFAULT_MAX_PER_CLASS,
                max_total: int = DEFAULT_MAX_TOTAL) -> list[dict[str, torch.Tensor]]:
    """Detections per frame from box_regression [N, A, 4] and class_logits [N, A, C+1].

    Scores are sigmoid(logits[..., 1:]) (the background logit is ignored, TF with sigmoid); boxes
    are decoded, clipped to [0, 1], filtered (score > threshold), per-class NMS'ed (IoU > threshold
    suppresses, at most max_per_class each) and the best max_total kept. Returns, per frame,
    dict(boxes [k, 4] normalized xyxy, scores [k] descending, labels [k] int64 in 1..C).
    """
    if box_regression.ndim != 3 or box_regression.shape[1:] != (anchors.shape[0], 4):
        raise ValueError(f"postprocess.py postprocess: box_regression must be [N, {anchors.shape[0]}, 4] "
                         f"(one row per anchor), got {tuple(box_regression.shape)}")
    if class_logits.ndim != 3 or class_logits.shape[:2] != box_regression.shape[:2] or class_logits.shape[2] < 2:
        raise ValueError(f"postprocess.py postprocess: class_logits must be [N, {anchors.shape[0]}, C+1] "
                         f"with C >= 1, got {tuple(class_logits.shape)}")
    with torch.no_grad():
        boxes = box_coder.decode(box_regression.float(), anchors.float()).clamp(0.0, 1.0)
        scores = torch.sigmoid(class_logits[..., 1:].float())
        return [_frame_detections(boxes[i], scores[i], score_threshold, iou_threshold, max_per_class, max_total)
                for i in range(boxes.shape[0])]
