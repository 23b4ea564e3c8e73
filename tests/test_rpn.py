"""RPN (frcnn.model.rpn): output layout, anchor ordering, and the proposal layer."""

from __future__ import annotations

import pytest
import torch

from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.model.rpn import RPN, proposal_layer, stable_top_k
from frcnn.model.trace import Trace


def test_rpn_output_shapes():
    rpn = RPN(8, 16, 9)
    logits, deltas = rpn(torch.randn(2, 8, 3, 5))
    assert logits.shape == (2, 3 * 5 * 9, 2)
    assert deltas.shape == (2, 3 * 5 * 9, 4)


def _hand_set_rpn(c: int, a: int, anchor: int) -> RPN:
    """rpn_net copies its input (centre tap identity); the heads read input channel 0 only, for ``anchor``:
    its foreground logit is 10 (its background 0) and its deltas are (1, 2, 3, 4)."""
    rpn = RPN(c, c, a)
    with torch.no_grad():
        for layer in (rpn.rpn_net, rpn.rpn_cls_score_net, rpn.rpn_bbox_pred_net):
            layer.weight.zero_()
            layer.bias.zero_()
        for k in range(c):
            rpn.rpn_net.weight[k, k, 1, 1] = 1.0
        rpn.rpn_cls_score_net.weight[a + anchor, 0, 0, 0] = 10.0  # channels: A background, then A foreground
        for k in range(4):
            rpn.rpn_bbox_pred_net.weight[anchor * 4 + k, 0, 0, 0] = k + 1.0  # channels: per anchor, 4 coords
    return rpn


@pytest.mark.parametrize(("h", "w", "anchor"), [(0, 0, 0), (1, 3, 5), (2, 4, 8), (2, 0, 3)])
def test_rpn_anchor_ordering(h, w, anchor):
    H, W, A = 3, 5, 9
    rpn = _hand_set_rpn(4, A, anchor)
    features = torch.zeros(1, 4, H, W)
    features[0, 0, h, w] = 1.0
    logits, deltas = rpn(features)
    row = ((h * W) + w) * A + anchor
    fg = logits.softmax(-1)[0, :, 1]
    assert int(fg.argmax()) == row
    assert logits[0, row].tolist() == [0.0, 10.0]
    assert (logits[0, torch.arange(H * W * A) != row] == 0).all()
    assert deltas[0, row].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert int((deltas[0].abs().sum(-1) > 0).sum()) == 1


def test_rpn_rows_match_shifted_anchor_rows():
    """The row a score lands in is the row of the anchor at that cell in shift_anchors."""
    H, W, A = 3, 5, 9
    h, w, anchor = 2, 1, 7
    rpn = _hand_set_rpn(4, A, anchor)
    features = torch.zeros(1, 4, H, W)
    features[0, 0, h, w] = 1.0
    row = int(rpn(features)[0].softmax(-1)[0, :, 1].argmax())
    anchors = shift_anchors(generate_anchors(), H, W, 16)
    expected = generate_anchors()[anchor] + torch.tensor([w * 16.0, h * 16, w * 16, h * 16])
    assert torch.equal(anchors[row], expected)


def test_rpn_batch_items_independent():
    rpn = RPN(4, 8, 9)
    x = torch.randn(2, 4, 3, 5)
    logits, deltas = rpn(x)
    l1, d1 = rpn(x[1:])
    torch.testing.assert_close(logits[1:], l1)
    torch.testing.assert_close(deltas[1:], d1)


# --------------------------------------------------------------------------------------- proposal layer


