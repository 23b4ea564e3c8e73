"""Boxes too small for the stride: the warning (by hand-computed inputs) and TRAIN.SCALE_UP_LIMIT, the input frcnn
train takes instead (grown by one factor, capped by the limit, written into the resolved config, resolved once)."""

from __future__ import annotations

import json

import pytest
import torch

from frcnn.config import ConfigError, load_config, merge, parse_override
from frcnn.data.anchor_fit import anchor_fit, suggest_scales
from frcnn.data.sample import Sample
from frcnn.data.small_boxes import scale_up, scale_up_line, small_boxes, small_boxes_hint
from frcnn.engine.train import resolve_run_config


def tiny_objects(side: float, n: int = 5, images: int = 20) -> list[Sample]:
    """``images`` images of 1000 x 1000, ``n`` boxes each, every box ``side`` x ``side`` px (+1 convention)."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(images):
        xy = (torch.rand(n, 2, generator=g) * 900).round()
        samples.append(Sample(str(i), f"{i}.jpg", 1000, 1000, torch.cat((xy, xy + side - 1), dim=1),
                              torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)))
    return samples


def one_small_class(images: int = 20) -> list[Sample]:
    """Each image of 1000 x 1000: one 30 px box of class a (9.6 px at scale 320), nine 200 px boxes of class b."""
    g = torch.Generator().manual_seed(2)
    samples = []
    for i in range(images):
        xy = (torch.rand(10, 2, generator=g) * 790).round()
        side = torch.tensor([30.0] + [200.0] * 9).unsqueeze(1)
        samples.append(Sample(str(i), f"{i}.jpg", 1000, 1000, torch.cat((xy, xy + side - 1), dim=1),
                              torch.tensor([1] + [2] * 9), torch.zeros(10, dtype=torch.bool)))
    return samples


def with_sets(cfg, *texts):
    for text in texts:
        cfg = merge(cfg, parse_override(text))
    return cfg


def test_boxes_under_two_strides_get_a_larger_input_suggested():
    cfg = with_sets(load_config("scratch-cpu"), "TRAIN.SCALE_UP_LIMIT=0")  # scale 320, max 512, stride 8
    fit = anchor_fit(tiny_objects(30), cfg)  # 30 px at 320 / 1000: 9.6 px, under 16
    # by hand: 320 x 16 / 9.6 = 533.3 -> 544 (multiple of 32); 512 x 544 / 320 = 870.4 -> 896; (544 / 320)^2 = 2.89
    expected = ("  warning: 100 (100.0%) of the boxes are under 16 px (2 x the stride 8) at scale 320: few anchors "
                "on a 8-px grid reach IoU 0.7 with them; a larger input brings 3 in 4 boxes to 16 px or more, at "
                "about 2.9x the time an iteration: --set TRAIN.SCALES=[544] --set TRAIN.MAX_SIZE=896 "
                "--set TEST.SCALES=[544] --set TEST.MAX_SIZE=896")
    assert small_boxes_hint(fit) == expected
    assert small_boxes(fit) == {"class": None, "under_px": 16, "stride": 8, "boxes": 100, "out_of": 100, "share": 1.0,
                                "scale": 544, "max_size": 896, "cost": 2.89}  # what check-data --json says
    # what it promises: at the suggested input the boxes are 16 px or more, and more of them get an anchor
    larger = with_sets(cfg, "TRAIN.SCALES=[544]", "TRAIN.MAX_SIZE=896")
    bigger = anchor_fit(tiny_objects(30), larger)
    assert float(bigger.sizes.min()) == pytest.approx(30 * 544 / 1000)
    best_before, best_after = suggest_scales(tiny_objects(30), cfg)[0], suggest_scales(tiny_objects(30), larger)[0]
    assert best_after.below(0.7) < best_before.below(0.7)
    assert small_boxes_hint(anchor_fit(tiny_objects(60), cfg)) is None  # 19.2 px: no warning
    # frcnn train with ANCHOR_SCALES: auto and no SCALE_UP_LIMIT says it too, right after the anchors it chose
    lines = resolve_run_config(cfg, tiny_objects(30))[1]
    at = next(i for i, line in enumerate(lines) if line.startswith("anchors: ANCHOR_SCALES=auto -> ["))
    assert lines[at + 1] == expected.strip()


def test_one_class_of_small_boxes_gets_the_larger_input_suggested():
    """10% of all boxes are small, so the whole-set rule keeps quiet; all of class a's are."""
    cfg = load_config("scratch-cpu")
    fit = anchor_fit(one_small_class(), cfg)
    assert small_boxes(fit) is None and small_boxes_hint(fit) is None  # without class names: 20 of 200
    # by hand, as for one class: 320 x 16 / 9.6 -> 544, 512 x 544 / 320 -> 896, (544 / 320)^2 = 2.89
    assert small_boxes(fit, ["a", "b"]) == {"class": "a", "under_px": 16, "stride": 8, "boxes": 20, "out_of": 20,
                                            "share": 1.0, "scale": 544, "max_size": 896, "cost": 2.89}
    expected = ("  warning: 20 (100.0%) of the a boxes are under 16 px (2 x the stride 8) at scale 320: few anchors "
                "on a 8-px grid reach IoU 0.7 with them; a larger input brings 3 in 4 a boxes to 16 px or more, at "
                "about 2.9x the time an iteration: --set TRAIN.SCALES=[544] --set TRAIN.MAX_SIZE=896 "
                "--set TEST.SCALES=[544] --set TEST.MAX_SIZE=896")
    assert small_boxes_hint(fit, ["a", "b"]) == expected


