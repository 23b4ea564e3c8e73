"""Training batches as a pure function of ``(RNG_SEED, iteration)``.

Like the reference, the training set is doubled with mirrored copies when ``TRAIN.USE_FLIPPED`` and
visited in a fresh random order every epoch; each batch picks one of ``TRAIN.SCALES`` at random. Here
the order of epoch ``e`` and everything random in iteration ``i`` (scale, dropout) come from generators
seeded by ``(seed, e)`` and ``(seed, i)``, and the anchor and RoI sampling of the image at position ``p``
of the batch from ``(seed, i, p)``, so iteration ``i`` is the same whether the run started at 0 or
resumed at ``i``: ``--resume`` needs no RNG state.

With several processes (``world_size``), iteration ``i``'s global batch is ``world_size x IMS_PER_BATCH``
images, positions ``0 .. world_size * IMS_PER_BATCH - 1`` of the same pure function of ``(seed, i)``;
process ``rank`` takes positions ``rank * IMS_PER_BATCH ..``. Each image is sampled by its global
position, so the split across processes changes nothing but which process computes what.

Augmentation (``TRAIN.MOSAIC``, ``RANDOM_CROP``, ``ROTATE90``, ``COLOR_JITTER``, :mod:`frcnn.data.augment`) draws
from a generator of its own per image, seeded by ``iteration_seed(image_seed(seed, i, p), AUGMENT_STREAM)``: a pure
function of ``(seed, i, p)`` like the rest, and the streams above are unchanged by it (with the keys off, not a bit
moves). Each image is made a mosaic, cropped (original pixels), turned, colour-jittered (0..255), then resized,
mirrored and normalised (a mosaic is mirrored whole, as its first image's entry says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor

from frcnn.boxes import flip_boxes, scale_boxes
from frcnn.config import Config
from frcnn.data.augment import color_jitter, mosaic, random_crop, rotate90
from frcnn.data.sample import Sample
from frcnn.transforms import batch_images, image_to_tensor, prep_image


class DetectionDataset(Protocol):
    classes: tuple[str, ...]

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Sample: ...
    def load_image(self, sample: Sample) -> Image.Image: ...


def iteration_seed(seed: int, iteration: int) -> int:
    """A well-mixed 63-bit seed for iteration ``iteration`` of a run seeded with ``seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + iteration * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    x ^= x >> 31
    return (x * 0x94D049BB133111EB % (1 << 64)) >> 1


def image_seed(seed: int, iteration: int, position: int) -> int:
    """The sampling seed of the image at ``position`` in iteration ``iteration``'s global batch (position 0
    keeps the iteration's own seed, so one-image batches sample as they always have)."""
    it = iteration_seed(seed, iteration)
    return it if position == 0 else iteration_seed(it, position)


AUGMENT_STREAM = 7919  # mixed into an image's seed for its augmentation generator


def augment_seed(seed: int, iteration: int, position: int) -> int:
    """The seed of the augmentation generator of the image at ``position`` in iteration ``iteration``."""
    return iteration_seed(image_seed(seed, iteration, position), AUGMENT_STREAM)


def training_image(dataset: DetectionDataset, sample: Sample, cfg: Config, iteration: int,
                   position: int) -> tuple[Tensor, Tensor, Tensor]:
    """The image (3, H, W) of 0..255 values before the resize, with its non-difficult boxes and labels: made a
    mosaic, cropped, turned and colour-jittered when ``TRAIN.MOSAIC`` / ``RANDOM_CROP`` / ``ROTATE90`` /
    ``COLOR_JITTER`` are on, from the image's own augmentation generator (:func:`augment_seed`); mirror boxes in
    ``image.shape[-1]`` (a crop's or turned image's width)."""
    train = cfg.TRAIN
    image, boxes, labels = _plain(dataset, sample)
    if train.RANDOM_CROP > 0 or any(train.COLOR_JITTER) or train.ROTATE90 or train.MOSAIC > 0:
        g = torch.Generator().manual_seed(augment_seed(cfg.RNG_SEED, iteration, position))
        if train.MOSAIC > 0 and float(torch.rand(1, generator=g)) < train.MOSAIC:
            others = torch.randint(len(dataset), (3,), generator=g).tolist()
            pieces = [(image, boxes, labels)] + [_plain(dataset, dataset[i]) for i in others]
            mixed = mosaic(pieces, cfg.PIXEL_MEANS, g)
            if len(mixed[1]) or not len(boxes):
                image, boxes, labels = mixed
        image, boxes, labels = random_crop(image, boxes, labels, train.RANDOM_CROP, g)
        if train.ROTATE90:
            image, boxes = rotate90(image, boxes, g)
        image = color_jitter(image, train.COLOR_JITTER, g)
    return image, boxes, labels