def _proposals(boxes, scores, sizes=((1000, 1000),), pre=100, post=100, thresh=0.7, trace=None):
    boxes = torch.as_tensor(boxes)
    scores = torch.as_tensor(scores, dtype=boxes.dtype)
    n = scores.shape[0] if scores.dim() == 2 else 1
    scores = scores.view(n, -1)
    deltas = torch.zeros(n, boxes.shape[0], 4, dtype=boxes.dtype)
    return proposal_layer(scores, deltas, boxes, torch.tensor(sizes), pre, post, thresh, trace)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_keeps_iou_exactly_at_threshold(dtype):
    # +1 convention: [0,0,9,9] is 100 px, [0,0,6,9] is 70 px inside it: IoU exactly 0.7; reference keeps ovr <= thresh
    boxes = torch.tensor([[0.0, 0, 9, 9], [0.0, 0, 6, 9]], dtype=dtype)
    rois, scores = _proposals(boxes, [0.9, 0.8], thresh=0.7)
    assert rois.shape[0] == 2
    rois, _ = _proposals(boxes, [0.9, 0.8], thresh=0.69)
    assert rois[:, 1:].tolist() == [[0.0, 0.0, 9.0, 9.0]]


def test_nms_measures_iou_with_plus_one():
    # +1 IoU of [0,0,9,9] and [0,0,7,9] is 80/100 = 0.8; without +1 it would be 63/81 = 0.778
    boxes = torch.tensor([[0.0, 0, 9, 9], [0.0, 0, 7, 9]])
    rois, _ = _proposals(boxes, [0.9, 0.8], thresh=0.79)
    assert rois.shape[0] == 1
    rois, _ = _proposals(boxes, [0.9, 0.8], thresh=0.81)
    assert rois.shape[0] == 2


def test_nms_keeps_float32_iou_exactly_at_threshold_08():
    boxes = torch.tensor([[0.0, 0, 9, 9], [0.0, 0, 7, 9]])  # IoU exactly 0.8 under +1
    rois, _ = _proposals(boxes, [0.9, 0.8], thresh=0.8)
    assert rois.shape[0] == 2


def test_proposals_decoded_from_deltas():
    anchors = torch.tensor([[10.0, 20, 49, 59]])
    deltas = torch.tensor([[[0.25, -0.5, 0.6931472, 0.0]]])
    rois, _ = proposal_layer(torch.tensor([[0.9]]), deltas, anchors, torch.tensor([[1000, 1000]]), 10, 10, 0.7)
    torch.testing.assert_close(rois, torch.tensor([[0.0, 0.0, 0.0, 79.0, 39.0]]), rtol=0, atol=1e-4)


def test_clipping_to_each_images_own_size_and_batch_index():
    anchors = torch.tensor([[-50.0, -50, 500, 500], [100.0, 10, 900, 40], [5.0, 5, 20, 20]])
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.7, 0.8, 0.9]])
    deltas = torch.zeros(2, 3, 4)
    sizes = torch.tensor([[300, 400], [60, 80]])  # (h, w)
    rois, out_scores = proposal_layer(scores, deltas, anchors, sizes, 10, 10, 0.7)
    img0, img1 = rois[rois[:, 0] == 0], rois[rois[:, 0] == 1]
    assert torch.equal(rois[:, 0], torch.tensor([0.0] * len(img0) + [1.0] * len(img1)))  # grouped by image
    assert img0[:, 1:].tolist() == [[0.0, 0.0, 399.0, 299.0], [100.0, 10.0, 399.0, 40.0], [5.0, 5.0, 20.0, 20.0]]
    assert (img1[:, [1, 3]] <= 79).all() and (img1[:, [2, 4]] <= 59).all() and (img1[:, 1:] >= 0).all()
    assert [0.0, 0.0, 79.0, 59.0] in img1[:, 1:].tolist()


def test_at_most_post_nms_top_n_per_image_and_sorted_scores():
    g = torch.Generator().manual_seed(0)
    anchors = shift_anchors(generate_anchors(), 10, 12, 16)
    m = anchors.shape[0]
    scores = torch.rand(2, m, generator=g)
    deltas = torch.randn(2, m, 4, generator=g) * 0.1
    sizes = torch.tensor([[160, 192], [120, 150]])
    trace = Trace()
    rois, out_scores = proposal_layer(scores, deltas, anchors, sizes, 300, 25, 0.7, trace)
    for i in range(2):
        sel = rois[:, 0] == i
        assert 0 < int(sel.sum()) <= 25
        s = out_scores[sel]
        assert torch.equal(s, s.sort(descending=True).values)
    rec = trace["proposal_layer"]
    assert rec["pre_nms_boxes"].shape == (2, 300, 4)
    assert torch.equal(rec["pre_nms_scores"], scores.topk(300, dim=1).values)
    assert torch.equal(rec["rois"], rois)


