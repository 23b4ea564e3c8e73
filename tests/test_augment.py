"""Training-time augmentation (frcnn.data.augment) and its place in TrainBatches: known crops, colour jitter
against torchvision, determinism, and batches unchanged when it is off."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw

import frcnn.engine.batches as batches_module
from frcnn.boxes import flip_boxes, scale_boxes
from frcnn.config import load_config
from frcnn.data import open_dataset
from frcnn.data.augment import (
    adjust_colors,
    color_jitter,
    crop_boxes,
    jitter_params,
    mosaic,
    random_crop,
    rotate90,
    turn_boxes,
)
from frcnn.data.sample import Sample
from frcnn.data.voc import write_voc_xml
from frcnn.engine.batches import TrainBatches, image_seed, iteration_seed
from frcnn.errors import ConfigError
from frcnn.transforms import batch_images, image_to_tensor, prep_image

BACKGROUND = (90, 90, 90)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ListSet:
    """Images with solid rectangles: ``scenes`` = [(width, height, [(label, box, difficult, colour), ...])]."""

    classes = ("a", "b", "c")

    def __init__(self, scenes) -> None:
        self.images, self.samples = [], []
        for i, (w, h, objects) in enumerate(scenes):
            im = Image.new("RGB", (w, h), BACKGROUND)
            draw = ImageDraw.Draw(im)
            for _, box, _, colour in objects:
                draw.rectangle(box, fill=colour)  # PIL's rectangle covers x1..x2 inclusive, as the boxes
            self.images.append(im)
            self.samples.append(Sample(f"im{i}", f"im{i}.png", w, h,
                                       torch.tensor([o[1] for o in objects], dtype=torch.float32).view(-1, 4),
                                       torch.tensor([o[0] for o in objects], dtype=torch.int64),
                                       torch.tensor([o[2] for o in objects], dtype=torch.bool)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def load_image(self, sample: Sample) -> Image.Image:
        return self.images[int(sample.image_id[2:])]


SCENES = [
    (100, 80, [(1, (20, 10, 49, 39), False, (255, 0, 0)), (2, (60, 50, 89, 69), True, (0, 255, 0))]),
    (90, 70, [(3, (5, 5, 24, 34), False, (0, 0, 255)), (1, (40, 30, 79, 59), False, (255, 0, 0))]),
    (80, 96, [(2, (10, 60, 69, 89), False, (0, 255, 0))]),
]


def _cfg(*extra: str):
    return load_config("demo-cpu", ["TRAIN.SCALES=[64, 80]", "TRAIN.IMS_PER_BATCH=2", *extra])


def _image(h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Integer-valued 0..255 float pixels, as frcnn.transforms.image_to_tensor gives, with some saturated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float()


# --------------------------------------------------------------------------------------------- crop

def test_a_known_box_through_a_known_window():
    boxes = torch.tensor([[10, 20, 29, 39],  # centre (20, 30): inside; clipped at the window's top-left
                          [40, 30, 59, 49],  # overlaps the window (x 40..44) but its centre x 50 is outside
                          [30, 40, 34, 44]], dtype=torch.float32)  # wholly inside
    keep, out = crop_boxes(boxes, (15, 25, 30, 20))  # pixels x 15..44, y 25..44
    assert keep.tolist() == [True, False, True]
    assert out.tolist() == [[0, 0, 14, 14], [15, 15, 19, 19]]


def test_the_centre_decides_on_the_window_edge():
    box = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # pixels 0..9, centre (5, 5)
    keep, out = crop_boxes(box, (5, 0, 10, 10))  # pixels 5..14: the centre is on its first column
    assert keep.tolist() == [True] and out.tolist() == [[0, 0, 4, 9]]  # pixels 5..9 of the box, 5 wide
    keep, out = crop_boxes(box, (0, 0, 5, 10))  # pixels 0..4: the centre 5 is past the last one
    assert keep.tolist() == [False] and out.shape == (0, 4)


def test_random_crop_moves_pixels_boxes_and_labels_together():
    """Pixels that encode their own (x, y) give each crop's window away; the boxes and labels must be what the
    rule (centre inside, clip, shift) makes of that window, and the window sides within [r, 1] of the image's."""
    h, w, r = 60, 80, 0.5
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack((xs, ys, torch.zeros_like(xs))).float()
    boxes = torch.tensor([[5, 5, 14, 24], [30, 10, 69, 29], [50, 40, 79, 59], [0, 30, 19, 59]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, 4])
    cropped = 0
    for seed in range(300):
        out, b, lab = random_crop(image, boxes, labels, r, torch.Generator().manual_seed(seed))
        if out is image:
            assert b is boxes and lab is labels
            continue
        cropped += 1
        ch, cw = out.shape[1:]
        x0, y0 = int(out[0, 0, 0]), int(out[1, 0, 0])
        assert torch.equal(out, image[:, y0:y0 + ch, x0:x0 + cw])
        assert round(r * w) <= cw <= w and round(r * h) <= ch <= h
        expected = []
        for label, (x1, y1, x2, y2) in zip(labels.tolist(), boxes.tolist()):
            cx, cy = (x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2
            if x0 <= cx < x0 + cw and y0 <= cy < y0 + ch:
                expected.append((label, [max(x1, x0) - x0, max(y1, y0) - y0,
                                         min(x2, x0 + cw - 1) - x0, min(y2, y0 + ch - 1) - y0]))
        assert expected, "a crop that keeps no box"
        assert lab.tolist() == [e[0] for e in expected]
        assert b.tolist() == [e[1] for e in expected]
    assert 110 <= cropped <= 190  # half of the images


def test_no_crop_when_no_window_keeps_a_box_and_any_crop_without_boxes():
    image = _image(40, 40)
    far = torch.tensor([[100.0, 100.0, 110.0, 110.0]])  # no window of the 40x40 image holds its centre
    labels = torch.tensor([1])
    empty = torch.zeros((0, 4))
    crops = 0
    for seed in range(20):
        out, b, lab = random_crop(image, far, labels, 0.5, torch.Generator().manual_seed(seed))
        assert out is image and b is far and lab is labels
        out, b, lab = random_crop(image, empty, labels[:0], 0.5, torch.Generator().manual_seed(seed))
        crops += out.shape != image.shape
        assert b.shape == (0, 4) and lab.shape == (0,)
    assert crops > 0
    assert random_crop(image, far, labels, 0.0, torch.Generator())[0] is image  # 0 = off


def test_crop_then_flip_in_a_batch(monkeypatch):
    """A fixed window (x 10..69, y 5..54) through TrainBatches: the box is cut, mirrored in the crop's width
    (60, not the image's 100) and scaled with the crop's short side (50 -> 100)."""
    window = (10, 5, 60, 50)

    def fixed(image, boxes, labels, min_fraction, generator):
        keep, out = crop_boxes(boxes, window)
        x0, y0, cw, ch = window
        return image[:, y0:y0 + ch, x0:x0 + cw], out, labels[keep]

    monkeypatch.setattr(batches_module, "random_crop", fixed)
    data = ListSet([(100, 80, [(1, (20, 10, 49, 39), False, (255, 0, 0))])])
    cfg = load_config(None, ["TRAIN.SCALES=[100]", "TRAIN.MAX_SIZE=1000", "TRAIN.RANDOM_CROP=0.5"])
    batches = TrainBatches(data, cfg)
    it = next(i for i in range(4) if batches.entries(i)[0] == (0, True))
    batch = batches[it]
    # in the crop: x 10..39, y 5..34; mirrored in 60 px: x 60-39-1 = 20 .. 60-10-1 = 49; scale 2 (+1 convention)
    assert batch.image_sizes.tolist() == [[100, 120]]
    assert batch.gt_boxes[0].tolist() == [[40.0, 10.0, 99.0, 69.0]]
    assert batch.gt_labels[0].tolist() == [1]
    pixels = batch.images[0] + torch.tensor(cfg.PIXEL_MEANS).view(3, 1, 1)  # PIXEL_STDS are 1
    red = (pixels[0] > 200) & (pixels[1] < 50)
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) == (40, 10, 99, 69)


