"""Shared fixtures of the explain tests: a seeded untrained tiny detector, a picture with known boxes, a
checkpoint folder and a small VOC folder (the picture as ``JPEGImages/known.png`` with its XML)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from frcnn.config import load_config
from frcnn.data.voc import write_voc_xml
from frcnn.engine.checkpoint import save_checkpoint
from frcnn.model.detector import FasterRCNN

CLASSES = ("circle", "square", "star")
WIDTH, HEIGHT = 200, 150  # the short side 150 becomes TEST.SCALES = 320: scale 320 / 150
# 0-based inclusive boxes (+1 convention) of the two objects drawn on the picture, and their labels
BOXES = torch.tensor([[40.0, 30.0, 79.0, 69.0], [120.0, 60.0, 179.0, 129.0]])
LABELS = torch.tensor([2, 1])
RED, BLUE, GREY = (220, 30, 30), (30, 60, 220), (120, 120, 120)


def config():
    return load_config("demo-cpu", ["DEVICE=cpu"])


def model() -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(config(), num_classes=len(CLASSES), load_pretrained=False).eval()


def picture() -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), GREY)
    d = ImageDraw.Draw(image)
    d.rectangle(BOXES[0].int().tolist(), fill=RED)  # Pillow's rectangle covers x1..x2 inclusive, like ours
    d.ellipse(BOXES[1].int().tolist(), fill=BLUE)
    return image


def voc_folder(root: Path) -> Path:
    """``root`` as a VOC folder holding the picture (PNG, lossless); returns the image path."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    path = root / "JPEGImages" / "known.png"
    picture().save(path)
    objects = [(CLASSES[int(k) - 1], b.tolist()) for b, k in zip(BOXES, LABELS)]
    write_voc_xml(root / "Annotations" / "known.xml", "known.png", WIDTH, HEIGHT, objects)
    (root / "ImageSets" / "Main" / "test.txt").write_text("known\n")
    return path


def checkpoint(folder: Path, iteration: int = 0) -> Path:
    save_checkpoint(folder, model(), config(), CLASSES, iteration=iteration)
    return folder
