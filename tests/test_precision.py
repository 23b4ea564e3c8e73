"""Mixed precision (frcnn.engine.precision, TRAIN.AMP / TEST.AMP): the float32 layers stay float32 under bf16
autocast, bf16 detections match fp32 ones on the same weights, a short bf16 training run learns."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_overfit import TinySet

from frcnn.boxes import bbox_transform, bbox_transform_inv, box_iou, clip_boxes
from frcnn.config import load_config
from frcnn.engine import precision
from frcnn.engine.inference import Predictor
from frcnn.engine.precision import Precision, resolve_amp
from frcnn.engine.train import build_optimizer, learning_rate
from frcnn.errors import ConfigError
from frcnn.model.anchor_target import anchor_target_layer
from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.model.detector import FasterRCNN
from frcnn.model.losses import fast_rcnn_loss, rpn_loss
from frcnn.model.pooling import crop_pool, pool_rois
from frcnn.model.proposal_target import proposal_target_layer
from frcnn.model.rpn import proposal_layer
from frcnn.model.trace import Trace
from frcnn.transforms import image_to_tensor, prep_image

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def _bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


def _cfg(*overrides: str):
    return load_config("demo-cpu", ["DEVICE=cpu", "TRAIN.SCALES=[160]", "TEST.SCALES=[160]", *overrides])


def _half(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16, as a conv under autocast would hand it over."""
    return t.to(BF16)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("key", ["TRAIN.AMP", "TEST.AMP"])
def test_config_amp_choices(key):
    assert load_config().TRAIN.AMP == "none" and load_config().TEST.AMP == "none"
    for mode in ("none", "fp16", "bf16"):
        cfg = load_config("demo-cpu", [f"{key}={mode}"])
        assert (cfg.TRAIN if key.startswith("TRAIN") else cfg.TEST).AMP == mode
    with pytest.raises(ConfigError) as e:
        load_config("demo-cpu", [f"{key}=fp32"])
    choices = "none, fp16, bf16, auto" if key == "TRAIN.AMP" else "none, fp16, bf16"
    assert str(e.value) == f"{key}='fp32' is not one of {choices}"
    if key == "TRAIN.AMP":  # auto: resolved by frcnn train for its device (below)
        assert load_config("demo-cpu", ["TRAIN.AMP=auto"]).TRAIN.AMP == "auto"


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    mode, why = resolve_amp("auto", CPU)
    assert mode == ("bf16" if native else "none")
    assert why == ("this CPU computes bfloat16 natively" if native else
                   f"no native bfloat16 on this CPU ({torch.backends.cpu.get_cpu_capability()}): float32")
    assert Precision("auto", CPU).dtype == (BF16 if native else torch.float32)
    for given in ("none", "bf16", "fp16"):  # anything but auto is the user's choice, kept
        assert resolve_amp(given, CPU) == (given, "")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_amp("auto", torch.device("cuda", 0))[0] == ("bf16" if bf16 else "fp16")
    assert resolve_amp("auto", torch.device("meta")) == ("none", "no mixed precision on meta")


# ------------------------------------------------------------------------------------------- Precision


def test_fp16_on_cpu_is_one_config_error_line():
    with pytest.raises(ConfigError) as e:
        Precision("fp16", CPU, key="TRAIN.AMP")
    message = str(e.value)
    assert "\n" not in message and "TRAIN.AMP=fp16" in message and "GPU" in message
    with pytest.raises(ConfigError, match="TEST.AMP=fp16"):
        Predictor(FasterRCNN(_cfg(), 2), _cfg("TEST.AMP=fp16"), ("a", "b")).predict([TinySet().images[0]])


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="AMP='half' is not one of none, fp16, bf16"):
        Precision("half", CPU)


def test_autocast_contexts():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with Precision("none", CPU).autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert layer(x).dtype == torch.float32
    with Precision("bf16", "cpu").autocast():
        assert torch.is_autocast_enabled("cpu")
        assert layer(x).dtype == BF16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("mode", ["none", "bf16"])
def test_backward_step_and_empty_state_without_fp16(mode):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    precision = Precision(mode, CPU)
    with precision.autocast():
        loss = layer(torch.ones(3, 4)).float().pow(2).mean()
    assert precision.backward_step(loss, optimizer) is None
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert not torch.equal(layer.weight, before)  # the optimizer stepped
    assert precision.state_dict() == {}
    precision.load_state_dict({})
    precision.load_state_dict({"scale": 1024.0})  # a scaler state means nothing without fp16: ignored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a CUDA device; this machine has none")