# --------------------------------------------------------------------------------------------- quarter turns

# A 11 x 7 (W x H) image with box x 3..8, y 2..4, turned k times anticlockwise, by hand: one turn takes the
# column x to the row 10 - x and the row y to the column y (an image 11 high and 7 wide).
TURNED = {0: [3, 2, 8, 4], 1: [2, 2, 4, 7], 2: [2, 2, 7, 4], 3: [2, 3, 4, 8]}


@pytest.mark.parametrize("k", range(4))
def test_a_known_box_turned(k):
    boxes = torch.tensor([[3.0, 2.0, 8.0, 4.0]])
    assert turn_boxes(boxes, 7, 11, k).tolist() == [[float(v) for v in TURNED[k]]]
    image = torch.zeros(3, 7, 11)
    image[:, 2:5, 3:9] = 255
    turned = torch.rot90(image, k, dims=(1, 2))
    ys, xs = torch.nonzero(turned[0], as_tuple=True)  # the box is still tight around the same pixels
    assert [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] == TURNED[k]


def test_rotate90_draws_every_turn_and_moves_pixels_with_boxes():
    image = _image(24, 32)
    boxes = torch.tensor([[3.0, 5.0, 12.0, 9.0], [20.0, 0.0, 31.0, 23.0]])
    seen = set()
    for seed in range(24):
        out, turned = rotate90(image, boxes, torch.Generator().manual_seed(seed))
        k = next(k for k in range(4) if out.shape == torch.rot90(image, k, dims=(1, 2)).shape
                 and torch.equal(out, torch.rot90(image, k, dims=(1, 2))))
        seen.add(k)
        x1, y1, x2, y2 = (int(v) for v in turned[0])
        x1o, y1o, x2o, y2o = (int(v) for v in boxes[0])
        # the pixels inside the turned box are those of the box, turned
        assert torch.equal(out[:, y1:y2 + 1, x1:x2 + 1],
                           torch.rot90(image[:, y1o:y2o + 1, x1o:x2o + 1], k, dims=(1, 2)))
        assert turned.shape == boxes.shape and out.is_contiguous()
    assert seen == {0, 1, 2, 3}


