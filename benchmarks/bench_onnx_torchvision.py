"""frcnn's fast path against onnxruntime running torchvision's same R50-C4 Faster R-CNN exported to ONNX.

The two models are built exactly as ``bench_torchvision.py`` builds them (same weights: a ResNet-50 with BatchNorm
statistics calibrated on BCCD images, frcnn's RPN, box head and predictor mapped into torchvision's modules), one
BCCD image at 600x1000. torchvision's model is exported with ``torch.onnx.export`` (the dynamo exporter, and the
TorchScript one if that fails) and run by onnxruntime with the same thread count; frcnn runs its default inference
path (``frcnn.engine.fast``). Median of alternated runs after one warm-up.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_onnx_torchvision.py [--runs 5] [--parts]

``--parts``: where the difference is. The fast path's backbone head (conv1..layer3 on the 1x3x608x1008 input) and
tail (layer4 on 300 RoIs of 1024x7x7), each alone, against the same module (BatchNorm folded) exported to ONNX
and run by onnxruntime, random weights; median of alternated runs.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_torchvision as bt  # noqa: E402

from frcnn.config import load_config  # noqa: E402
from frcnn.engine.benchmark import alternated  # noqa: E402
from frcnn.engine.fast import prepare_for_inference  # noqa: E402
from frcnn.model.detector import FasterRCNN  # noqa: E402
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


def parts(runs: int) -> int:
    """The backbone head and the layer4 tail alone: frcnn's fast path (eager) vs onnxruntime on the same module."""
    import onnxruntime as ort

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    cfg = load_config("voc-r50-c4", ["DEVICE=cpu"])
    fast = prepare_for_inference(FasterRCNN(cfg, bt.NUM_CLASSES, load_pretrained=False).eval())
    plain = prepare_for_inference(FasterRCNN(cfg, bt.NUM_CLASSES, load_pretrained=False).eval(), channels_last=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, load {os.getloadavg()}")
    for name, module, folded, shape in (("head (conv1..layer3)", fast.head, plain.head, (1, 3, 608, 1008)),
                                        ("tail (layer4, 300 RoIs)", fast.classifier.tail, plain.classifier.tail,
                                         (300, 1024, 7, 7))):
        x = torch.randn(*shape)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part.onnx"
            torch.onnx.export(folded, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        x_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            times = alternated({"frcnn": partial(module, x_cl), "onnxruntime": partial(session.run, None, feed)}, runs)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: frcnn fast path {med['frcnn'] * 1e3:.0f} ms, onnxruntime {med['onnxruntime'] * 1e3:.0f} ms, "
              f"onnxruntime / frcnn {med['onnxruntime'] / med['frcnn']:.2f}x")
    return 0


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
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {threads}, load {os.getloadavg()}; torchvision exported with the {how} exporter")
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/img ({', '.join(f'{t:.2f}' for t in times[k])})")
    print(f"onnxruntime / frcnn: {med['onnxruntime (torchvision export)'] / med['frcnn fast path']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
