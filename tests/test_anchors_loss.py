"""Anchors, box coder, matcher and multibox loss (reproduction notes sections 2 and 4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.anchors import BoxCoder, generate_anchors, num_anchors_per_location
from lightning_modules.loss import MultiboxLoss, iou_matrix, match


@pytest.mark.parametrize("sizes, expected", [([10, 5, 3, 2, 1], 534), ([8, 4, 2, 1, 1], 324)])
def test_anchor_counts(sizes: list[int], expected: int) -> None:
    anchors = generate_anchors(sizes)
    assert anchors.shape == (expected, 4)
    assert num_anchors_per_location() == [3, 6, 6, 6, 6]
    per_loc = num_anchors_per_location(len(sizes))
    assert sum(k * s * s for k, s in zip(per_loc, sizes)) == expected


def test_layer0_anchors_are_the_three_fixed_boxes() -> None:
    anchors = generate_anchors([10, 5, 3, 2, 1])
    c, r2 = 0.05, math.sqrt(2.0)
    expected = torch.tensor([
        [c - 0.05, c - 0.05, c + 0.05, c + 0.05],  # (0.1, 1)
        [c - 0.1 * r2, c - 0.1 / r2, c + 0.1 * r2, c + 0.1 / r2],  # (0.2, 2): w = 0.2*sqrt2, h = 0.2/sqrt2
        [c - 0.1 / r2, c - 0.1 * r2, c + 0.1 / r2, c + 0.1 * r2],  # (0.2, 1/2)
    ])
    torch.testing.assert_close(anchors[:3], expected)
    # Row-major order: next location is column x=1 of row y=0 (centre 0.15, 0.05), not clipped.
    torch.testing.assert_close(anchors[3], torch.tensor([0.1, 0.0, 0.2, 0.1]))
    assert anchors.min() < 0  # TF does not clip anchors


def test_layer1_extra_anchor_scale_is_geometric_mean() -> None:
    anchors = generate_anchors([10, 5, 3, 2, 1])
    layer1 = anchors[300:306]  # first location of map 1 (5x5, centre 0.1)
    widths, heights = layer1[:, 2] - layer1[:, 0], layer1[:, 3] - layer1[:, 1]
    s1, s2 = 0.2 + 0.75 / 4, 0.2 + 2 * 0.75 / 4
    torch.testing.assert_close(widths[0], torch.tensor(s1))
    torch.testing.assert_close(widths[1], torch.tensor(s1 * math.sqrt(2.0)))
    torch.testing.assert_close(heights[3], torch.tensor(s1 / math.sqrt(3.0)))
    torch.testing.assert_close(widths[5], torch.tensor(math.sqrt(s1 * s2)))
    torch.testing.assert_close(heights[5], torch.tensor(math.sqrt(s1 * s2)))
    torch.testing.assert_close((layer1[:, :2] + layer1[:, 2:]) / 2, torch.full((6, 2), 0.1))
    # Last map (1x1) gets the final scale 0.95 and the extra anchor at sqrt(0.95 * 1.0).
    torch.testing.assert_close(anchors[-1], torch.tensor([0.5, 0.5, 0.5, 0.5]) + math.sqrt(0.95) / 2 * torch.tensor([-1.0, -1, 1, 1]))


def test_box_coder_round_trip_and_hand_value() -> None:
    coder = BoxCoder()
    anchors = generate_anchors([4, 2, 1])
    boxes = torch.rand(anchors.shape[0], 2) * 0.5
    boxes = torch.cat([boxes, boxes + 0.05 + torch.rand(anchors.shape[0], 2) * 0.4], dim=1)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-5, rtol=0)
    # anchor centre (0.5, 0.5) size 0.2x0.2; box centre (0.55, 0.45) width 0.4 height 0.1
    anchor = torch.tensor([[0.4, 0.4, 0.6, 0.6]])
    box = torch.tensor([[0.35, 0.4, 0.75, 0.5]])
    code = coder.encode(box, anchor)[0]
    expected = torch.tensor([10 * (-0.05 / 0.2), 10 * (0.05 / 0.2), 5 * math.log(0.5), 5 * math.log(2.0)])
    torch.testing.assert_close(code, expected, atol=1e-5, rtol=0)  # (ty, tx, th, tw)
    assert torch.isfinite(coder.encode(torch.tensor([[0.3, 0.3, 0.3, 0.3]]), anchor)).all()  # eps guard


def test_iou_matrix_hand_values() -> None:
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.1, 0.0, 0.3, 0.2], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.2, 0.2]])
    torch.testing.assert_close(iou_matrix(a, b), torch.tensor([[1 / 3, 0.0, 1.0]]))


def test_match_threshold_and_force_match() -> None:
    anchors = torch.tensor([
        [0.0, 0.0, 0.2, 0.2],  # IoU 1/3 with gt 0, its best anchor: force-matched to gt 0
        [0.5, 0.5, 0.7, 0.7],  # IoU 2/3 with gt 1: matched by the 0.5 threshold
        [0.5, 0.5, 0.8, 0.7],  # equals gt 1
        [0.9, 0.9, 1.0, 1.0],  # overlaps nothing: negative
    ])
    gts = torch.tensor([[0.1, 0.0, 0.3, 0.2], [0.5, 0.5, 0.8, 0.7]])
    iou = iou_matrix(gts, anchors)
    assert iou[0].max() < 0.5 and iou[0].argmax() == 0
    assert match(anchors, gts).tolist() == [0, 1, 1, -1]
    # IoU exactly 0.5 is a match (TF: negative only when IoU < 0.5); no gt -> all negative.
    half = torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.5, 0.5], [0.75, 0.75, 1.0, 1.0]])
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert iou_matrix(gt, half)[0, 0].item() == 0.5
    assert match(half, gt).tolist() == [0, 0, -1]
    assert match(half, torch.zeros(0, 4)).tolist() == [-1, -1, -1]
    # Two gts force-matching the same anchor: the lower gt index takes it even though the anchor's
    # IoU with gt 1 is higher (TF: argmax over the one-hot force-match rows).
    contested = torch.tensor([[0.15, 0.15, 0.3, 0.3], [0.0, 0.0, 0.2, 0.19]])
    assert match(anchors, contested).tolist() == [0, -1, -1, -1]


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_hard_negative_mining_against_manual_computation() -> None:
    """Frame 0: one positive (anchor 0) and 15 negatives with distinct losses; 10 highest kept at 0.3.
    Frame 1: no gt at all; with min_negatives_per_image=2 its 2 highest negatives count."""
    num_anchors, num_classes = 16, 3
    anchors = torch.stack([torch.tensor([0.06 * i, 0.0, 0.06 * i + 0.05, 0.05]) for i in range(num_anchors)])
    gt_boxes = [anchors[:1].clone(), torch.zeros(0, 4)]
    gt_labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    torch.manual_seed(0)
    logits = torch.randn(2, num_anchors, num_classes + 1)
    regression = torch.randn(2, num_anchors, 4) * 0.1
    for min_neg in (0, 2):
        loss_fn = MultiboxLoss(anchors, BoxCoder(), num_classes=num_classes, min_negatives_per_image=min_neg)
        out = loss_fn(regression, logits, gt_boxes, gt_labels)
        per_anchor = [[sum(_bce(float(logits[f, a, c]), float(c == (2 if (f, a) == (0, 0) else 0)))
                           for c in range(num_classes + 1)) for a in range(num_anchors)] for f in range(2)]
        negatives0 = sorted(per_anchor[0][1:], reverse=True)
        negatives1 = sorted(per_anchor[1], reverse=True)
        manual_cls = per_anchor[0][0] + 0.3 * sum(negatives0[:10]) + 0.3 * sum(negatives1[:min_neg])
        manual_loc = sum(F.smooth_l1_loss(regression[0, 0], torch.zeros(4), reduction="none").tolist())
        assert out["num_matched"].item() == 1
        assert out["cls_loss"].item() == pytest.approx(manual_cls, rel=1e-5)
        assert out["loc_loss"].item() == pytest.approx(manual_loc, rel=1e-5)
        assert out["loss"].item() == pytest.approx(manual_cls + 4 * manual_loc, rel=1e-5)


def test_loss_normalised_by_matches_and_zero_loc_for_perfect_regression() -> None:
    coder = BoxCoder()
    anchors = generate_anchors([4, 2, 1])
    gt_boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]]), torch.tensor([[0.0, 0.2, 0.6, 0.9]])]
    gt_labels = [torch.tensor([1, 3]), torch.tensor([2])]
    loss_fn = MultiboxLoss(anchors, coder, num_classes=3)
    regression = torch.zeros(2, anchors.shape[0], 4)
    for f in range(2):  # regress every anchor exactly onto the gt it is matched to
        matched = match(anchors, gt_boxes[f])
        pos = matched >= 0
        regression[f, pos] = coder.encode(gt_boxes[f][matched[pos]], anchors[pos])
    logits = torch.zeros(2, anchors.shape[0], 4)
    out = loss_fn(regression, logits, gt_boxes, gt_labels)
    assert out["loc_loss"].item() < 1e-6
    num_matched = int(sum((match(anchors, b) >= 0).sum() for b in gt_boxes))
    assert out["num_matched"].item() == num_matched >= 3
    # Zero logits: every anchor's sigmoid CE is 4*log 2; positives weigh 1, mined negatives 0.3.
    kept = sum(min(10 * int((match(anchors, b) >= 0).sum()), int((match(anchors, b) < 0).sum())) for b in gt_boxes)
    expected = 4 * math.log(2) * (num_matched + 0.3 * kept) / num_matched
    assert out["cls_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_loss_rejects_bad_labels_and_shapes() -> None:
    anchors = generate_anchors([2, 1])
    loss_fn = MultiboxLoss(anchors, BoxCoder(), num_classes=3)
    reg, logits = torch.zeros(1, anchors.shape[0], 4), torch.zeros(1, anchors.shape[0], 4)
    with pytest.raises(ValueError, match="1..3"):
        loss_fn(reg, logits, [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], [torch.tensor([0])])
    with pytest.raises(ValueError, match="class_logits"):
        loss_fn(reg, logits[..., :3], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])


def test_loss_falls_when_overfitting_a_tiny_batch() -> None:
    torch.manual_seed(0)
    sizes, num_classes = [4, 2, 1], 3
    anchors = generate_anchors(sizes)
    per_loc = num_anchors_per_location(len(sizes))
    features = [torch.randn(2, 8, s, s) for s in sizes]
    heads = nn.ModuleList(nn.Conv2d(8, k * (4 + num_classes + 1), 3, padding=1) for k in per_loc)
    gt_boxes = [torch.tensor([[0.1, 0.1, 0.45, 0.6]]), torch.tensor([[0.3, 0.2, 0.9, 0.95], [0.0, 0.6, 0.3, 0.9]])]
    gt_labels = [torch.tensor([1]), torch.tensor([3, 2])]
    loss_fn = MultiboxLoss(anchors, BoxCoder(), num_classes=num_classes)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)

    def predict() -> tuple[torch.Tensor, torch.Tensor]:
        outs = [h(x).permute(0, 2, 3, 1).reshape(2, -1, 4 + num_classes + 1) for h, x in zip(heads, features)]
        out = torch.cat(outs, dim=1)  # [N, A, 4 + C + 1] in (y, x, anchor) order
        return out[..., :4], out[..., 4:]

    losses = []
    for _ in range(100):
        out = loss_fn(*predict(), gt_boxes, gt_labels)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.1 * losses[0]


def test_frames_without_objects_give_finite_zero_loss() -> None:
    anchors = generate_anchors([4, 2, 1])
    loss_fn = MultiboxLoss(anchors, BoxCoder(), num_classes=3)
    regression = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
    logits = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = loss_fn(regression, logits, empty, [torch.zeros(0, dtype=torch.long)] * 2)
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and out["num_matched"].item() == 0
    assert torch.isfinite(logits.grad).all() and torch.isfinite(regression.grad).all()
