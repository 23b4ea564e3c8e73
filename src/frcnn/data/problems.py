"""One problem found in a data set: which file, what kind, the exact value, and whether it can be repaired.

Readers in lenient mode and :mod:`frcnn.data.check` produce these; the strict readers raise the same text
as a one-line :class:`~frcnn.errors.DataError` (``problem.line``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# kind -> (repairable, what the repair does). A kind that is not repairable stops training.
KINDS: dict[str, tuple[bool, str]] = {
    # annotations
    "unparsable-annotation": (False, ""),
    "unsafe-xml": (False, ""),
    "bad-annotation": (False, ""),
    "path-outside-data": (False, ""),
    "unknown-class": (False, ""),
    "missing-annotation": (False, ""),
    # boxes
    "inverted-box": (False, ""),
    "box-outside-image": (False, ""),  # no pixel of the box inside the image
    "zero-area-box": (True, "dropped"),  # COCO w or h <= 0
    "degenerate-box": (True, "dropped"),  # VOC xmin == xmax or ymin == ymax: 1 pixel wide under +1
    "box-crosses-border": (True, "clipped to the image"),
    "duplicate-box": (True, "dropped"),  # same class, same coordinates, same image
    # images
    "missing-image": (False, ""),
    "unreadable-image": (False, ""),
    "truncated-image": (False, ""),
    "image-too-large": (False, ""),
    "size-mismatch": (False, ""),
    # the annotation's size is the stored (sideways) size of an image whose EXIF orientation turns it: the boxes
    # were probably drawn by a tool that ignored EXIF, on the sideways pixels, while frcnn reads images upright.
    # Not repaired: which image the boxes were drawn on cannot be known for sure, and a wrong guess trains on
    # boxes in the wrong place.
    "exif-rotated-size": (False, ""),
    "size-missing": (True, "real image size used"),  # <size> 0 or absent
    "format-mismatch": (True, "read by content"),  # a PNG named .jpg
    "image-mode": (True, "converted to RGB"),  # L, P, RGBA, CMYK, 16-bit, ...
    "multi-frame-image": (True, "first frame used"),  # an animated GIF, a multi-page TIFF
}


@dataclass(frozen=True)
class Problem:
    file: str  # the file to fix (annotation or image)
    kind: str  # a key of KINDS
    message: str  # one line with the exact value, without the file name
    box: int | None = None  # 1-based index of the box in its annotation, if about one box
    image_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown problem kind {self.kind!r}")

    @property
    def repairable(self) -> bool:
        return KINDS[self.kind][0]

    @property
    def line(self) -> str:
        return f"{self.file}: {self.message}"

    def to_json(self) -> dict:
        return {**asdict(self), "repairable": self.repairable}
