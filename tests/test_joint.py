"""TRAIN.JOINT (Ren et al. 3.2): approximate joint training (proposals are constants) against exact (the
RoI-wise loss reaches the RPN's box regression through crop pooling's sampling grid)."""

from __future__ import annotations

import math

import pytest
import torch

from frcnn.config import load_config
from frcnn.errors import ConfigError
from frcnn.model import pooling
from frcnn.model.detector import FasterRCNN
from frcnn.model.pooling import crop_pool, crop_pool_grid_sample
from frcnn.model.proposal_target import proposal_target_layer
from frcnn.model.rpn import proposal_layer
from frcnn.model.trace import Trace

STRIDE = 4
SIZE = (64, 96)  # (h, w) of the random training images
GTS = [torch.tensor([[10.0, 8, 50, 40], [40.0, 20, 90, 60]])]
LABELS = [torch.tensor([1, 2])]


def _cfg(joint: str):
    return load_config("demo-cpu", ["DEVICE=cpu", "POOLING_MODE=crop", f"TRAIN.JOINT={joint}"])


def _model(joint: str) -> FasterRCNN:
    torch.manual_seed(0)  # the same weights in both modes
    return FasterRCNN(_cfg(joint), num_classes=2).train()


def _losses(model: FasterRCNN, seed: int = 0, trace: Trace | None = None) -> dict[str, torch.Tensor]:
    images = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))
    return model(images, torch.tensor([SIZE]), GTS, LABELS, torch.Generator().manual_seed(seed), trace)


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def _sample_positions(coords: torch.Tensor, grid: int) -> torch.Tensor:
    """Crop pooling's sampling positions in feature cells (align_corners=True: the RoI's corners are the
    first and last samples), worked out here from the definition, not from the code under test."""
    x1, y1, x2, y2 = (coords[:, k, None] / STRIDE for k in range(4))
    t = torch.linspace(0, 1, grid, dtype=coords.dtype)
    return torch.cat((x1 + t * (x2 - x1), y1 + t * (y2 - y1)), dim=1)


# ------------------------------------------------------------------------------------------ crop pooling