def test_fp16_on_cuda_scales_the_loss_and_resumes_the_scale():
    device = torch.device("cuda")
    layer = torch.nn.Linear(4, 1).to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    precision = Precision("fp16", device)
    with precision.autocast():
        out = layer(torch.ones(3, 4, device=device))
        assert out.dtype == torch.float16
    precision.backward_step(out.float().pow(2).mean(), optimizer)
    state = precision.state_dict()
    assert state["scale"] > 0
    again = Precision("fp16", device)
    again.load_state_dict(state)
    assert again.state_dict() == state


# ------------------------------------------------------------------------- float32 layers under autocast

BOXES = torch.tensor([[10.0, 20, 120, 90], [200.0, 150, 310, 300], [0.0, 0, 15, 15]])
DELTAS = torch.tensor([[0.12, -0.31, 0.27, -0.45], [-0.08, 0.05, 0.61, 0.33], [0.5, 0.5, -0.2, 0.1]])


def test_box_coding_iou_and_clipping_are_float32_on_bf16_inputs():
    with _bf16_autocast():
        decoded = bbox_transform_inv(BOXES, _half(DELTAS))
        coded = bbox_transform(_half(BOXES), _half(BOXES + 3))
        iou = box_iou(_half(BOXES), _half(BOXES + 3))
        clipped = clip_boxes(_half(BOXES), 240, 320)
    for out in (decoded, coded, iou, clipped):
        assert out.dtype == torch.float32
    # computed in float32 from the bf16 values (exp and the products are not bf16 roundings)
    torch.testing.assert_close(decoded, bbox_transform_inv(BOXES, _half(DELTAS).float()), rtol=0, atol=0)
    torch.testing.assert_close(iou, box_iou(_half(BOXES).float(), _half(BOXES + 3).float()), rtol=0, atol=0)
    # the coding of the bf16-rounded boxes (303 is 304 in bf16), decoded in float32, gives them back
    torch.testing.assert_close(bbox_transform_inv(_half(BOXES).float(), coded), _half(BOXES + 3).float(),
                               rtol=0, atol=1e-4)
    # float64 stays float64
    assert bbox_transform_inv(BOXES.double(), DELTAS.double()).dtype == torch.float64


def test_losses_are_float32_on_bf16_logits_and_deltas():
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(2, 50, 2, generator=g), torch.randn(2, 50, 4, generator=g)
    targets = torch.randn(2, 50, 4, generator=g)
    labels = torch.randint(-1, 2, (2, 50), generator=g)
    cls_logits, bbox_pred = torch.randn(40, 4, generator=g), torch.randn(40, 16, generator=g)
    roi_labels, roi_targets = torch.randint(0, 4, (40,), generator=g), torch.randn(40, 4, generator=g)
    expected = (*rpn_loss(_half(logits).float(), _half(deltas).float(), labels, targets),
                *fast_rcnn_loss(_half(cls_logits).float(), _half(bbox_pred).float(), roi_labels, roi_targets))
    for context in (_bf16_autocast, torch.no_grad):  # with autocast and with bf16 tensors alone
        with context():
            got = (*rpn_loss(_half(logits), _half(deltas), labels, targets),
                   *fast_rcnn_loss(_half(cls_logits), _half(bbox_pred), roi_labels, roi_targets))
        for value, want in zip(got, expected):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-6)


def _anchors(fh: int = 10, fw: int = 10, stride: int = 16) -> torch.Tensor:
    return shift_anchors(generate_anchors(stride, (0.5, 1, 2), (2, 4, 8)), fh, fw, stride)


def test_proposal_layer_decodes_and_ranks_in_float32():
    anchors = _anchors()
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, anchors.shape[0], generator=g)
    deltas = torch.randn(1, anchors.shape[0], 4, generator=g) * 0.2
    sizes = torch.tensor([[160, 160]])
    with _bf16_autocast():
        rois, roi_scores = proposal_layer(_half(scores), _half(deltas), anchors, sizes, 300, 50, 0.7)
    assert rois.dtype == torch.float32 and roi_scores.dtype == torch.float32
    want_rois, want_scores = proposal_layer(_half(scores).float(), _half(deltas).float(), anchors, sizes, 300, 50, 0.7)
    torch.testing.assert_close(rois, want_rois, rtol=0, atol=0)
    torch.testing.assert_close(roi_scores, want_scores, rtol=0, atol=0)


