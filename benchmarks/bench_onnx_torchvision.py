"""frcnn's fast path against onnxruntime running torchvision's same R50-C4 Faster R-CNN exported to ONNX.

The two models are built exactly as ``bench_torchvision.py`` builds them (same weights: a ResNet-50 with BatchNorm
statistics calibrated on BCCD images, frcnn's RPN, box head and predictor mapped into torchvision's modules), one
BCCD image at 600x1000. torchvision's model is exported with ``torch.onnx.export`` (the dynamo exporter, and the
TorchScript one if that fails) and run by onnxruntime with the same thread count; frcnn runs its default inference
path (``frcnn.engine.fast``). Median of alternated runs after one warm-up.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_onnx_torchvision.py [--runs 5] [--parts]

``--parts``: where the difference is. The fast path's backbone head (conv1..layer3 on the 1x3x608x1008 input) and
its RoI pooling + tail (RoIAlign of 300 RoIs from the 1x1024x38x63 map, then layer4), each alone, against the
same computation (BatchNorm folded; torchvision's ``roi_align``, the ONNX RoiAlign) exported to ONNX and run by
onnxruntime, random weights; median of alternated runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_torchvision as bt  # noqa: E402

from frcnn.config import load_config  # noqa: E402
from frcnn.engine.benchmark import alternated  # noqa: E402
from frcnn.engine.fast import prepare_for_inference  # noqa: E402
from frcnn.model.detector import FasterRCNN  # noqa: E402
from frcnn.model.pooling import pool_rois  # noqa: E402
from frcnn.transforms import batch_images, prep_image  # noqa: E402


def export_torchvision(tv, image: torch.Tensor, path: Path) -> str:
    """Export torchvision's model (input: one 3xHxW 0..255 image, its own transform inside); returns how."""
    tv.eval()
    try:
        torch.onnx.export(tv, ([image],), str(path), dynamo=True, opset_version=20)
        return "dynamo, opset 20"
    except Exception as e:  # noqa: BLE001 - fall back to the exporter torchvision documents
        print(f"dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); TorchScript exporter")
        torch.onnx.export(tv, ([image],), str(path), dynamo=False, opset_version=17)
        return "TorchScript, opset 17"


class PoolAndTail(torch.nn.Module):
    """RoIAlign (torchvision's op, exported as ONNX RoiAlign) then the tail: the computation frcnn's fast path
    rearranges (the tail's first 1x1 convolutions before pooling, ``frcnn.engine.fast.convolve_before_pooling``)."""

    def __init__(self, tail: torch.nn.Module):
        super().__init__()
        self.tail = tail

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.tail(roi_align(features, rois, (7, 7), spatial_scale=1 / 16, sampling_ratio=0))


def random_rois(count: int, h: int, w: int) -> torch.Tensor:
    """``count`` RoIs of 32..400 px inside an h x w image (batch index 0)."""
    g = torch.Generator().manual_seed(0)
    wh = 32 + torch.rand(count, 2, generator=g) * 368
    xy = torch.rand(count, 2, generator=g) * (torch.tensor([w, h]) - wh)
    return torch.cat([torch.zeros(count, 1), xy, xy + wh - 1], 1)


def parts(runs: int) -> int:
    """The backbone head, and RoI pooling + the layer4 tail, alone: frcnn's fast path (eager) vs onnxruntime."""
    import onnxruntime as ort

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    cfg = load_config("voc-r50-c4", ["DEVICE=cpu", "POOLING_MODE=align"])
    model = FasterRCNN(cfg, bt.NUM_CLASSES, load_pretrained=False).eval()
    fast = prepare_for_inference(model)
    plain = prepare_for_inference(model, channels_last=False)
    tail = prepare_for_inference(model.classifier.tail, channels_last=False)  # alone: folded, not rearranged
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, load {os.getloadavg()}")
    image = torch.randn(1, 3, 608, 1008)
    features, rois = torch.randn(1, 1024, 38, 63).relu(), random_rois(300, 608, 1008)
    cl = torch.channels_last

    def fast_pool_and_tail():
        maps = fast.classifier.before_pooling(features.contiguous(memory_format=cl))
        return fast.classifier.tail(pool_rois(maps, rois, "align", 7, 16))

    for name, frcnn_fn, module, inputs in (
            ("head (conv1..layer3)", partial(fast.head, image.contiguous(memory_format=cl)), plain.head, (image,)),
            ("RoI pooling + tail (layer4, 300 RoIs)", fast_pool_and_tail, PoolAndTail(tail),
             (features, rois))):
        names = [f"x{i}" for i in range(len(inputs))]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part.onnx"
            torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17, input_names=names)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in zip(names, inputs)}
        with torch.inference_mode():
            times = alternated({"frcnn": frcnn_fn, "onnxruntime": partial(session.run, None, feed)}, runs)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: frcnn fast path {med['frcnn'] * 1e3:.0f} ms, onnxruntime {med['onnxruntime'] * 1e3:.0f} ms, "
              f"onnxruntime / frcnn {med['onnxruntime'] / med['frcnn']:.2f}x")
    return 0