@pytest.mark.parametrize("max_pool", [False, True])
def test_crop_pool_gradient_wrt_roi_coordinates_matches_finite_differences(max_pool):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    coords = torch.tensor([[2.3, 3.1, 17.9, 14.6], [5.7, 1.9, 21.2, 19.3], [0.6, 4.4, 11.1, 22.7]],
                          dtype=torch.float64, requires_grad=True)
    batch = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)
    # a smooth point: no sample on a feature-cell line (the bilinear weights have kinks there)
    pos = _sample_positions(coords.detach(), 6 if max_pool else 3)
    assert ((pos - pos.round()).abs() > 0.005).all()

    def pooled(c: torch.Tensor) -> torch.Tensor:
        return crop_pool_grid_sample(features, torch.cat((batch, c), dim=1), 3, STRIDE, max_pool)

    assert torch.autograd.gradcheck(pooled, (coords,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_crop_pool_gradient_on_a_linear_map_is_the_closed_form():
    # F(x, y) = x in feature cells: bilinear sampling reproduces it, sample pw of P sits at
    # x1/s + pw/(P-1) (x2-x1)/s, so d(sum of the P*P samples)/dx1 = P * sum_pw (1 - pw/(P-1)) / s = P*P/(2s)
    p = 5
    features = torch.arange(10, dtype=torch.float64).expand(1, 1, 8, 10).contiguous()
    rois = torch.tensor([[0.0, 5.0, 6.0, 27.0, 21.0]], dtype=torch.float64, requires_grad=True)
    crop_pool_grid_sample(features, rois, p, STRIDE, max_pool=False).sum().backward()
    want = torch.tensor([[0.0, p * p / (2 * STRIDE), 0.0, p * p / (2 * STRIDE), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rois.grad, want, rtol=1e-12, atol=1e-12)


def test_crop_pool_takes_grid_sample_for_rois_with_gradient(monkeypatch):
    monkeypatch.setattr(pooling, "MIN_ROI_CHANNELS", 1)  # the CPU gathers for any size...
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 4, 6, 7, generator=g).requires_grad_()
    rois = torch.tensor([[0.0, 2.3, 3.1, 17.9, 14.6], [0.0, 5.7, 1.9, 21.2, 19.3]])
    constant = crop_pool(features, rois, 3, STRIDE)
    assert constant.grad_fn is not None and "Gather" in type(constant.grad_fn).__name__
    live = rois.clone().requires_grad_()
    out = crop_pool(features, live, 3, STRIDE)  # ...but rois that carry a gradient go to grid_sample
    torch.testing.assert_close(out, constant, rtol=0, atol=1e-5)
    assert "Gather" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert live.grad is not None and live.grad[:, 1:].abs().sum() > 0
    assert live.grad[:, 0].abs().sum() == 0  # the batch index column is not a coordinate


# ----------------------------------------------------------------------------- proposal and target layers


def test_proposal_layer_differentiable_gives_the_same_rois_with_the_deltas_gradient():
    g = torch.Generator().manual_seed(2)
    m = 40
    xy = torch.rand(m, 2, generator=g, dtype=torch.float64) * 70 - 10  # some cross the left and top edges
    anchors = torch.cat((xy, xy + 8 + torch.rand(m, 2, generator=g, dtype=torch.float64) * 30), dim=1)
    scores = torch.rand(1, m, generator=g, dtype=torch.float64)
    deltas = (torch.randn(1, m, 4, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    sizes = torch.tensor([[70, 80]])

    def rois(d: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
        return proposal_layer(scores, d, anchors, sizes, 30, 12, 0.7, differentiable=differentiable)[0]

    constant = rois(deltas, differentiable=False)
    assert not constant.requires_grad
    assert torch.equal(rois(deltas), constant)
    # clipped coordinates are constant (0 or the image's edge): the gradient passes only inside the image
    assert torch.autograd.gradcheck(rois, (deltas,), eps=1e-6, atol=1e-7, rtol=1e-5)
    x1 = rois(deltas)[:, 1]
    (grad,) = torch.autograd.grad(x1.sum(), deltas)
    clipped = int((x1 == 0).sum())
    assert clipped > 0 and int((grad[0, :, 0] != 0).sum()) == x1.shape[0] - clipped
    live = grad[0, :, 0] != 0  # x1 = dx * w + cx - w' / 2: d x1 / d dx is the anchor's width w
    torch.testing.assert_close(grad[0, live, 0], anchors[live, 2] - anchors[live, 0] + 1, rtol=1e-12, atol=0)


def test_proposal_target_layer_keeps_the_proposals_gradient_not_the_targets():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(30, 2, generator=g) * 50
    proposals = torch.cat((xy, xy + 10 + torch.rand(30, 2, generator=g) * 40), dim=1).requires_grad_()
    rois = torch.cat((torch.zeros(30, 1), proposals), dim=1)
    cfg = _cfg("exact").TRAIN
    sampled, labels, targets = proposal_target_layer(rois, GTS, LABELS, cfg, torch.Generator().manual_seed(0))
    const, const_labels, const_targets = proposal_target_layer(rois.detach(), GTS, LABELS, cfg,
                                                               torch.Generator().manual_seed(0))
    assert torch.equal(sampled, const) and torch.equal(labels, const_labels) and torch.equal(targets, const_targets)
    assert sampled.requires_grad and not targets.requires_grad and not labels.requires_grad
    sampled[:, 1:].sum().backward()
    # each proposal's coordinates get 1 for every time it was sampled; the gt boxes appended are constants
    is_gt = (sampled[:, None, 1:] == GTS[0][None]).all(-1).any(1)
    times = (sampled.detach()[:, None, 1:] == proposals.detach()[None]).all(-1).sum(0)
    assert int(is_gt.sum()) > 0 and int(times.sum()) == sampled.shape[0] - int(is_gt.sum())
    torch.testing.assert_close(proposals.grad, times[:, None].float().expand(-1, 4), rtol=0, atol=0)


def test_exact_needs_crop_pooling():
    with pytest.raises(ConfigError, match="TRAIN.JOINT=exact needs POOLING_MODE=crop"):
        load_config("demo-cpu", ["TRAIN.JOINT=exact", "POOLING_MODE=align"])
    assert load_config("demo-cpu", ["TRAIN.JOINT=approximate", "POOLING_MODE=align"]).TRAIN.JOINT == "approximate"


# -------------------------------------------------------------------------------------------- detector


def test_roi_loss_reaches_the_rpn_box_regression_only_in_exact_mode():
    grads = {}
    for joint in ("approximate", "exact"):
        model = _model(joint)
        losses = _losses(model)
        roi = _grads(losses["rcnn_cls"] + losses["rcnn_box"], [model.rpn.rpn_bbox_pred_net.weight,
                                                                 model.rpn.rpn_cls_score_net.weight])
        grads[joint] = (roi, _grads(losses["rpn_cls"] + losses["rpn_box"], list(model.parameters())))
        assert roi[1] is None or not roi[1].any()  # objectness only ranks proposals, in both modes
    approx_box, exact_box = grads["approximate"][0][0], grads["exact"][0][0]
    assert approx_box is None or not approx_box.any()
    assert exact_box is not None and exact_box.abs().sum() > 0
    for a, b in zip(grads["approximate"][1], grads["exact"][1], strict=True):  # RPN-only loss: the same
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("gathers", [False, True])
def test_exact_and_approximate_forward_are_identical(gathers, monkeypatch):
    if gathers:  # approximate pools by the CPU gathers (as R50-C4's 128 x 1024 would), exact by grid_sample
        monkeypatch.setattr(pooling, "MIN_ROI_CHANNELS", 1)
    traces = {joint: Trace() for joint in ("approximate", "exact")}
    losses = {joint: _losses(_model(joint), seed=4, trace=traces[joint]) for joint in traces}
    for stage, key in (("proposal_layer", "rois"), ("proposal_target", "rois"), ("proposal_target", "labels")):
        assert torch.equal(traces["approximate"][stage][key], traces["exact"][stage][key]), (stage, key)
    tol = {"rtol": 1e-5, "atol": 1e-5} if gathers else {"rtol": 0, "atol": 0}  # the gathers: within 1e-5
    torch.testing.assert_close(traces["approximate"]["roi_pooling"]["crops"], traces["exact"]["roi_pooling"]["crops"],
                               **tol)
    for key in losses["approximate"]:
        torch.testing.assert_close(losses["approximate"][key], losses["exact"][key], **tol, msg=key)


def test_exact_training_steps_stay_finite():
    model = _model("exact")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    before = model.rpn.rpn_bbox_pred_net.weight.detach().clone()
    for step in range(3):
        losses = _losses(model, seed=step)
        assert all(math.isfinite(v.item()) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    assert not torch.equal(model.rpn.rpn_bbox_pred_net.weight, before)
