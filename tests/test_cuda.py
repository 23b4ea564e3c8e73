"""On a CUDA device: the overfit test, CUDA inference against CPU inference on the same weights, and training
and explaining on CUDA tensors with the CPU sampling generators the layers are given. Every test is skipped,
with the reason, on a machine without CUDA."""

from __future__ import annotations

import copy
import json

import pytest
import test_overfit
import torch
from explain_fixtures import BOXES, CLASSES, LABELS, config, model, picture
from test_overfit import TinySet

from frcnn.config import load_config
from frcnn.engine.inference import Predictor
from frcnn.engine.train import train
from frcnn.explain.run import GroundTruth, run_traced
from frcnn.model.anchor_target import anchor_target_layer
from frcnn.model.proposal_target import proposal_target_layer
from frcnn.model.trace import Trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

CUDA = torch.device("cuda")


# ---------------------------------------------------------------------------------------- training on CUDA

@pytest.fixture(scope="module")
def overfit_on_cuda(tmp_path_factory):
    """tests/test_overfit.py's test (its TinySet, its config, its assertions) with ``DEVICE=cuda``; returns the
    trained model."""
    patch = pytest.MonkeyPatch()
    trained = []
    patch.setattr(test_overfit, "load_config", lambda name, overrides: load_config(name, [*overrides, "DEVICE=cuda"]))
    patch.setattr(test_overfit, "train", lambda *a, **k: trained.append(train(*a, **k)) or trained[-1])
    try:
        test_overfit.test_detector_overfits_a_tiny_set(tmp_path_factory.mktemp("overfit_cuda"))
    finally:
        patch.undo()
    return trained[0]


@pytest.mark.slow
def test_detector_overfits_a_tiny_set_on_cuda(overfit_on_cuda):
    assert overfit_on_cuda.cfg.DEVICE == "cuda"
    assert {p.device.type for p in overfit_on_cuda.parameters()} == {"cuda"}


def test_a_training_iteration_on_cuda_has_finite_losses(tmp_path):
    cfg = load_config("demo-cpu", ["TRAIN.SCALES=[160]", "TEST.SCALES=[160]", "TRAIN.MAX_ITERS=2",
                                   "TRAIN.SNAPSHOT_ITERS=2", "TRAIN.DISPLAY=1", "DEVICE=cuda"])
    trained = train(cfg, TinySet(), tmp_path / "run", progress=False)
    assert {p.device.type for p in trained.parameters()} == {"cuda"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r[k])) and r[k] > 0 for r in log for k in ("rpn_cls", "rcnn_cls"))


def _sample_targets(device: torch.device, seed: int):
    """The anchor target and proposal target layers on the tiny set's first two images, tensors on ``device``,
    sampling driven by a CPU generator seeded with ``seed`` (as training does)."""
    cfg = load_config("demo-cpu", ["TRAIN.BATCH_SIZE=16"])
    data = TinySet()
    gt_boxes = [data[i].boxes.to(device) for i in range(2)]
    gt_labels = [data[i].labels.to(device) for i in range(2)]
    xs = torch.arange(0.0, 160.0, 8.0)
    x1, y1 = torch.meshgrid(xs, xs, indexing="xy")
    anchors = torch.stack((x1, y1, x1 + 31, y1 + 31), dim=-1).reshape(-1, 4).to(device)  # 32-pixel squares
    sizes = torch.tensor([[160, 160], [160, 160]], device=device)
    labels, _ = anchor_target_layer(anchors, gt_boxes, sizes, cfg.TRAIN, torch.Generator().manual_seed(seed))
    rois = torch.cat((torch.zeros(len(anchors), 1), anchors.cpu()), dim=1).to(device)  # every anchor a RoI of image 0
    sampled_rois, roi_labels, _ = proposal_target_layer(rois, gt_boxes[:1], gt_labels[:1], cfg.TRAIN,
                                                        torch.Generator().manual_seed(seed))
    return labels, sampled_rois, roi_labels