def same_detections(a, b) -> str:
    """Issue 10's parity: same count, labels equal, boxes within 0.01 px, scores within 1e-4 (both lists in
    score order); says how they differ otherwise."""
    if len(a.scores) != len(b.scores):
        return f"DIFFERENT: {len(a.scores)} vs {len(b.scores)} detections"
    if not torch.equal(a.labels, b.labels):
        return "DIFFERENT labels"
    box, score = (a.boxes - b.boxes).abs().max().item(), (a.scores - b.scores).abs().max().item()
    verdict = "identical" if box <= 0.01 and score <= 1e-4 else "DIFFERENT"
    return f"{verdict}: {len(a.scores)} detections, labels equal, boxes within {box:.2g} px, scores within {score:.2g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--parts", action="store_true", help="time the backbone head and tail alone (see the docstring)")
    args = p.parse_args()
    if args.parts:
        return parts(args.runs)
    import onnxruntime as ort

    threads = torch.get_num_threads()
    paths = sorted(Path(bt.DEFAULT_IMAGES).glob("*.jpg"))
    image = bt.load_image(paths[0])
    state = bt.calibrated_resnet_state([bt.load_image(q) for q in paths[1:9]], load_config("voc-r50-c4").PIXEL_MEANS)
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "resnet50.pth"
        torch.save(state, pth)
        cfg = load_config("voc-r50-c4", ["POOLING_MODE=align", "DEVICE=cpu", f"PRETRAINED={pth}"])
        torch.manual_seed(cfg.RNG_SEED)
        fr = FasterRCNN(cfg, bt.NUM_CLASSES).eval()
        with torch.no_grad():
            fr.rpn.rpn_bbox_pred_net.weight.mul_(0.1)  # bench_torchvision's --rpn-delta-scale
        tv = bt.build_torchvision(cfg)
        tv.load_state_dict(bt.frcnn_to_torchvision_state(fr.state_dict(), fr.rpn.num_anchors), strict=True)
        onnx_path = Path(tmp) / "torchvision.onnx"
        how = export_torchvision(tv, image, onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: image.numpy()}
        fast = prepare_for_inference(fr)
        prepared = prep_image(image, cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
        fr_input, fr_sizes = batch_images([prepared.tensor], size_divisor=bt.SIZE_DIVISIBLE)

        def run_frcnn():
            with torch.no_grad():
                fast(fr_input, fr_sizes)

        def run_ort():
            session.run(None, feed)

        times = alternated({"frcnn fast path": run_frcnn, "onnxruntime (torchvision export)": run_ort}, args.runs)
        with torch.no_grad():
            same = same_detections(fast(fr_input, fr_sizes)[0], fr(fr_input, fr_sizes)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"fast path vs the model as trained: {same}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, load {os.getloadavg()}; torchvision exported with the {how} exporter")
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/img ({', '.join(f'{t:.2f}' for t in times[k])})")
    ours, theirs = times["frcnn fast path"], times["onnxruntime (torchvision export)"]
    print(f"onnxruntime / frcnn: {med['onnxruntime (torchvision export)'] / med['frcnn fast path']:.2f}x (ratio of "
          f"medians), {statistics.median(b / a for a, b in zip(ours, theirs)):.2f}x (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