def _plain(dataset: DetectionDataset, sample: Sample) -> tuple[Tensor, Tensor, Tensor]:
    """The image (3, H, W) of 0..255 values with its non-difficult boxes and labels."""
    keep = ~sample.difficult
    return image_to_tensor(dataset.load_image(sample)), sample.boxes[keep], sample.labels[keep]


@dataclass
class Batch:
    images: Tensor  # (N, 3, H, W) pre-processed
    image_sizes: Tensor  # (N, 2) true (h, w)
    gt_boxes: list[Tensor]  # network-input pixels, non-difficult boxes only
    gt_labels: list[Tensor]
    image_ids: list[str]
    seed: int  # the iteration's seed (dropout)
    image_seeds: list[int]  # seeds each image's anchor and RoI sampling

    def generators(self) -> list[torch.Generator]:
        """One sampling generator per image. They are CPU generators whatever the model's device: the layers
        draw indices on the CPU and move them, so CPU and CUDA runs sample the same anchors and RoIs."""
        return [torch.Generator().manual_seed(s) for s in self.image_seeds]


def training_forward(model: torch.nn.Module, batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The model's training forward pass on ``batch``, moved to ``device``: its losses. torch's global generator is
    seeded with the iteration's seed first (dropout, where the tail has it)."""
    torch.manual_seed(batch.seed)
    return model(batch.images.to(device), batch.image_sizes.to(device), [b.to(device) for b in batch.gt_boxes],
                 [lbl.to(device) for lbl in batch.gt_labels], generator=batch.generators())


class TrainBatches(torch.utils.data.Dataset):
    """``batches[i]`` is the batch of iteration ``i`` (usable with a DataLoader and worker processes)."""

    def __init__(self, dataset: DetectionDataset, cfg: Config, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training set has no images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.dataset, self.cfg, self.rank, self.world_size = dataset, cfg, rank, world_size
        self.copies = 2 if cfg.TRAIN.USE_FLIPPED else 1
        self._perm_cache: tuple[int, Tensor] | None = None

    def __len__(self) -> int:  # only meaningful with a sampler of iteration numbers
        return self.cfg.TRAIN.MAX_ITERS

    def _perm(self, epoch: int) -> Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(iteration_seed(self.cfg.RNG_SEED, -1 - epoch))
            self._perm_cache = (epoch, torch.randperm(len(self.dataset) * self.copies, generator=g))
        return self._perm_cache[1]

    def positions(self) -> range:
        """This process's positions in the global batch."""
        per = self.cfg.TRAIN.IMS_PER_BATCH
        return range(self.rank * per, (self.rank + 1) * per)

    def entries(self, iteration: int) -> list[tuple[int, bool]]:
        """(dataset index, flipped) of each of this process's images of iteration ``iteration``."""
        n = len(self.dataset)
        total = n * self.copies
        size = self.world_size * self.cfg.TRAIN.IMS_PER_BATCH  # the global batch
        out = []
        for p in self.positions():
            epoch, pos = divmod(iteration * size + p, total)
            entry = int(self._perm(epoch)[pos])
            out.append((entry % n, entry >= n))
        return out

    def __getitem__(self, iteration: int) -> Batch:
        cfg, train = self.cfg, self.cfg.TRAIN
        seed = iteration_seed(cfg.RNG_SEED, iteration)
        g = torch.Generator().manual_seed(seed)
        target = train.SCALES[int(torch.randint(len(train.SCALES), (1,), generator=g))]
        tensors, boxes, labels, ids = [], [], [], []
        for position, (index, flipped) in zip(self.positions(), self.entries(iteration)):
            sample = self.dataset[index]
            image, b, lab = training_image(self.dataset, sample, cfg, iteration, position)
            prepared = prep_image(image, target, train.MAX_SIZE, cfg.PIXEL_MEANS, cfg.PIXEL_STDS, flip=flipped)
            if flipped:
                b = flip_boxes(b, image.shape[-1])
            tensors.append(prepared.tensor)
            boxes.append(scale_boxes(b, prepared.scale))
            labels.append(lab)
            ids.append(sample.image_id + (" (flipped)" if flipped else ""))
        images, sizes = batch_images(tensors)
        seeds = [image_seed(cfg.RNG_SEED, iteration, p) for p in self.positions()]
        return Batch(images, sizes, boxes, labels, ids, seed, seeds)