def test_a_group_of_fewer_than_ten_small_boxes_keeps_quiet():
    cfg = load_config("scratch-cpu")
    assert small_boxes(anchor_fit(one_small_class(images=9), cfg), ["a", "b"]) is None  # 9 of class a
    assert small_boxes(anchor_fit(one_small_class(images=10), cfg), ["a", "b"])["boxes"] == 10
    assert small_boxes(anchor_fit(tiny_objects(30, n=1, images=9), cfg)) is None  # all 9 boxes small


def test_scale_up_takes_the_input_the_warning_names():
    assert load_config("scratch-cpu").TRAIN.SCALE_UP_LIMIT == 2
    cfg = with_sets(load_config("scratch-cpu"), "TRAIN.SCALE_UP_LIMIT=4")
    grown, done = scale_up(cfg, tiny_objects(30))
    # the warning's input (hand values above), for training and test, and the limit spent
    assert (grown.TRAIN.SCALES, grown.TRAIN.MAX_SIZE, grown.TEST.SCALES, grown.TEST.MAX_SIZE) == ((544,), 896, (544,),
                                                                                                  896)
    assert grown.TRAIN.SCALE_UP_LIMIT == 0
    assert {k: done[k] for k in ("from", "to", "cost", "capped", "asked", "class", "boxes")} == {
        "from": 320, "to": 544, "cost": 2.89, "capped": False, "asked": 544, "class": None, "boxes": 100}
    assert float(anchor_fit(tiny_objects(30), grown).sizes.min()) == pytest.approx(16.32)  # 30 x 544 / 1000
    assert small_boxes(anchor_fit(tiny_objects(30), grown)) is None
    everything_else = merge(grown, {"TRAIN": {"SCALES": [320], "MAX_SIZE": 512, "SCALE_UP_LIMIT": 4.0},
                                    "TEST": {"SCALES": [320], "MAX_SIZE": 512}})
    assert everything_else == cfg  # nothing but the four sizes and the limit changed
    assert scale_up(grown, tiny_objects(30)) == (grown, None)  # limit 0: resolved once
    assert scale_up(cfg, tiny_objects(60)) == (cfg, None)  # 19.2 px: nothing to grow
    off = with_sets(cfg, "TRAIN.SCALE_UP_LIMIT=0")
    assert scale_up(off, tiny_objects(30)) == (off, None)
    with pytest.raises(ConfigError, match=r"^TRAIN.SCALE_UP_LIMIT=-1.0 must be at least 0 \(0 = off\)$"):
        with_sets(cfg, "TRAIN.SCALE_UP_LIMIT=-1")
    assert "TRAIN.SCALES=[544] MAX_SIZE=896, TEST.SCALES=[544] MAX_SIZE=896, about 2.9x" in scale_up_line(grown, done)


def test_scale_up_stops_at_its_limit_and_says_what_it_left():
    cfg = with_sets(load_config("scratch-cpu"), "TRAIN.SCALE_UP_LIMIT=2")
    grown, done = scale_up(cfg, one_small_class(), ["a", "b"])
    # by hand: 320 x sqrt(2) = 452.5 -> 448 (the multiple of 32 within the limit); 512 x 448 / 320 = 716.8 -> 736
    assert (grown.TRAIN.SCALES, grown.TRAIN.MAX_SIZE, grown.TEST.SCALES, grown.TEST.MAX_SIZE) == ((448,), 736, (448,),
                                                                                                  736)
    assert (done["to"], done["cost"], done["capped"], done["asked"], done["class"]) == (448, 1.96, True, 544, "a")
    line = scale_up_line(grown, done)
    assert line.startswith("input: TRAIN.SCALE_UP_LIMIT=2 -> TRAIN.SCALES=[448] MAX_SIZE=736, TEST.SCALES=[448] "
                           "MAX_SIZE=736, about 2.0x the time an iteration: 20 (100.0%) of the a boxes are under 16 px")
    assert "544 would bring 3 in 4 to 16 px, at 2.9x: raise TRAIN.SCALE_UP_LIMIT" in line
    # 30 x 448 / 1000 = 13.4 px: still small, and the warning at the new input says so
    assert small_boxes(anchor_fit(one_small_class(), grown), ["a", "b"])["scale"] == 544  # 448 x 16 / 13.44 -> 544
    # too small a limit to reach the next multiple of 32: nothing changes
    tight = with_sets(cfg, "TRAIN.SCALE_UP_LIMIT=1.1")
    assert scale_up(tight, one_small_class(), ["a", "b"]) == (tight, None)