def test_cpu_generators_sample_cuda_tensors_as_they_sample_cpu_tensors():
    on_cuda = _sample_targets(CUDA, seed=3)
    on_cpu = _sample_targets(torch.device("cpu"), seed=3)
    assert all(t.device.type == "cuda" for t in on_cuda)
    assert int((on_cpu[0] == 1).sum()) > 0 and int((on_cpu[0] == 0).sum()) > 0  # something was sampled
    for ours, theirs in zip(on_cuda, on_cpu):
        assert torch.equal(ours.cpu(), theirs)
    assert not torch.equal(_sample_targets(CUDA, seed=4)[0].cpu(), on_cpu[0])  # the generator does drive it


# ------------------------------------------------------------------------------ CUDA inference equals CPU

def _traced_predictions(predictor: Predictor, images) -> list:
    out = []
    for image in images:
        trace = Trace()
        det = predictor.predict([image], trace=trace)[0]
        out.append((det, trace["rpn"]["fg_scores"][0].cpu()))
    return out


@pytest.fixture
def true_float32():
    """TF32 off: on Ampere and later GPUs it rounds convolution and matmul inputs to 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.mark.slow
def test_inference_on_cuda_equals_cpu_inference_on_the_same_weights(overfit_on_cuda, true_float32):
    """The trained model on CUDA and a copy of it on the CPU: the RPN's scores of every anchor and the
    confident detections agree within float32 noise (CUDA kernels sum in another order)."""
    cfg, images = overfit_on_cuda.cfg, TinySet().images
    on_cuda = _traced_predictions(Predictor(overfit_on_cuda, cfg, TinySet.classes), images)
    on_cpu = _traced_predictions(Predictor(copy.deepcopy(overfit_on_cuda).cpu(), cfg, TinySet.classes), images)
    for (det_gpu, rpn_gpu), (det_cpu, rpn_cpu) in zip(on_cuda, on_cpu):
        torch.testing.assert_close(rpn_gpu, rpn_cpu, atol=1e-4, rtol=1e-4)
        gpu, cpu = det_gpu.scores > 0.3, det_cpu.scores > 0.3
        assert int(cpu.sum()) > 0 and int(gpu.sum()) == int(cpu.sum())
        order_gpu, order_cpu = det_gpu.scores[gpu].argsort(), det_cpu.scores[cpu].argsort()
        assert torch.equal(det_gpu.labels[gpu][order_gpu], det_cpu.labels[cpu][order_cpu])
        torch.testing.assert_close(det_gpu.boxes[gpu][order_gpu], det_cpu.boxes[cpu][order_cpu], atol=1e-2, rtol=0)
        torch.testing.assert_close(det_gpu.scores[gpu][order_gpu], det_cpu.scores[cpu][order_cpu], atol=1e-4, rtol=0)


def test_explain_runs_on_cuda_with_the_target_layers_of_the_cpu():
    """``run_traced`` on CUDA with ground truth: the anchor target layer's labels (which depend on the anchors,
    the boxes and the seeded sampling only) are those of the same run on the CPU."""
    runs = [run_traced(model(), config(), CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()),
                       warmup=False, device=device) for device in ("cuda", "cpu")]
    assert runs[0].trace["anchor_target"]["labels"].device.type == "cuda"
    assert runs[0].detections.boxes.device.type == "cpu"  # returned in original-image pixels, on the CPU
    assert torch.equal(runs[0].trace["anchor_target"]["labels"].cpu(), runs[1].trace["anchor_target"]["labels"])


# ------------------------------------------------------------------- distributed training on CUDA (NCCL)

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices on this machine")
def test_two_gpus_train_the_weights_of_one_gpu_with_twice_the_images(tmp_path):
    """tests/test_distributed.py's central test on CUDA: NCCL, one process per GPU (cuda:LOCAL_RANK)."""
    import test_distributed as td

    from frcnn.data.synthetic import make_shapes_dataset

    voc = tmp_path / "shapes"
    make_shapes_dataset(voc, num_trainval=8, num_test=4, image_size=(128, 128), seed=2)
    cuda = ("DEVICE=cuda", "TRAIN.MAX_ITERS=6")
    td._train(voc, tmp_path / "one", 1, "TRAIN.IMS_PER_BATCH=2", *cuda)
    td._train(voc, tmp_path / "two", 2, "TRAIN.IMS_PER_BATCH=1", *cuda)
    diff = td._max_diff(td._weights(tmp_path / "one"), td._weights(tmp_path / "two"))
    assert diff < 1e-4, diff  # CUDA kernels may reduce in another order than on the CPU
