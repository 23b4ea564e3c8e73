"""Classification network (frcnn.model.roi_heads): output sizes and the reference initialisation."""

from __future__ import annotations

import torch
from torch import nn

from frcnn.model.roi_heads import ClassificationNetwork


def test_outputs_scores_and_class_specific_boxes():
    torch.manual_seed(0)
    tail = nn.Sequential(nn.Flatten(), nn.Linear(8 * 7 * 7, 32))
    net = ClassificationNetwork(tail, 32, num_classes=21)
    scores, boxes = net(torch.randn(5, 8, 7, 7))
    assert scores.shape == (5, 21) and boxes.shape == (5, 84)


def test_reference_initialisation():
    torch.manual_seed(0)
    net = ClassificationNetwork(nn.Identity(), 2048, num_classes=21)
    assert (net.cls_score_net.bias == 0).all() and (net.bbox_pred_net.bias == 0).all()
    assert abs(net.cls_score_net.weight.std().item() - 0.01) < 0.001
    assert abs(net.bbox_pred_net.weight.std().item() - 0.001) < 0.0001
