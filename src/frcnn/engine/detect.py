"""``frcnn detect``: one drawn PNG and one JSON per image, boxes in original image pixels.

Images are read by :func:`frcnn.data.images.open_image`, upright: a photo with an EXIF orientation tag is turned
as a phone or a viewer shows it, so the boxes, ``width`` and ``height`` of the JSON and the drawn PNG are those of
the upright image (as an annotation tool that respects EXIF draws them)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from frcnn.engine.inference import Predictor
from frcnn.errors import DataError
from frcnn.model.detector import Detections
from frcnn.viz.draw import draw_detections


def open_image(path: Path) -> Image.Image:
    """An RGB image, upright, or a one-line DataError naming the file (see :func:`frcnn.data.images.open_image`:
    pixel limit, format by content, truncation, any mode converted to RGB, EXIF orientation applied, first frame)."""
    from frcnn.data.images import open_image as safe_open

    return safe_open(path)


def detections_to_json(det: Detections, class_names: Sequence[str], image: Path, size: tuple[int, int]) -> dict:
    """Boxes are 0-based pixel coordinates with the +1 convention (x2, y2 inclusive)."""
    return {
        "image": str(image),
        "width": size[0],
        "height": size[1],
        "detections": [
            {"class": class_names[int(label) - 1], "score": round(float(score), 5),
             "box": [round(float(v), 2) for v in box]}
            for box, score, label in zip(det.boxes.tolist(), det.scores, det.labels)
        ],
    }


def detect_files(predictor: Predictor, files: Sequence[Path], out: Path, threshold: float) -> Iterator[Path]:
    """Detect in each file and write ``<stem>.png`` and ``<stem>.json`` into ``out``; yields each PNG.

    Existing files are never overwritten: a name that is taken gets a numeric suffix.
    """
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"--threshold {threshold}: must lie in [0, 1]")
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for path in files:
        image = open_image(path)
        det = predictor.predict([image])[0]
        keep = det.scores >= threshold
        det = Detections(det.boxes[keep], det.scores[keep], det.labels[keep])
        stem = _free_stem(out, path.stem, taken)
        drawn = draw_detections(image, det.boxes, det.labels, det.scores, predictor.class_names)
        drawn.save(out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(
            detections_to_json(det, predictor.class_names, path, image.size), indent=1))
        yield out / f"{stem}.png"


def _free_stem(out: Path, stem: str, taken: set[str]) -> str:
    candidate, k = stem, 1
    while candidate in taken or (out / f"{candidate}.png").exists() or (out / f"{candidate}.json").exists():
        k += 1
        candidate = f"{stem}_{k}"
    taken.add(candidate)
    return candidate
