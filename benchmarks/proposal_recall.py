"""How well a trained model's RPN proposals cover each class: recall at IoU >= 0.5 and >= 0.7 and proposal sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proposal_recall.py RUN_DIR [RUN_DIR ...] \
        [--data ../shared/datasets/BCCD/BCCD] [--split test]

For each checkpoint: the test images run through the model as ``frcnn eval`` runs them (``TEST.*`` settings, the
model as trained), and each ground-truth box (difficult ones included) counts as found at IoU t when one of the
image's kept proposals (after the proposal layer's NMS, ``TEST.RPN_POST_NMS_TOP_N``) overlaps it at >= t, in
network-input pixels. Printed per class: recall at 0.5 and 0.7 and the number of boxes; then the median and 10th
percentile of the proposals' side sqrt(w h). A class the RPN does not propose cannot be detected, whatever the
classification network does: this is the first thing to look at when one class's AP collapses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from frcnn.boxes import box_iou, scale_boxes  # noqa: E402
from frcnn.data import open_repaired  # noqa: E402
from frcnn.engine.inference import Predictor  # noqa: E402
from frcnn.model.trace import Trace  # noqa: E402


def proposal_recall(run: Path, data: Path, split: str) -> dict:
    predictor = Predictor.from_checkpoint(run, "cpu", fast=False)
    dataset = open_repaired(data, split, classes=predictor.class_names)
    found: dict[str, list[int]] = {name: [0, 0, 0] for name in predictor.class_names}
    sides = []
    for i in range(len(dataset)):
        sample = dataset[i]
        trace = Trace()
        predictor.predict([dataset.load_image(sample)], trace=trace)
        rois = trace["proposal_layer"]["rois"][:, 1:]
        sides.append(((rois[:, 2] - rois[:, 0] + 1) * (rois[:, 3] - rois[:, 1] + 1)).sqrt())
        gt = scale_boxes(sample.boxes, trace["preprocess"]["scales"][0])
        best = box_iou(gt, rois).max(dim=1).values if rois.numel() else torch.zeros(len(gt))
        for label, iou in zip(sample.labels.tolist(), best.tolist()):
            counts = found[predictor.class_names[label - 1]]
            counts[0] += iou >= 0.5
            counts[1] += iou >= 0.7
            counts[2] += 1
    side = torch.cat(sides)
    return {"recall": {k: {"iou0.5": c[0] / max(c[2], 1), "iou0.7": c[1] / max(c[2], 1), "boxes": c[2]}
                       for k, c in found.items()},
            "proposal_side_median": float(side.median()), "proposal_side_p10": float(side.quantile(0.1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/BCCD/BCCD"))
    p.add_argument("--split", default="test")
    args = p.parse_args()
    for run in args.runs:
        r = proposal_recall(run, args.data, args.split)
        per_class = ", ".join(f"{k} {v['iou0.5']:.3f} / {v['iou0.7']:.3f} ({v['boxes']})"
                              for k, v in r["recall"].items())
        print(f"{run}: recall at IoU 0.5 / 0.7 (boxes): {per_class}; proposal side median "
              f"{r['proposal_side_median']:.1f} px, 10th percentile {r['proposal_side_p10']:.1f} px")


if __name__ == "__main__":
    main()
