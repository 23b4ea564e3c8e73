"""Configuration (frcnn.config): reference defaults, presets, YAML, overrides, errors."""

from __future__ import annotations

import dataclasses

import pytest

from frcnn.config import (
    PRESETS,
    Config,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    merge,
    parse_override,
)
from frcnn.errors import ConfigError


def test_reference_defaults():
    cfg = Config()
    t, s = cfg.TRAIN, cfg.TEST
    assert (t.RPN_POSITIVE_OVERLAP, t.RPN_NEGATIVE_OVERLAP) == (0.7, 0.3)
    assert (t.RPN_BATCHSIZE, t.RPN_FG_FRACTION, t.RPN_CLOBBER_POSITIVES) == (256, 0.5, False)
    assert (t.BATCH_SIZE, t.FG_FRACTION, t.FG_THRESH) == (128, 0.25, 0.5)
    assert (t.BG_THRESH_HI, t.BG_THRESH_LO) == (0.5, 0.1)
    assert (t.RPN_PRE_NMS_TOP_N, t.RPN_POST_NMS_TOP_N, t.RPN_NMS_THRESH) == (12000, 2000, 0.7)
    assert (s.RPN_PRE_NMS_TOP_N, s.RPN_POST_NMS_TOP_N, s.RPN_NMS_THRESH) == (6000, 300, 0.7)
    assert s.NMS == 0.3 and s.MAX_PER_IMAGE == 100
    assert (cfg.POOLING_SIZE, cfg.POOLING_MODE) == (7, "crop")
    assert cfg.ANCHOR_SCALES == (8, 16, 32) and cfg.ANCHOR_RATIOS == (0.5, 1, 2) and cfg.FEAT_STRIDE == 16
    assert t.BBOX_NORMALIZE_STDS == (0.1, 0.1, 0.2, 0.2) and t.BBOX_NORMALIZE_MEANS == (0.0, 0.0, 0.0, 0.0)
    assert (t.SCALES, t.MAX_SIZE, s.SCALES, s.MAX_SIZE) == ((600,), 1000, (600,), 1000)
    assert (t.LEARNING_RATE, t.MOMENTUM, t.GAMMA) == (0.001, 0.9, 0.1)
    assert cfg.RPN_CHANNELS == 512 and cfg.RESNET.FIXED_BLOCKS == 1
    assert cfg.PIXEL_MEANS == (122.7717, 115.9465, 102.9801)  # the reference BGR means, reversed to RGB


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    for key, value in PRESETS[name].items():
        if not isinstance(value, dict):
            got = getattr(cfg, key)
            assert (list(got) if isinstance(got, tuple) else got) == value


def test_demo_cpu_preset_values():
    cfg = load_config("demo-cpu")
    assert cfg.BACKBONE == "tiny" and cfg.POOLING_MODE == "align" and cfg.FEAT_STRIDE == 8
    assert cfg.TRAIN.SCALES == (320,) and cfg.TRAIN.RPN_BATCHSIZE == 128
    assert cfg.TEST.RPN_POST_NMS_TOP_N == 100
    assert cfg.TRAIN.RPN_POSITIVE_OVERLAP == 0.7  # untouched keys keep their defaults


def test_no_preset_gives_defaults():
    assert load_config() == Config()
    assert load_config(None, []) == Config()