def test_scale_up_grows_every_scale_by_one_factor():
    cfg = with_sets(load_config("scratch-cpu"), "TRAIN.SCALES=[288,320]", "TEST.SCALES=[320]", "TRAIN.SCALE_UP_LIMIT=4")
    grown, done = scale_up(cfg, tiny_objects(30))
    # by hand, at SCALES[0] = 288: 30 px -> 8.64; 288 x 16 / 8.64 = 533.3 -> 544 (under 288 x 2 = 576: not capped);
    # x 544 / 288: 320 -> 604.4 -> 608, max 512 -> 967.1 -> 992
    assert (done["from"], done["to"]) == (288, 544)
    assert (grown.TRAIN.SCALES, grown.TRAIN.MAX_SIZE, grown.TEST.SCALES, grown.TEST.MAX_SIZE) == ((544, 608), 992,
                                                                                                  (608,), 992)


def test_frcnn_train_resolves_the_input_before_the_anchors_once():
    cfg = with_sets(load_config("scratch-cpu"), "TRAIN.SCALE_UP_LIMIT=4")
    resolved, lines, meta = resolve_run_config(cfg, tiny_objects(30))
    assert (resolved.TRAIN.SCALES, resolved.TEST.SCALES, resolved.TRAIN.SCALE_UP_LIMIT) == ((544,), (544,), 0)
    at = next(i for i, line in enumerate(lines) if line.startswith("input: TRAIN.SCALE_UP_LIMIT=4 -> "))
    assert lines[at + 1].startswith("anchors: ANCHOR_SCALES=auto -> ") and "at scale 544;" in lines[at + 1]
    assert not any("warning" in line for line in lines)  # 16.3 px now: nothing left to warn about
    assert resolved.ANCHOR_SCALES == suggest_scales(tiny_objects(30), resolved)[0].scales  # chosen at 544
    assert json.loads(json.dumps(meta["input"]))["to"] == 544  # meta.json's "resolved"
    assert resolve_run_config(resolved, tiny_objects(30))[0] == resolved


def test_check_data_and_train_take_the_same_larger_input(tmp_path, capsys):
    """A VOC set of 400 x 400 images with 12 px boxes (9.6 px at scale 320): check-data says which input frcnn train
    will take, and the run's config.yaml holds it (what eval and detect read)."""
    from PIL import Image

    from frcnn.cli import main
    from frcnn.data.voc import write_voc_xml
    from frcnn.engine.checkpoint import read_config

    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (400, 400), (90, 120, 150)).save(root / "JPEGImages" / f"{i}.jpg")
        boxes = [(40 * k + 10 * i, 60 * k, 40 * k + 10 * i + 11, 60 * k + 11) for k in range(5)]  # 12 x 12
        write_voc_xml(root / "Annotations" / f"{i}.xml", f"{i}.jpg", 400, 400, [("dot", b) for b in boxes])
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("0\n1\n2\n3\n")
    assert main(["check-data", "--data", str(root), "--split", "trainval", "--no-progress"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("input: ")]
    # by hand: 320 x 16 / 9.6 = 533.3 -> 544 asked; scratch-cpu's limit 2: 320 x sqrt(2) = 452.5 -> 448;
    # 512 x 448 / 320 = 716.8 -> 736
    assert line.startswith("input: TRAIN.SCALE_UP_LIMIT=2 -> TRAIN.SCALES=[448] MAX_SIZE=736, TEST.SCALES=[448] "
                           "MAX_SIZE=736, about 2.0x the time an iteration: 20 (100.0%) of the boxes are under 16 px")
    assert "544 would bring 3 in 4 to 16 px" in line
    assert main(["check-data", "--data", str(root), "--split", "trainval", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["scale_up"]["to"], report["anchor_fit"]["scale"], report["small_boxes"]["scale"]) == (448, 448, 544)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "trainval", "--out", str(out), "--no-progress", "--set",
                 "TRAIN.MAX_EPOCHS=0.5", "--set", "TRAIN.STEP_EPOCHS=[0.25]", "--set", "TRAIN.WARMUP_ITERS=0",
                 "--set", "DEVICE=cpu"]) == 0
    assert line in capsys.readouterr().out.splitlines()
    cfg = read_config(out / "config.yaml")
    assert (cfg.TRAIN.SCALES, cfg.TRAIN.MAX_SIZE, cfg.TEST.SCALES, cfg.TEST.MAX_SIZE) == ((448,), 736, (448,), 736)
    assert cfg.TRAIN.SCALE_UP_LIMIT == 0
    assert json.loads((out / "meta.json").read_text())["resolved"]["input"]["from"] == 320