def test_target_layers_stay_float32_under_autocast():
    cfg = _cfg().TRAIN
    anchors = _anchors()
    gt = [torch.tensor([[20.0, 30, 99, 119], [100.0, 10, 150, 70]])]
    labels = [torch.tensor([1, 2])]
    g = torch.Generator().manual_seed(2)
    rois = torch.cat((torch.zeros(30, 1), torch.rand(30, 2, generator=g) * 80,
                      80 + torch.rand(30, 2, generator=g) * 70), dim=1)
    with _bf16_autocast():
        anchor_labels, anchor_targets = anchor_target_layer(anchors, gt, torch.tensor([[160, 160]]), cfg,
                                                            torch.Generator().manual_seed(0))
        sampled, roi_labels, roi_targets = proposal_target_layer(rois, gt, labels, cfg,
                                                                 torch.Generator().manual_seed(0))
    assert anchor_targets.dtype == torch.float32 and sampled.dtype == torch.float32
    assert roi_targets.dtype == torch.float32
    assert int((anchor_labels == 1).sum()) > 0 and int((roi_labels > 0).sum()) > 0
    want = anchor_target_layer(anchors, gt, torch.tensor([[160, 160]]), cfg, torch.Generator().manual_seed(0))[1]
    torch.testing.assert_close(anchor_targets, want, rtol=0, atol=0)


def test_detect_is_float32_on_bf16_logits_and_deltas():
    torch.manual_seed(0)
    model = FasterRCNN(_cfg(), num_classes=3).eval()
    g = torch.Generator().manual_seed(3)
    corners = torch.rand(20, 2, generator=g) * 60, 70 + torch.rand(20, 2, generator=g) * 80
    rois = torch.cat((torch.zeros(20, 1), *corners), dim=1)
    cls_logits, bbox_pred = torch.randn(20, 4, generator=g) * 3, torch.randn(20, 16, generator=g)
    sizes = torch.tensor([[160, 160]])
    with _bf16_autocast():
        (det,) = model.detect(rois, _half(cls_logits), _half(bbox_pred), sizes)
    (want,) = model.detect(rois, _half(cls_logits).float(), _half(bbox_pred).float(), sizes)
    assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32
    torch.testing.assert_close(det.boxes, want.boxes, rtol=0, atol=0)
    torch.testing.assert_close(det.scores, want.scores, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_roi_pooling_under_autocast_returns_the_features_dtype_at_float32_positions(mode):
    # one channel holding x - 190 on a map 200 cells wide: exact in bf16, and small (so finely rounded) near the
    # right edge, where a bf16 sampling grid (steps of 2^-8 of the half-width) would be off by up to 0.2 cells
    x = torch.arange(200, dtype=torch.float32) - 190
    features = x.view(1, 1, 1, 200).expand(1, 1, 12, 200).contiguous()
    rois = torch.tensor([[0.0, 8 * 185.3, 8 * 2.4, 8 * 196.7, 8 * 9.1]])
    with _bf16_autocast():
        out = pool_rois(_half(features), rois, mode, 4, 8)
    assert out.dtype == BF16
    want = pool_rois(features, rois, mode, 4, 8)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=0.04)


def test_crop_grid_is_not_rounded_to_bf16():
    x = torch.arange(200, dtype=torch.float32) - 190
    features = x.view(1, 1, 1, 200).expand(1, 1, 6, 200).contiguous()
    rois = torch.tensor([[0.0, 8 * 187.3, 8 * 1.0, 8 * 195.9, 8 * 4.0]])
    with _bf16_autocast():
        out = crop_pool(_half(features), rois, 5, 8, max_pool=False)
    # bilinear along x of a linear map: the sample is its own position, 187.3 .. 195.9 in 5 steps (minus 190)
    want = (torch.linspace(187.3, 195.9, 5) - 190).expand(5, 5)
    torch.testing.assert_close(out[0, 0].float(), want, rtol=0, atol=0.02)


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_whole_model_under_bf16_autocast_gives_float32_losses_and_detections(mode):
    cfg = _cfg(f"POOLING_MODE={mode}")
    torch.manual_seed(0)
    model = FasterRCNN(cfg, num_classes=2)
    data = TinySet()
    image = prep_image(image_to_tensor(data.images[0]), 160, 512, cfg.PIXEL_MEANS, cfg.PIXEL_STDS).tensor[None]
    sizes = torch.tensor([[160, 160]])
    sample = data.samples[0]
    trace = Trace()
    with _bf16_autocast():
        losses = model(image, sizes, [sample.boxes], [sample.labels], torch.Generator().manual_seed(0), trace)
    assert trace["rpn"]["deltas"].dtype == torch.float32  # the trace stores float32 (for numpy and charts)
    for name, value in losses.items():
        assert value.dtype == torch.float32 and math.isfinite(value.item()), name
    model.eval()
    with torch.no_grad(), _bf16_autocast():
        (det,) = model(image, sizes)
    assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32 and det.boxes.shape[0] > 0


