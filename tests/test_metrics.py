"""Confusion matrix, IoU and mIoU on hand-made examples."""

import math

import pytest
import torch

from fastbisenet.metrics import ConfusionMatrix, format_iou_table, iou_from_confusion, mean_iou


def test_confusion_counts_and_ignore():
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    expected = torch.tensor([[2, 1, 0], [1, 2, 0], [0, 0, 1]])
    assert torch.equal(cm.mat, expected)
    cm.update(pred, target)
    assert torch.equal(cm.mat, 2 * expected)
    # labels outside 0..n-1 (negative too) are not counted; predictions out of range count as the nearest class;
    # the caller's tensors are left as they were
    pred_odd, target_odd = torch.tensor([5, -1, 1, 2]), torch.tensor([0, 1, -3, 7])
    before = pred_odd.clone()
    cm.update(pred_odd, target_odd)
    assert torch.equal(pred_odd, before)
    delta = torch.zeros(3, 3, dtype=torch.int64)
    delta[0, 2] = delta[1, 0] = 1  # (target 0, pred 5 -> 2), (target 1, pred -1 -> 0)
    assert torch.equal(cm.mat, 2 * expected + delta)


def test_iou_by_hand_with_absent_class():
    mat = torch.tensor([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    iou = iou_from_confusion(mat)
    # class 0: tp 3, fp 1 (row 3), fn 1 -> 3/5; class 1: 2/(2+1) ; class 2 absent -> NaN; class 3: 0/1
    assert iou[0].item() == pytest.approx(3 / 5)
    assert iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item())
    assert iou[3].item() == 0.0
    assert mean_iou(mat) == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]))
    iou = cm.iou()
    assert iou[2].item() == 0.0 and iou[0].item() == pytest.approx(0.5) and iou[1].item() == 1.0
    assert cm.miou() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(2 / 3)


def test_perfect_and_empty():
    cm = ConfusionMatrix(4)
    t = torch.randint(0, 4, (2, 16, 16))
    cm.update(t, t)
    assert cm.miou() == 1.0
    assert math.isnan(ConfusionMatrix(2).miou())


def test_shape_mismatch_and_table():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))
    table = format_iou_table(torch.tensor([0.5, math.nan]), ["road", "sky"])
    assert "road" in table and "50.00" in table and "sky" in table and "mIoU" in table
    assert table.splitlines()[3].split()[-1] == "-"


def test_confusion_on_device(device):
    cm = ConfusionMatrix(3, device=device)
    cm.update(torch.tensor([0, 1, 2], device=device), torch.tensor([0, 1, 1], device=device))
    assert cm.mat.device.type == torch.device(device).type
    assert cm.mat.sum().item() == 3