def test_post_nms_cap_keeps_the_best():
    boxes = torch.tensor([[0.0, 0, 9, 9], [100.0, 0, 109, 9], [200.0, 0, 209, 9], [300.0, 0, 309, 9]])
    rois, scores = _proposals(boxes, [0.1, 0.9, 0.5, 0.7], post=2)
    assert rois[:, 1].tolist() == [100.0, 300.0]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))


def test_pre_nms_top_n_limits_candidates():
    boxes = torch.tensor([[0.0, 0, 9, 9], [100.0, 0, 109, 9], [200.0, 0, 209, 9], [300.0, 0, 309, 9]])
    rois, _ = _proposals(boxes, [0.1, 0.9, 0.5, 0.7], pre=3, post=10)
    assert sorted(rois[:, 1].tolist()) == [100.0, 200.0, 300.0]


def test_nms_suppresses_lower_scored_overlap_only_within_an_image():
    boxes = torch.tensor([[0.0, 0, 9, 9], [1.0, 0, 10, 9]])  # IoU 0.818
    scores = torch.tensor([[0.6, 0.9], [0.9, 0.6]])
    rois, _ = proposal_layer(scores, torch.zeros(2, 2, 4), boxes, torch.tensor([[50, 50], [50, 50]]), 10, 10, 0.7)
    assert rois.tolist() == [[0.0, 1.0, 0.0, 10.0, 9.0], [1.0, 0.0, 0.0, 9.0, 9.0]]


def _sorted_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.sort(dim=1, descending=True, stable=True)[1][:, :k]