# --------------------------------------------------------------- a short bf16 training run, then detections

ITERS = 40


@pytest.fixture(scope="module")
def bf16_run():
    """demo-cpu at 160 px trained ITERS iterations in bf16 through Precision on two tiny images (~3 s)."""
    # 9 anchors a cell, as the test was written with: with demo-cpu's 15 this 40-iteration model's second detection
    # is a near tie that bf16 rounding can flip (IoU 0.59 with fp32's, 2 threads on one Xeon; 1 thread passes)
    cfg = _cfg("TRAIN.LEARNING_RATE=0.02", "TRAIN.WARMUP_ITERS=10", "TRAIN.BATCH_SIZE=64", "TRAIN.AMP=bf16",
               "ANCHOR_SCALES=[2,4,8]")
    data = TinySet()
    torch.manual_seed(0)
    model = FasterRCNN(cfg, len(data.classes))
    optimizer = build_optimizer(model, cfg.TRAIN)
    precision = Precision(cfg.TRAIN.AMP, CPU, key="TRAIN.AMP")
    batches = []
    for sample in data.samples[:2]:
        p = prep_image(image_to_tensor(data.load_image(sample)), 160, 512, cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
        batches.append((p.tensor[None], torch.tensor([list(p.tensor.shape[-2:])]), [sample.boxes * p.scale],
                        [sample.labels]))
    model.train()
    head_dtypes = set()
    model.head.register_forward_hook(lambda m, i, o: head_dtypes.add(o.dtype))
    history = []
    for it in range(ITERS):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg.TRAIN, it) * group["lr_mult"]
        images, sizes, boxes, labels = batches[it % 2]
        with precision.autocast():
            losses = model(images, sizes, boxes, labels, torch.Generator().manual_seed(it))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        precision.backward_step(total, optimizer)
        history.append({k: v.item() for k, v in losses.items()} | {"dtype": total.dtype})
    return cfg, data, model.eval(), history, head_dtypes


def test_short_bf16_training_run_has_finite_falling_losses(bf16_run):
    _, _, _, history, head_dtypes = bf16_run
    assert head_dtypes == {BF16}  # the convolutions really ran in bf16
    assert all(h["dtype"] == torch.float32 for h in history)
    totals = [sum(v for k, v in h.items() if k != "dtype") for h in history]
    assert all(math.isfinite(t) for t in totals)
    first, last = sum(totals[:10]) / 10, sum(totals[-10:]) / 10
    assert last < 0.6 * first, totals
    for key in ("rpn_cls", "rcnn_cls"):
        assert sum(h[key] for h in history[-10:]) < sum(h[key] for h in history[:10]), key


@pytest.mark.parametrize("pooling", ["align", "crop", "pool"])
def test_bf16_detections_match_fp32_on_the_same_weights(bf16_run, pooling):
    cfg, data, model, _, _ = bf16_run
    cfg = replace(cfg, POOLING_MODE=pooling)
    runs = {}
    for amp in ("none", "bf16"):
        predictor = Predictor(model, replace(cfg, TEST=replace(cfg.TEST, AMP=amp)), data.classes)
        dtypes: list[torch.dtype] = []
        hook = model.head.register_forward_hook(lambda m, i, o, seen=dtypes: seen.append(o.dtype))
        runs[amp] = [predictor.predict([image])[0] for image in data.images[:2]]
        hook.remove()
        assert dtypes == [BF16 if amp == "bf16" else torch.float32] * 2  # the head ran in TEST.AMP's dtype
    for fp32, bf16 in zip(runs["none"], runs["bf16"]):
        assert bf16.boxes.dtype == torch.float32 and bf16.scores.dtype == torch.float32
        assert fp32.scores[0] > 0.3  # the model has learnt something to compare
        for j in range(min(3, fp32.boxes.shape[0])):  # the top detections: same class, same place, same score
            same_class = bf16.labels == fp32.labels[j]
            iou = box_iou(fp32.boxes[j : j + 1], bf16.boxes)[0] * same_class
            best = int(iou.argmax())
            assert iou[best] > 0.9, (j, fp32, bf16)
            assert abs(float(bf16.scores[best] - fp32.scores[j])) < 0.05
            assert (bf16.boxes[best] - fp32.boxes[j]).abs().max() < 4.0  # pixels