def test_yaml_file_with_preset_key(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("PRESET: demo-cpu\nTRAIN:\n  RPN_BATCHSIZE: 64\n  LEARNING_RATE: 1e-3\nPOOLING_SIZE: 5\n")
    cfg = load_config(str(path))
    assert cfg.BACKBONE == "tiny"  # from the preset
    assert cfg.TRAIN.RPN_BATCHSIZE == 64 and cfg.POOLING_SIZE == 5
    assert cfg.TRAIN.LEARNING_RATE == 0.001 and isinstance(cfg.TRAIN.LEARNING_RATE, float)
    assert cfg.TRAIN.MAX_SIZE == 512  # preset value not overridden


def test_yaml_file_without_preset(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("BACKBONE: vgg16\nANCHOR_SCALES: [4, 8]\n")
    cfg = load_config(str(path))
    assert cfg.BACKBONE == "vgg16" and cfg.ANCHOR_SCALES == (4.0, 8.0) and cfg.TRAIN.BATCH_SIZE == 128


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("")
    assert load_config(str(path)) == Config()


def test_overrides():
    cfg = load_config("demo-cpu", ["TRAIN.RPN_BATCHSIZE=128", "TEST.NMS=0.4", "TRAIN.SCALES=[400, 500]",
                                   "TRAIN.USE_FLIPPED=false", "POOLING_MODE=crop", "TRAIN.LEARNING_RATE=1e-3",
                                   "TRAIN.STEPSIZE=100"])
    assert cfg.TRAIN.RPN_BATCHSIZE == 128 and cfg.TEST.NMS == 0.4
    assert cfg.TRAIN.SCALES == (400, 500) and cfg.TRAIN.USE_FLIPPED is False
    assert cfg.POOLING_MODE == "crop" and cfg.TRAIN.LEARNING_RATE == 0.001
    assert cfg.TRAIN.STEPSIZE == (100,)  # a scalar becomes a one-element tuple
    assert cfg.BACKBONE == "tiny"


def test_overrides_apply_after_yaml_and_in_order(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("TRAIN:\n  RPN_BATCHSIZE: 64\n")
    cfg = load_config(str(path), ["TRAIN.RPN_BATCHSIZE=32", "TRAIN.RPN_BATCHSIZE=16"])
    assert cfg.TRAIN.RPN_BATCHSIZE == 16


def test_parse_override_nesting():
    assert parse_override("TRAIN.RPN_BATCHSIZE=128") == {"TRAIN": {"RPN_BATCHSIZE": 128}}
    assert parse_override("PRETRAINED=") == {"PRETRAINED": ""}
    assert parse_override("PRETRAINED=a=b.pth") == {"PRETRAINED": "a=b.pth"}


def _one_line_error(fn, *needles):
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_unknown_key_raises_naming_it(tmp_path):
    _one_line_error(lambda: load_config(None, ["TRAIN.RPN_BATCHSIZ=3"]), "TRAIN.RPN_BATCHSIZ")
    _one_line_error(lambda: load_config(None, ["NOPE=3"]), "NOPE")
    path = tmp_path / "c.yml"
    path.write_text("TEST:\n  FOO: 1\n")
    _one_line_error(lambda: load_config(str(path)), "TEST.FOO")


@pytest.mark.parametrize(
    ("override", "key"),
    [("TRAIN.RPN_BATCHSIZE=abc", "TRAIN.RPN_BATCHSIZE"), ("TRAIN.RPN_BATCHSIZE=1.5", "TRAIN.RPN_BATCHSIZE"),
     ("TRAIN.USE_FLIPPED=3", "TRAIN.USE_FLIPPED"), ("TEST.NMS=[1, 2]", "TEST.NMS"),
     ("TRAIN.SCALES={a: 1}", "TRAIN.SCALES"), ("TRAIN.LEARNING_RATE=true", "TRAIN.LEARNING_RATE"),
     ("BACKBONE=res18", "BACKBONE"), ("POOLING_MODE=avg", "POOLING_MODE"), ("TRAIN=3", "TRAIN"),
     ("TRAIN.FG_FRACTION=0", "FG_FRACTION"), ("PIXEL_MEANS=[1, 2]", "PIXEL_MEANS")],
)
def test_wrong_type_or_value_raises_naming_the_key(override, key):
    _one_line_error(lambda: load_config(None, [override]), key)


def test_override_without_equals_raises():
    _one_line_error(lambda: load_config(None, ["TRAIN.RPN_BATCHSIZE"]), "TRAIN.RPN_BATCHSIZE")


def test_bad_yaml_raises_one_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("TRAIN: [1, 2\n  x: : y\n")
    _one_line_error(lambda: load_config(str(path)), "bad.yml")


def test_yaml_not_a_mapping_and_unknown_preset(tmp_path):
    path = tmp_path / "list.yml"
    path.write_text("- 1\n- 2\n")
    _one_line_error(lambda: load_config(str(path)), "list.yml")
    path = tmp_path / "p.yml"
    path.write_text("PRESET: nope\n")
    _one_line_error(lambda: load_config(str(path)), "nope")


def test_missing_file_and_unknown_preset_name():
    _one_line_error(lambda: load_config("no-such-preset-or-file"), "no-such-preset-or-file")


def test_dict_round_trip():
    cfg = load_config("voc-r50-c4", ["TRAIN.SCALES=[480, 576]", "PRETRAINED=/x/y.pth", "TEST.NMS=0.45"])
    data = config_to_dict(cfg)
    assert data["TRAIN"]["SCALES"] == [480, 576] and isinstance(data["ANCHOR_SCALES"], list)
    assert config_from_dict(data) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_yaml_dump_round_trip(tmp_path):
    cfg = load_config("demo-cpu", ["TRAIN.LEARNING_RATE=0.0003"])
    path = tmp_path / "dump.yml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.BACKBONE = "vgg16"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.TRAIN.RPN_BATCHSIZE = 3  # type: ignore[misc]
    assert isinstance(cfg.TRAIN.SCALES, tuple)


def test_merge_does_not_modify_the_original():
    cfg = Config()
    new = merge(cfg, {"TRAIN": {"RPN_BATCHSIZE": 8}})
    assert cfg.TRAIN.RPN_BATCHSIZE == 256 and new.TRAIN.RPN_BATCHSIZE == 8


def test_presets_are_not_mutated_by_loading(tmp_path):
    before = repr(PRESETS)
    path = tmp_path / "c.yml"
    path.write_text("PRESET: demo-cpu\nTRAIN:\n  BATCH_SIZE: 8\n")
    load_config(str(path))
    load_config("demo-cpu", ["TRAIN.BATCH_SIZE=4"])
    assert repr(PRESETS) == before


@pytest.mark.parametrize("override", ["TRAIN.LEARNING_RATE=.nan", "TRAIN.FG_FRACTION=.inf", "TEST.NMS=nan"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["TRAIN.RPN_SIGMA=0", "TRAIN.RCNN_SIGMA=-1"])
def test_non_positive_smooth_l1_sigma_is_refused(override):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}=.* must be positive$"):
        load_config(None, [override])


@pytest.mark.parametrize("blocks", [-1, 4])
def test_fixed_blocks_out_of_range_is_refused(blocks):
    with pytest.raises(ConfigError, match="FIXED_BLOCKS"):
        load_config(None, [f"RESNET.FIXED_BLOCKS={blocks}"])


@pytest.mark.parametrize("preset,stride", [("voc-r50-c4", 8), ("voc-vgg16", 32), ("demo-cpu", 32), ("demo-cpu", 12)])
def test_feat_stride_the_backbone_cannot_give_is_refused(preset, stride):
    with pytest.raises(ConfigError, match=f"FEAT_STRIDE={stride} is not one of"):
        load_config(preset, [f"FEAT_STRIDE={stride}"])


def test_an_unknown_key_suggests_the_close_ones_else_lists_every_key():
    with pytest.raises(ConfigError, match=r"^unknown config key ANCHOR_COUNT \(did you mean ANCHOR_SCALES or "
                                          r"ANCHOR_RATIOS\?\)$"):
        load_config("demo-cpu", ["ANCHOR_COUNT=9"])
    with pytest.raises(ConfigError, match=r"^unknown config key XYZ \(known: ANCHOR_RATIOS, .*, TRAIN\)$"):
        load_config("demo-cpu", ["XYZ=1"])