@pytest.mark.parametrize("seed", range(6))
def test_stable_top_k_is_the_first_k_of_a_stable_sort_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 3000, (1,), generator=g))
    # few distinct values: ties everywhere, also across the k-th place
    scores = torch.randint(0, 7, (2, m), generator=g).float() / 7
    if seed % 2:
        scores = torch.rand(2, m, generator=g)
        scores[:, ::5] = 0.5  # a block of equal scores among distinct ones
    for k in (1, 2, m // 3, m - 1, m, m + 5):
        k = max(k, 0)
        assert torch.equal(stable_top_k(scores, k), _sorted_first(scores, k)), (m, k)
    assert stable_top_k(scores, 0).shape == (2, 0)


def test_stable_top_k_with_nan_orders_like_the_sort():
    scores = torch.tensor([[0.3, float("nan"), 0.9, 0.3, 0.1, 0.3]])
    for k in range(1, 7):
        assert torch.equal(stable_top_k(scores, k), _sorted_first(scores, k))


def test_proposals_of_the_top_k_path_equal_a_transcription_that_decodes_every_anchor():
    """The proposal layer decodes only its top RPN_PRE_NMS_TOP_N anchors; decoding all of them first (the
    write-up's order) and then picking gives the same rois and scores, exactly."""
    import torchvision

    from frcnn.boxes import bbox_transform_inv, clip_boxes, to_exclusive

    g = torch.Generator().manual_seed(0)
    anchors = shift_anchors(generate_anchors(), 30, 40, 16)
    m = anchors.shape[0]
    fg = torch.rand(1, m, generator=g)
    deltas = torch.randn(1, m, 4, generator=g) * 0.2
    rois, scores = proposal_layer(fg, deltas, anchors, torch.tensor([[480.0, 640.0]]), 2000, 300, 0.7)
    boxes = clip_boxes(bbox_transform_inv(anchors, deltas[0]), 480.0, 640.0)
    order = fg[0].sort(descending=True, stable=True)[1][:2000]
    keep = torchvision.ops.nms(to_exclusive(boxes[order]), fg[0, order], 0.7)[:300]
    assert torch.equal(rois[:, 1:], boxes[order][keep]) and torch.equal(scores, fg[0, order][keep])


@torch.no_grad()
def _rpn_scores(overrides: list[str], state: dict | None = None):
    """The RPN's logits (N, H, W, A, 2) of a tiny detector (BatchNorm in eval, so no batch statistics) on a fixed
    image; ``state``: the head's and the RPN's weights to load first."""
    from frcnn.config import load_config
    from frcnn.model.detector import FasterRCNN

    torch.manual_seed(0)
    model = FasterRCNN(load_config(None, ["BACKBONE=tiny", "RPN_CHANNELS=32", *overrides]), 3).eval()
    if state is not None:
        model.head.load_state_dict(state["head"])
        model.rpn.load_state_dict(state["rpn"])
    image = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    features = model.head(image)
    logits, _ = model.rpn(features)
    return logits.view(1, *features.shape[-2:], -1, 2), {"head": model.head.state_dict(),
                                                           "rpn": model.rpn.state_dict()}


def test_rpn_dilation_2_on_the_dilated_stride_8_map_is_the_stride_16_rpn_every_8_px():
    """The atrous conversion carried through the RPN: the stride-16 network's weights in the DILATED stride-8 one
    with RPN_DILATION 2 give the stride-16 RPN's scores at every 2nd cell, from the first (its 3x3 conv reads the
    cells 16 px apart there, 2 cells apart here); with the plain 3x3 conv they do not."""
    coarse, state = _rpn_scores(["FEAT_STRIDE=16"])
    dense, _ = _rpn_scores(["FEAT_STRIDE=8", "DILATED=true", "RPN_DILATION=2"], state)
    plain, _ = _rpn_scores(["FEAT_STRIDE=8", "DILATED=true"], state)
    assert coarse.shape[1:3] == (6, 8) and dense.shape[1:3] == (12, 16)
    torch.testing.assert_close(dense[:, ::2, ::2], coarse, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain[:, ::2, ::2], coarse, atol=1e-3)


def test_rpn_dilation_sets_the_conv_and_keeps_the_map_size():
    rpn = RPN(8, 16, 9, dilation=3)
    assert rpn.rpn_net.dilation == (3, 3) and rpn.rpn_net.padding == (3, 3)
    logits, _ = rpn(torch.randn(1, 8, 7, 5))
    assert logits.shape == (1, 7 * 5 * 9, 2)


def test_rpn_dilation_below_1_is_one_line_and_old_runs_rebuild_the_plain_conv():
    from frcnn.config import ConfigError, config_from_dict, config_to_dict, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["RPN_DILATION=0"])
    assert str(info.value) == "RPN_DILATION=0 must be 1 or more (1: the plain 3x3 conv)"
    saved = config_to_dict(load_config("scratch-cpu"))
    saved.pop("RPN_DILATION")  # a run's config.yaml from before the key
    assert config_from_dict(saved).RPN_DILATION == 1


@pytest.mark.parametrize(("rpn_dilation", "field"), [(1, 103), (2, 119)])
def test_rpn_receptive_field_on_the_dilated_stride_8_map(rpn_dilation, field):
    """By hand: the dilated tiny backbone's 87 px, plus the RPN's 3x3 conv at a jump of 8 px: 2 x 8 = 16 more, or
    2 x 16 = 32 with its taps 2 cells apart."""
    from frcnn.config import load_config
    from frcnn.model.detector import FasterRCNN

    model = FasterRCNN(load_config(None, ["BACKBONE=tiny", "FEAT_STRIDE=8", "DILATED=true", "RPN_CHANNELS=8",
                                          f"RPN_DILATION={rpn_dilation}"]), 3).eval()
    for m in model.modules():  # positive weights and input: no ReLU cuts the gradient, so it reaches the whole field
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, 0.01)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    image = torch.ones(1, 3, 256, 256, requires_grad=True)
    torch.relu(model.rpn.rpn_net(model.head(image)))[0, :, 16, 16].sum().backward()
    reached = (image.grad[0].abs().sum((0, 1)) > 0).nonzero().flatten()
    assert int(reached[-1] - reached[0] + 1) == field
