"""The one record every data source produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Sample:
    """One annotated image.

    ``boxes`` are ``(x1, y1, x2, y2)`` float32 in *original image pixels*, 0-based, inclusive
    (the reference's +1 convention: width = x2 - x1 + 1). VOC XML is 1-based; readers subtract 1.
    ``labels`` are int64 class indices in ``1..K`` (0 is background and never appears here).
    ``difficult`` is a bool per box; difficult boxes are kept for evaluation and skipped in training.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4) or self.labels.shape != (n,) or self.difficult.shape != (n,):
            raise ValueError(f"{self.image_id}: boxes, labels and difficult disagree in length")
