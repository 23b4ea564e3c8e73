"""BCCD test scored twice: on its published labels, and with the cells they leave out forgiven.

Run from the repository root:

    .venv/bin/python benchmarks/eval_audited.py RUN [RUN ...] [--out FILE.md]
    options: --data VOC_ROOT (default ../shared/datasets/BCCD/BCCD), --split test, --audit FILE
             (default benchmarks/bccd_audit.json)

BCCD's test annotations leave whole cells out (``benchmarks/bccd_audit.json``: 125 found by looking at one
checkpoint's confident detections that match no labelled box; 110 of them red cells). A detector that finds them
is charged a false positive for each, so single points of mAP say as much about the labels as about the recipe.
Here every checkpoint's detections are made once (``frcnn eval``'s way: the split read by
:func:`frcnn.data.open_repaired`, :meth:`Predictor.from_checkpoint`) and scored by frcnn's evaluator twice:

* ``published``: exactly what ``frcnn eval --checkpoint RUN --data ... --split test`` prints;
* ``audited``: the same detections with the audit's boxes added to their images as *difficult* ground truth
  (VOC07: a detection matching one is neither a true nor a false positive). Nothing published is removed or
  relabelled, and no box is added that a detector must find, so the audited score can only be higher.

The audit was read off one checkpoint, which is why its own gain is the largest; checkpoints it was not read off
show the effect on a recipe it never saw. Prints a markdown table (mAP and AP per class, both label sets) and
writes it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "BCCD" / "BCCD"
DEFAULT_AUDIT = ROOT / "benchmarks" / "bccd_audit.json"


def read_audit(path: str | Path, classes: tuple[str, ...]) -> dict[str, list[tuple[int, list[float]]]]:
    """``image_id -> [(label, box), ...]`` of the audit file's ``boxes`` (labels 1..K in ``classes`` order)."""
    index = {name: k for k, name in enumerate(classes, start=1)}
    out: dict[str, list[tuple[int, list[float]]]] = {}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    try:
        for entry in data["boxes"]:
            if entry["class"] not in index:
                known = ", ".join(classes)
                raise ValueError(f"{path}: class {entry['class']!r} of {entry['image']} is not one of {known}")
            try:
                box = [float(v) for v in entry["box"]]
            except ValueError:
                raise ValueError(f"{path}: the box of {entry['image']} is not 4 numbers: {entry['box']!r}") from None
            if len(box) != 4:
                raise ValueError(f"{path}: the box of {entry['image']} has {len(box)} numbers, not 4")
            out.setdefault(entry["image"], []).append((index[entry["class"]], box))
    except (KeyError, TypeError) as e:
        why = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: not an audit file (a list 'boxes' of image, class and box; {why})") from None
    return out


class AuditedSet:
    """``dataset`` with the audit's boxes appended to each sample as difficult ground truth (nothing else changes)."""

    def __init__(self, dataset, added: dict[str, list[tuple[int, list[float]]]]):
        ids = {dataset[i].image_id for i in range(len(dataset))}
        unknown = sorted(set(added) - ids)
        if unknown:
            raise ValueError(f"the audit names {len(unknown)} images not in this split, e.g. {unknown[0]}")
        self.dataset, self.added, self.classes = dataset, added, tuple(dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        extra = self.added.get(sample.image_id, [])
        if not extra:
            return sample
        boxes = torch.tensor([box for _, box in extra], dtype=sample.boxes.dtype)
        labels = torch.tensor([label for label, _ in extra], dtype=sample.labels.dtype)
        return replace(sample, boxes=torch.cat([sample.boxes, boxes]), labels=torch.cat([sample.labels, labels]),
                       difficult=torch.cat([sample.difficult, torch.ones(len(extra), dtype=torch.bool)]))


def score_both(dataset, detections, added) -> tuple[dict, dict]:
    from frcnn.engine.evaluate import score_detections

    return score_detections(dataset, detections), score_detections(AuditedSet(dataset, added), detections)


def table(rows: list[tuple[str, dict, dict]], classes: tuple[str, ...]) -> str:
    head = "| checkpoint | labels | VOC07 mAP | " + " | ".join(classes) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(classes)]
    for name, published, audited in rows:
        for which, r in (("published", published), ("audited", audited)):
            cells = " | ".join(f"{r['per_class'][c]:.4f}" for c in classes)
            lines.append(f"| {name if which == 'published' else ''} | {which} | {r['map']:.4f} | {cells} |")
    for which, k in (("published", 1), ("audited", 2)):
        mean = sum(row[k]["map"] for row in rows) / len(rows)
        lines.append(f"| mean of {len(rows)} | {which} | {mean:.4f} |" + " |" * len(classes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="checkpoint folders (frcnn train --out)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", default="test")
    p.add_argument("--audit", type=Path, default=DEFAULT_AUDIT)
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists():
        print(f"eval_audited: error: --out {args.out} exists; choose another file", file=sys.stderr)
        return 2
    from frcnn.data import open_repaired
    from frcnn.engine.evaluate import collect_detections
    from frcnn.engine.inference import Predictor
    from frcnn.errors import FrcnnError

    rows, dataset, added = [], None, {}
    try:
        for run in args.runs:
            predictor = Predictor.from_checkpoint(run, "cpu")
            if dataset is None:  # read and checked once, with the first checkpoint's classes
                dataset = open_repaired(args.data, args.split, classes=predictor.class_names)
                added = read_audit(args.audit, tuple(dataset.classes))
            elif tuple(predictor.class_names) != tuple(dataset.classes):
                raise ValueError(f"{run}: classes {', '.join(predictor.class_names)} differ from the first "
                                 f"checkpoint's ({', '.join(dataset.classes)})")
            published, audited = score_both(dataset, collect_detections(predictor, dataset, progress=False), added)
            rows.append((str(run), published, audited))
            print(f"{run}: published {published['map']:.4f}, audited {audited['map']:.4f}", file=sys.stderr)
    except (FrcnnError, ValueError, OSError) as e:
        print(f"eval_audited: error: {e}", file=sys.stderr)
        return 2
    text = table(rows, tuple(dataset.classes))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