def test_turned_and_mirrored_box_in_a_batch(monkeypatch):
    """A quarter turn through TrainBatches, then the mirror of TRAIN.USE_FLIPPED in the turned image's width:
    the red box x 20..49, y 10..39 of a 100 x 80 image is x 10..39, y 50..79 turned (80 wide, 100 high), x 40..69
    mirrored in 80; scale 1 (SCALES [80])."""
    monkeypatch.setattr(batches_module, "rotate90",
                        lambda image, boxes, g: (torch.rot90(image, 1, dims=(1, 2)), turn_boxes(boxes, 80, 100, 1)))
    data = ListSet([(100, 80, [(1, (20, 10, 49, 39), False, (255, 0, 0))])])
    cfg = load_config(None, ["TRAIN.SCALES=[80]", "TRAIN.MAX_SIZE=1000", "TRAIN.ROTATE90=True"])
    batches = TrainBatches(data, cfg)
    for flipped, box in ((False, [10.0, 50.0, 39.0, 79.0]), (True, [40.0, 50.0, 69.0, 79.0])):
        it = next(i for i in range(4) if batches.entries(i)[0] == (0, flipped))
        batch = batches[it]
        assert batch.image_sizes.tolist() == [[100, 80]]
        assert batch.gt_boxes[0].tolist() == [box]
        pixels = batch.images[0] + torch.tensor(cfg.PIXEL_MEANS).view(3, 1, 1)  # PIXEL_STDS are 1
        ys, xs = torch.nonzero((pixels[0] > 200) & (pixels[1] < 50), as_tuple=True)
        assert [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())] == box


# --------------------------------------------------------------------------------------------- colour

def _torchvision(image: torch.Tensor, factors, order) -> torch.Tensor:
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    x = image / 255
    for op in order:
        if factors[op] is not None:
            x = ops[op](x, factors[op])
    return x * 255


@pytest.mark.parametrize("factors, order", [
    ((1.3, None, None, None), [0, 1, 2, 3]),
    ((None, 0.6, None, None), [0, 1, 2, 3]),
    ((None, None, 1.7, None), [0, 1, 2, 3]),
    ((None, None, None, 0.23), [0, 1, 2, 3]),
    ((None, None, None, -0.41), [0, 1, 2, 3]),
    ((None, None, None, 0.5), [0, 1, 2, 3]),
    ((1.6, 1.4, 0.3, -0.1), [3, 1, 0, 2]),
    ((0.7, 0.8, 1.5, 0.12), [2, 3, 1, 0]),
])
def test_colour_operations_equal_torchvision(factors, order):
    image = _image(seed=len(order) + int(100 * (factors[3] or 0)))
    image[:, 0, :4] = torch.tensor([[10.0, 200, 7, 255], [10, 30, 7, 255], [10, 30, 200, 0]])  # grey, ties, full
    ours = adjust_colors(image, factors, order)
    assert ours.min() >= 0 and ours.max() <= 255
    assert torch.allclose(ours, _torchvision(image, factors, order), rtol=0, atol=2e-3)


def test_color_jitter_draws_as_torchvision_colorjitter():
    """Same seed, same factors and order: our generator against ColorJitter's global one."""
    image = _image(seed=3)
    amounts = (0.4, 0.3, 0.5, 0.1)
    for seed in range(5):
        ours = color_jitter(image, amounts, torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            theirs = T.ColorJitter(*amounts)(image / 255) * 255
        assert torch.allclose(ours, theirs, rtol=0, atol=2e-3)
    factors, order = jitter_params(amounts, torch.Generator().manual_seed(0))
    assert sorted(order) == [0, 1, 2, 3]
    assert all(1 - a <= f <= 1 + a for f, a in zip(factors[:3], amounts)) and abs(factors[3]) <= 0.1


def test_zero_amounts_leave_the_image_bit_identical():
    image = _image(seed=5)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert color_jitter(image, (0, 0, 0, 0), g) is image
    assert torch.equal(g.get_state(), state)  # nothing drawn
    # hue 0 skips the HSV round trip: brightness alone, bit for bit
    factors, _ = jitter_params((0.3, 0, 0, 0), torch.Generator().manual_seed(1))
    assert factors[1:] == [None, None, None]
    out = color_jitter(image, (0.3, 0, 0, 0), torch.Generator().manual_seed(1))
    assert torch.equal(out, (image * factors[0]).clamp(0, 255))
    assert torch.equal(adjust_colors(image, [None] * 4, [0, 1, 2, 3]), image)
    assert torch.allclose(adjust_colors(image, [None, None, None, 0.0], [3, 0, 1, 2]), image, rtol=0, atol=1e-3)


def test_colour_jitter_in_batches_leaves_boxes_and_streams_alone():
    data = ListSet(SCENES)
    plain = TrainBatches(data, _cfg())
    jitter = TrainBatches(data, _cfg("TRAIN.COLOR_JITTER=[0.4, 0.4, 0.4, 0.1]"))
    for it in range(4):
        a, b = plain[it], jitter[it]
        assert torch.equal(a.image_sizes, b.image_sizes) and a.image_ids == b.image_ids
        assert a.seed == b.seed and a.image_seeds == b.image_seeds
        assert all(torch.equal(x, y) for x, y in zip(a.gt_boxes, b.gt_boxes))
        assert all(torch.equal(x, y) for x, y in zip(a.gt_labels, b.gt_labels))
        assert not torch.equal(a.images, b.images)


# --------------------------------------------------------------------------------------------- batches

def _batch_before_augmentation(batches: TrainBatches, iteration: int):
    """TrainBatches.__getitem__ as it was before augmentation existed (commit e9eeb69), verbatim."""
    cfg, train = batches.cfg, batches.cfg.TRAIN
    seed = iteration_seed(cfg.RNG_SEED, iteration)
    g = torch.Generator().manual_seed(seed)
    target = train.SCALES[int(torch.randint(len(train.SCALES), (1,), generator=g))]
    tensors, boxes, labels, ids = [], [], [], []
    for index, flipped in batches.entries(iteration):
        sample = batches.dataset[index]
        prepared = prep_image(image_to_tensor(batches.dataset.load_image(sample)), target, train.MAX_SIZE,
                              cfg.PIXEL_MEANS, cfg.PIXEL_STDS, flip=flipped)
        keep = ~sample.difficult
        b = sample.boxes[keep]
        if flipped:
            b = flip_boxes(b, sample.width)
        tensors.append(prepared.tensor)
        boxes.append(scale_boxes(b, prepared.scale))
        labels.append(sample.labels[keep])
        ids.append(sample.image_id + (" (flipped)" if flipped else ""))
    images, sizes = batch_images(tensors)
    seeds = [image_seed(cfg.RNG_SEED, iteration, p) for p in batches.positions()]
    return images, sizes, boxes, labels, ids, seed, seeds


def test_off_gives_the_batches_of_before():
    data = ListSet(SCENES)
    batches = TrainBatches(data, _cfg("TRAIN.COLOR_JITTER=[0, 0, 0, 0]", "TRAIN.RANDOM_CROP=0"))
    for it in range(7):
        images, sizes, boxes, labels, ids, seed, seeds = _batch_before_augmentation(batches, it)
        batch = batches[it]
        assert torch.equal(batch.images, images) and torch.equal(batch.image_sizes, sizes)
        assert all(torch.equal(x, y) for x, y in zip(batch.gt_boxes, boxes))
        assert all(torch.equal(x, y) for x, y in zip(batch.gt_labels, labels))
        assert batch.image_ids == ids and batch.seed == seed and batch.image_seeds == seeds


def test_augmentation_is_a_pure_function_of_seed_iteration_and_position():
    data = ListSet(SCENES[:1])  # one image: every iteration sees it, only the augmentation differs
    cfg = load_config("demo-cpu", ["TRAIN.SCALES=[64]", "TRAIN.USE_FLIPPED=False", "TRAIN.RANDOM_CROP=0.5",
                                   "TRAIN.COLOR_JITTER=[0.2, 0.2, 0.2, 0.05]"])
    first = [TrainBatches(data, cfg)[it] for it in range(12)]
    again = TrainBatches(data, cfg)
    for it in (7, 3, 0):  # out of order, from a fresh object
        assert torch.equal(again[it].images, first[it].images)
        assert torch.equal(again[it].gt_boxes[0], first[it].gt_boxes[0])
    crops = {(tuple(b.image_sizes[0].tolist()), tuple(b.gt_boxes[0].flatten().tolist())) for b in first}
    assert len(crops) >= 4  # different iterations, different crops (and some uncropped)
    other = load_config("demo-cpu", ["TRAIN.SCALES=[64]", "TRAIN.USE_FLIPPED=False", "TRAIN.RANDOM_CROP=0.5",
                                     "TRAIN.COLOR_JITTER=[0.2, 0.2, 0.2, 0.05]", "RNG_SEED=4"])
    assert any(not torch.equal(TrainBatches(data, other)[it].images, first[it].images) for it in range(3))
    # by global position: two processes of one image each see the one 2-image batch
    two = load_config("demo-cpu", ["TRAIN.SCALES=[64]", "TRAIN.IMS_PER_BATCH=2", "TRAIN.RANDOM_CROP=0.5",
                                   "TRAIN.COLOR_JITTER=[0.2, 0.2, 0.2, 0.05]"])
    one = load_config("demo-cpu", ["TRAIN.SCALES=[64]", "TRAIN.IMS_PER_BATCH=1", "TRAIN.RANDOM_CROP=0.5",
                                   "TRAIN.COLOR_JITTER=[0.2, 0.2, 0.2, 0.05]"])
    data = ListSet(SCENES)
    for it in range(3):
        whole = TrainBatches(data, two)[it]
        parts = [TrainBatches(data, one, rank=r, world_size=2)[it] for r in range(2)]
        for p, part in enumerate(parts):
            h, w = part.image_sizes[0].tolist()
            assert torch.equal(whole.images[p, :, :h, :w], part.images[0, :, :h, :w])
            assert torch.equal(whole.gt_boxes[p], part.gt_boxes[0])


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A VOC root of 6 PNG images: solid rectangles of one colour per class on a grey background."""
    root = tmp_path_factory.mktemp("rectangles")
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ids = []
    for i in range(6):
        w, h = 96 + 8 * (i % 2), 72
        im = Image.new("RGB", (w, h), BACKGROUND)
        draw, objects = ImageDraw.Draw(im), []
        for k, name in enumerate(COLOURS):  # one per class, in its own third of the width
            x1 = k * w // 3 + int(torch.randint(0, 6, (1,), generator=g))
            y1 = int(torch.randint(0, 40, (1,), generator=g))
            box = (x1, y1, x1 + 10 + int(torch.randint(0, 14, (1,), generator=g)),
                   y1 + 8 + int(torch.randint(0, 22, (1,), generator=g)))
            draw.rectangle(box, fill=COLOURS[name])
            objects.append((name, box))
        im.save(root / "JPEGImages" / f"r{i}.png")
        write_voc_xml(root / "Annotations" / f"r{i}.xml", f"r{i}.png", w, h, objects)
        ids.append(f"r{i}")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_cropped_boxes_cover_their_objects_pixels(voc):
    """End to end (VOC files, crop, quarter turns, resize to 72 or 90, mirror, normalise): the pixels nearer each
    kept box's colour than the background's span that box, to within 1 px at each side (bilinear resize blends the
    edge)."""
    data = open_dataset(voc, "train")
    cfg = load_config("demo-cpu", ["TRAIN.SCALES=[72, 90]", "TRAIN.IMS_PER_BATCH=2", "TRAIN.RANDOM_CROP=0.5",
                                   "TRAIN.ROTATE90=True"])
    means = torch.tensor(cfg.PIXEL_MEANS).view(3, 1, 1)
    stds = torch.tensor(cfg.PIXEL_STDS).view(3, 1, 1)
    batches = TrainBatches(data, cfg)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1)
    whole = {(s, round(w * s / 72)) for s in (72, 90) for w in (96, 104)}  # (h, w) of uncropped images
    whole_turned = {(w, h) for h, w in whole}  # (h, w) of uncropped images after a quarter turn (or three)
    cropped = flipped = turned = checked = 0
    for it in range(12):
        batch = batches[it]
        for n in range(2):
            h, w = batch.image_sizes[n].tolist()
            pixels = (batch.images[n] * stds + means)[:, :h, :w]
            cropped += (h, w) not in whole and (h, w) not in whole_turned
            turned += (h, w) in whole_turned
            flipped += batch.image_ids[n].endswith("(flipped)")
            for box, label in zip(batch.gt_boxes[n].tolist(), batch.gt_labels[n].tolist()):
                colour = torch.tensor(COLOURS[data.classes[label - 1]], dtype=torch.float32).view(3, 1, 1)
                mine = ((pixels - colour) ** 2).sum(0) < ((pixels - background) ** 2).sum(0)
                ys, xs = torch.nonzero(mine, as_tuple=True)
                assert len(xs) > 0, (it, n, box)
                found = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
                assert max(abs(a - b) for a, b in zip(found, box)) <= 1.0, (it, n, box, found)
                checked += 1
    assert cropped >= 4 and flipped >= 4 and turned >= 4 and checked >= 40


# --------------------------------------------------------------------------------------------- mosaic

def _coded(h: int, w: int, k: int) -> torch.Tensor:
    """An image whose pixel (x, y) holds (x, y, 100 + k): each output pixel says where it came from."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((xs, ys, torch.full_like(xs, 100 + k))).float()


def _coded_piece(k: int, g: torch.Generator, h: int = 60, w: int = 80):
    x1 = torch.randint(0, w - 10, (6,), generator=g)
    y1 = torch.randint(0, h - 10, (6,), generator=g)
    x2 = (x1 + torch.randint(0, 30, (6,), generator=g)).clamp(max=w - 1)
    y2 = (y1 + torch.randint(0, 30, (6,), generator=g)).clamp(max=h - 1)
    boxes = torch.stack((x1, y1, x2, y2), 1).float()
    return _coded(h, w, k), boxes, torch.arange(6) + 10 * k  # label: piece k, box j


@pytest.mark.parametrize("seed", range(8))
def test_mosaic_boxes_stay_on_their_pixels(seed):
    """Four coded images (pixel = its own (x, y) and piece): every output box lies on its piece's pixels, each side
    either the object's own side or cut where the piece's window ends; every box whose centre pixel made it into
    the mosaic is there, the others are not."""
    g = torch.Generator().manual_seed(seed)
    pieces = [_coded_piece(k, g) for k in range(4)]
    fill = (7.0, 7.0, 7.0)
    image, boxes, labels = mosaic(pieces, fill, torch.Generator().manual_seed(seed))
    assert image.shape == (3, 60, 80)
    assert not (image == 7.0).all(0).any()  # pieces of the first's size fill their quarters
    for box, label in zip(boxes.long().tolist(), labels.tolist()):
        k, j = divmod(label, 10)
        source = pieces[k][1][j].long().tolist()
        x1, y1, x2, y2 = box
        region = image[:, y1:y2 + 1, x1:x2 + 1]
        assert (region[2] == 100 + k).all(), (seed, label)
        sx1, sy1 = image[0, y1, x1].item(), image[1, y1, x1].item()
        sx2, sy2 = image[0, y2, x2].item(), image[1, y2, x2].item()
        assert source[0] <= sx1 <= sx2 <= source[2] and source[1] <= sy1 <= sy2 <= source[3]

        def cut(y, x, k=k):  # the pixel beyond the box's side is off the canvas or another piece's
            return not (0 <= y < 60 and 0 <= x < 80) or image[2, y, x].item() != 100 + k

        assert sx1 == source[0] or cut(y1, x1 - 1)
        assert sy1 == source[1] or cut(y1 - 1, x1)
        assert sx2 == source[2] or cut(y2, x2 + 1)
        assert sy2 == source[3] or cut(y2 + 1, x2)
    present = {(int(image[2, y, x]) - 100, int(image[0, y, x]), int(image[1, y, x]))
               for y in range(60) for x in range(80)}
    for k, (_, source_boxes, source_labels) in enumerate(pieces):
        for b, lab in zip(source_boxes.tolist(), source_labels.tolist()):
            centre = (k, int((b[0] + b[2] + 1) // 2), int((b[1] + b[3] + 1) // 2))
            assert (centre in present) == (lab in labels.tolist()), (seed, lab)


def test_mosaic_resizes_pieces_to_the_first_short_side():
    """A piece twice the first's size is halved: its 20-px boxes become 10-px ones on the same pixels."""
    tiles = torch.tensor([[x, y, x + 19, y + 19] for y in range(0, 120, 20) for x in range(0, 160, 20)]).float()
    first = (_coded(60, 80, 0), torch.tensor([[30.0, 20.0, 49.0, 39.0]]), torch.tensor([1]))
    big = (_coded(120, 160, 1), tiles, torch.arange(len(tiles)) + 100)
    for seed in range(4):
        image, boxes, labels = mosaic([first, big, first, first], (7.0,) * 3, torch.Generator().manual_seed(seed))
        halved, whole = boxes[labels >= 100], 0
        assert len(halved) > 0 and torch.equal(halved, halved.round())  # +1 convention: 20-px tiles, 10-px pixels
        halved = halved.long()
        for (x1, y1, x2, y2), label in zip(halved.tolist(), labels[labels >= 100].tolist()):
            assert (image[2, y1:y2 + 1, x1:x2 + 1] == 101).all()
            if (x2 - x1, y2 - y1) == (9, 9):  # not cut by the window: the tile, halved, where its pixels went
                tile = tiles[label - 100].tolist()
                assert abs(image[0, y1, x1].item() - (tile[0] + 0.5)) <= 0.5
                assert abs(image[1, y2, x2].item() - (tile[3] - 0.5)) <= 0.5
                whole += 1
            else:
                assert x2 - x1 < 9 or y2 - y1 < 9
        assert whole > 0 or len(halved) <= 4


def test_a_narrower_piece_touches_the_centre_and_leaves_the_fill():
    """First image 20 x 100: a 40 x 40 piece is halved to 20 x 20, narrower than its quarter, so it sits against
    the centre with the fill beside it; its tall box, halved to columns 2..5, moves with it when its centre
    row ((0 + 19 + 1) / 2 = 10 of the halved piece's 20) is in the window."""
    first = (_coded(20, 100, 0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    square = (_coded(40, 40, 1), torch.tensor([[4.0, 0.0, 11.0, 39.0]]), torch.tensor([5]))
    kept = 0
    for seed in range(8):
        image, boxes, labels = mosaic([first, square, first, first], (7.0,) * 3, torch.Generator().manual_seed(seed))
        ys, xs = torch.nonzero(image[2] == 101, as_tuple=True)
        left, right, top, bottom = xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()
        assert right - left + 1 == 20 and top == 0  # top right: the piece's whole width, from the top
        xc, yc = left, bottom + 1
        assert (image[:, :yc, right + 1:] == 7.0).all() and right + 1 < 100  # the fill beyond it
        assert (image[2, :yc, :xc] == 100).all()  # the first image's quarter up to the centre
        y0 = round((image[1, 1, left].item() - 0.5) / 2) - 1  # the window's first row (halved row r holds 2r + 0.5)
        if y0 <= 10 < y0 + yc:
            assert boxes[labels == 5].tolist() == [[left + 2, 0, left + 5, bottom]]
            kept += 1
        else:
            assert 5 not in labels.tolist()
    assert 0 < kept < 8


def test_mosaic_in_batches_is_seeded_switchable_and_refused_out_of_range():
    data = ListSet(SCENES)
    on = _cfg("TRAIN.MOSAIC=1")
    first = [TrainBatches(data, on)[it] for it in range(4)]
    again = TrainBatches(data, on)
    assert all(torch.equal(again[it].images, first[it].images) for it in (3, 0))
    plain = TrainBatches(data, _cfg())
    assert all(b.images.shape == plain[it].images.shape for it, b in enumerate(first))  # the first image's size
    assert any(not torch.equal(b.images, plain[it].images) for it, b in enumerate(first))
    with pytest.raises(ConfigError, match=r"TRAIN.MOSAIC=1.5 must lie in \[0, 1\]"):
        load_config(None, ["TRAIN.MOSAIC=1.5"])
