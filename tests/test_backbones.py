"""Backbones (frcnn.model.backbones): stride-16 heads, tails, pretrained loading and freezing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.errors import CheckpointError, ConfigError
from frcnn.model.backbones import build_backbone
from frcnn.pretrained import load_state_dict_file


def _cfg(backbone: str, *overrides: str):
    return load_config(None, [f"BACKBONE={backbone}", *overrides])


@pytest.mark.parametrize(
    ("backbone", "head_c", "tail_c"), [("tiny", 128, 512), ("res50", 1024, 2048), ("res101", 1024, 2048)]
)
@torch.no_grad()
def test_head_stride_16_and_tail_size(backbone, head_c, tail_c):
    bb = build_backbone(_cfg(backbone))
    assert (bb.head_channels, bb.tail_channels) == (head_c, tail_c)
    bb.head.eval()
    bb.tail.eval()
    assert bb.head(torch.randn(1, 3, 64, 96)).shape == (1, head_c, 4, 6)
    assert bb.tail(torch.randn(2, head_c, 7, 7)).shape == (2, tail_c)


@pytest.fixture(scope="module")
def vgg_pretrained_structure():
    # the structure of a pretrained VGG16, without reading any file (load_pretrained=False)
    return build_backbone(_cfg("vgg16", "PRETRAINED=/nonexistent/vgg16.pth"), load_pretrained=False)


@torch.no_grad()
def test_vgg16_head_and_tail(vgg_pretrained_structure):
    bb = vgg_pretrained_structure
    assert (bb.head_channels, bb.tail_channels) == (512, 4096)
    bb.tail.eval()
    assert bb.head(torch.randn(1, 3, 64, 96)).shape == (1, 512, 4, 6)
    assert bb.tail(torch.randn(2, 512, 7, 7)).shape == (2, 4096)
    assert not any(isinstance(m, nn.MaxPool2d) for m in list(bb.head)[-2:])  # no pool5


def test_vgg16_pretrained_fixes_conv1_and_conv2(vgg_pretrained_structure):
    head = vgg_pretrained_structure.head
    convs = [m for m in head if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.weight.requires_grad for c in convs] == [False] * 4 + [True] * 9


@torch.no_grad()
def test_res50_layer4_keeps_7x7():
    bb = build_backbone(_cfg("res50"))
    bb.tail.eval()
    layer4 = bb.tail[0]
    assert layer4(torch.randn(1, 1024, 7, 7)).shape == (1, 2048, 7, 7)


def test_from_scratch_everything_trains_with_ordinary_bn():
    bb = build_backbone(_cfg("res50"))
    assert all(p.requires_grad for p in bb.head.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bb.head.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in bb.head.modules())


@pytest.fixture(scope="module")
def r50_state():
    torch.manual_seed(0)
    net = resnet50()
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return net.state_dict()


_RESNET_HEAD = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


def resnet_weights(bb) -> dict[str, torch.Tensor]:
    """The ResNet backbone's head and layer4 tensors under torchvision's names (``head.6.0.conv1.weight`` is
    ``layer3.0.conv1.weight``)."""
    named = {}
    for key, value in bb.head.state_dict().items():
        index, rest = key.split(".", 1)
        named[f"{_RESNET_HEAD[index]}.{rest}"] = value
    for key, value in bb.tail[0].state_dict().items():
        named[f"layer4.{key}"] = value
    return named


def assert_loaded(bb, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the file except the replaced classifier (fc) is in the backbone, equal, and nothing else."""
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    got = resnet_weights(bb)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def save_state(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_res50_pretrained_loading_freezing(tmp_path, r50_state, fmt):
    path = tmp_path / f"r50.{fmt}"
    save_state(r50_state, path)
    assert not torch.equal(resnet_weights(build_backbone(_cfg("res50")))["layer3.5.conv3.weight"],
                           r50_state["layer3.5.conv3.weight"])  # a fresh network differs from the file
    bb = build_backbone(_cfg("res50", f"PRETRAINED={path}", "RESNET.FIXED_BLOCKS=1"))
    assert_loaded(bb, r50_state)  # all 318 tensors, the non-default BN statistics included
    head, layer4 = bb.head, bb.tail[0]
    # BN frozen everywhere
    modules = list(head.modules()) + list(layer4.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in modules) == 53
    # conv1 and layer1 fixed, the rest trains
    assert not any(p.requires_grad for p in head[0].parameters())
    assert not any(p.requires_grad for p in head[4].parameters())
    assert all(p.requires_grad for p in head[5].parameters())
    assert all(p.requires_grad for p in head[6].parameters())
    assert all(p.requires_grad for p in layer4.parameters())


@pytest.mark.parametrize(("blocks", "fixed"), [(0, []), (2, [4, 5]), (3, [4, 5, 6])])
def test_fixed_blocks(blocks, fixed):
    cfg = _cfg("res50", "PRETRAINED=/nonexistent.pth", f"RESNET.FIXED_BLOCKS={blocks}")
    head = build_backbone(cfg, load_pretrained=False).head
    assert not head[0].weight.requires_grad
    for stage in (4, 5, 6):
        assert all(p.requires_grad != (stage in fixed) for p in head[stage].parameters()), stage


def test_pretrained_missing_file_raises():
    with pytest.raises(CheckpointError, match="no such file"):
        build_backbone(_cfg("res50", "PRETRAINED=/nonexistent/r50.pth"))


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.safetensors"])
def test_corrupt_file_raises(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage, not weights" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        build_backbone(_cfg("res50", f"PRETRAINED={path}"))


def test_non_tensor_pickle_raises(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"a": 1, "b": [1, 2]}, path)
    with pytest.raises(CheckpointError):
        load_state_dict_file(path)


def one_line_error(cfg) -> str:
    with pytest.raises(CheckpointError) as info:
        build_backbone(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_wrong_state_dict_raises(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "features.0.weight": torch.zeros(1)}, path)
    message = one_line_error(_cfg("res50", f"PRETRAINED={path}"))
    assert message.startswith(f"PRETRAINED={path}: does not match ResNet (missing [")
    assert "unexpected ['features.0.weight']" in message


@pytest.mark.parametrize(("key", "shape"), [("conv1.weight", (64, 3, 5, 5)), ("layer3.5.bn3.running_var", (512,))])
def test_res50_file_with_a_wrong_shape_is_one_line(tmp_path, r50_state, key, shape):
    state = dict(r50_state)
    state[key] = torch.zeros(shape)
    path = tmp_path / "r50_bad.safetensors"
    save_state(state, path)
    message = one_line_error(_cfg("res50", f"PRETRAINED={path}"))
    assert message.startswith(f"PRETRAINED={path}: does not match ResNet (size mismatch for {key}")


def test_vgg16_weights_for_a_res50_are_one_line(tmp_path, vgg_pretrained_structure):
    path = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in vgg_pretrained_structure.head.state_dict().items()},
              str(path))
    message = one_line_error(_cfg("res50", f"PRETRAINED={path}"))
    assert message.startswith(f"PRETRAINED={path}: does not match ResNet (missing ['conv1.weight'")


def test_nested_state_dict_key_accepted(tmp_path):
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))


def test_res50_with_another_fc_size_loads_everything_but_the_classifier(tmp_path, r50_state):
    # weights trained for 10 classes: the detector replaces fc, so the rest loads as it is
    state = dict(r50_state)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 2048), torch.zeros(10)
    path = tmp_path / "r50_10cls.pth"
    torch.save(state, path)
    assert_loaded(build_backbone(_cfg("res50", f"PRETRAINED={path}")), r50_state)


def test_tiny_pretrained_head_loading(tmp_path):
    src = build_backbone(_cfg("tiny"))
    with torch.no_grad():  # non-default BN statistics, so that loading them is visible
        for m in src.head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "tiny.safetensors"
    save_file(src.head.state_dict(), str(path))
    expected = src.head.state_dict()
    loaded = build_backbone(_cfg("tiny", f"PRETRAINED={path}")).head.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    bad = tmp_path / "bad.pth"
    torch.save({"0.weight": torch.zeros(1)}, bad)
    assert one_line_error(_cfg("tiny", f"PRETRAINED={bad}")) == f"PRETRAINED={bad}: not a tiny-backbone head state dict"


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_tiny_head_has_the_configured_stride(stride):
    bb = build_backbone(_cfg("tiny", f"FEAT_STRIDE={stride}"))
    assert bb.head(torch.zeros(1, 3, 64, 96)).shape == (1, 128, 64 // stride, 96 // stride)


@pytest.mark.parametrize(("stride", "dilations"), [(8, [1, 1, 1, 1, 1, 1, 2]), (4, [1, 1, 1, 1, 2, 2, 4])])
def test_tiny_dilated_convs_dilate_after_each_left_out_stride(stride, dilations):
    convs = [m for m in build_backbone(_cfg("tiny", f"FEAT_STRIDE={stride}", "DILATED=true")).head.modules()
             if isinstance(m, nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == dilations
    assert [c.padding[0] for c in convs] == dilations  # 3x3: padding = dilation keeps the size


@pytest.mark.parametrize("stride", [8, 4])
@torch.no_grad()
def test_tiny_dilated_computes_the_stride_16_features_densely(stride):
    """DeepLab's known answer: the stride-16 network's weights in the dilated stride-8 (4) one give the same
    features, sampled every 8 (4) px instead of 16: the stride-16 map is the dilated map at every 2nd (4th)
    position, from the first."""
    torch.manual_seed(0)
    coarse = build_backbone(_cfg("tiny", "FEAT_STRIDE=16")).head.eval()
    for m in coarse.modules():  # BatchNorm statistics other than 0 / 1, so they take part
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    dense = build_backbone(_cfg("tiny", f"FEAT_STRIDE={stride}", "DILATED=true")).head.eval()
    dense.load_state_dict(coarse.state_dict())
    image = torch.randn(1, 3, 96, 128)
    step = 16 // stride
    expected = coarse(image)
    got = dense(image)
    assert got.shape[-2:] == (96 // stride, 128 // stride)
    torch.testing.assert_close(got[..., ::step, ::step], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[..., 1::step, 1::step], expected, atol=1e-2)  # the positions between are new


@pytest.mark.parametrize("overrides", [["BACKBONE=tiny", "FEAT_STRIDE=16"], ["BACKBONE=res50"]])
def test_dilated_outside_a_tiny_backbone_below_stride_16_is_one_line(overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*overrides, "DILATED=true"])
    assert str(info.value).startswith("DILATED=true is for BACKBONE=tiny at FEAT_STRIDE 8 or 4")
    assert "\n" not in str(info.value)


def test_a_run_saved_before_dilated_existed_rebuilds_undilated():
    """scratch-cpu dilates now; a run's config.yaml written before (no DILATED key) must rebuild the network it
    trained: the weights have the same shapes either way, so nothing else would catch it."""
    from frcnn.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config("scratch-cpu"))
    assert saved.pop("DILATED") is True
    convs = [m for m in build_backbone(config_from_dict(saved)).head.modules() if isinstance(m, nn.Conv2d)]
    assert {c.dilation for c in convs} == {(1, 1)}


@pytest.mark.parametrize(("dilated", "field"), [(False, 71), (True, 87)])
def test_tiny_receptive_field_at_stride_8(dilated, field):
    """By hand: 3x3 convs at jumps 1, 2, 4, 4, 8, 8, 8 grow the field 3, 7, 15, 23, 39, 55, 71; dilating the last
    (2 x its jump of 8) makes the last step 32 instead of 16: 87, the stride-16 network's (its last conv at jump 16)."""
    head = build_backbone(_cfg("tiny", "FEAT_STRIDE=8", f"DILATED={dilated}")).head.eval()
    for m in head.modules():  # positive weights and input: no ReLU cuts the gradient, so it reaches the whole field
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.01)
    image = torch.ones(1, 3, 160, 160, requires_grad=True)
    head(image)[0, :, 10, 10].sum().backward()
    reached = (image.grad[0].abs().sum((0, 1)) > 0).nonzero().flatten()
    assert int(reached[-1] - reached[0] + 1) == field


@torch.no_grad()
def test_tiny_widths_set_each_stage_the_rpn_and_the_tail():
    """TINY_WIDTHS [16, 24, 40, 56]: the convs' channels stage by stage (one conv in the first stage, two in the
    others), the head's map, the RPN's input and the tail's first layer (56 x 7 x 7 inputs) follow the last."""
    from frcnn.model.detector import FasterRCNN

    cfg = load_config("scratch-cpu", ["TINY_WIDTHS=[16,24,40,56]", "ANCHOR_SCALES=[2,4,8]"])
    bb = build_backbone(cfg)
    convs = [m for m in bb.head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 24), (24, 24), (24, 40), (40, 40),
                                                                (40, 56), (56, 56)]
    assert bb.head_channels == 56
    assert bb.tail[1].in_features == 56 * 7 * 7
    assert bb.head.eval()(torch.zeros(1, 3, 64, 96)).shape == (1, 56, 8, 12)
    model = FasterRCNN(cfg, num_classes=4)
    assert model.rpn.rpn_net.in_channels == 56


def test_tiny_widths_default_is_the_network_runs_were_saved_with():
    from frcnn.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config("scratch-cpu"))
    assert list(saved.pop("TINY_WIDTHS")) == [32, 64, 128, 128]  # a config.yaml written before the key
    convs = [m for m in build_backbone(config_from_dict(saved)).head.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 128, 128, 128, 128]


@pytest.mark.parametrize(("overrides", "message"), [
    (["TINY_WIDTHS=[32,64,128]"], "TINY_WIDTHS=[32, 64, 128] needs 4 channel counts >= 1 (one a stage)"),
    (["TINY_WIDTHS=[32,64,0,128]"], "TINY_WIDTHS=[32, 64, 0, 128] needs 4 channel counts >= 1 (one a stage)"),
    (["BACKBONE=res50", "TINY_WIDTHS=[32,64,128,256]"],
     "TINY_WIDTHS is for BACKBONE=tiny (BACKBONE=res50 has its own widths)"),
    (["BACKBONE=tiny", "NORM=group", "TINY_WIDTHS=[32,64,128,200]"],
     "NORM=group needs TINY_WIDTHS in multiples of 16 (groups of 16 channels), got [32, 64, 128, 200]"),
])
def test_bad_tiny_widths_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


@torch.no_grad()
def test_tiny_widths_reach_the_pyramid():
    """With NECK=fpn the lateral 1x1 convs read the tapped stages' widths (stride 4: the second stage, 8: the
    last at FEAT_STRIDE 8)."""
    bb = build_backbone(_cfg("tiny", "NECK=fpn", "FEAT_STRIDE=8", "FPN_CHANNELS=32", "TINY_WIDTHS=[16,24,40,56]"))
    laterals = [m for m in bb.head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert sorted(c.in_channels for c in laterals) == [24, 56]
    maps = bb.head.eval()(torch.zeros(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps][:2] == [(1, 32, 16, 24), (1, 32, 8, 12)]


def test_tail_dropout_drops_after_each_fully_connected_layer_in_training_only():
    """TAIL_DROPOUT 0.5: in training each ReLU's output is either 0 or twice itself (kept and scaled by
    1 / (1 - p)), about half of them 0; in eval the tail is the plain one with the same weights, and the weights
    keep their names (1.*, 3.*: what the torchvision FPN mapping and saved runs use)."""
    plain = build_backbone(_cfg("tiny", "FEAT_STRIDE=8")).tail
    dropped = build_backbone(_cfg("tiny", "FEAT_STRIDE=8", "TAIL_DROPOUT=0.5")).tail
    assert list(dropped.state_dict()) == list(plain.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(64, 128, 7, 7)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain.eval()(x))
        dropped.train()
        torch.manual_seed(0)
        fc6 = torch.relu(x.flatten(1) @ plain[1].weight.T + plain[1].bias)  # by hand, from the plain tail's weights
        seen = []
        dropped[2][1].register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
        dropped[4][1].register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
        out = dropped(x)
    (in6, out6), (in7, out7) = seen
    torch.testing.assert_close(in6, fc6)
    torch.testing.assert_close(in7, torch.relu(out6 @ plain[3].weight.T + plain[3].bias))
    assert torch.equal(out, out7)
    for before, after in seen:
        kept = after != 0
        torch.testing.assert_close(after[kept], 2 * before[kept])
        share = 1 - kept[before > 0].float().mean().item()
        assert 0.45 < share < 0.55  # of the positive outputs, the dropped share is p


def test_tail_dropout_default_is_none():
    from frcnn.config import config_from_dict, config_to_dict

    saved = config_to_dict(load_config("scratch-cpu"))
    assert saved.pop("TAIL_DROPOUT") == 0  # a config.yaml written before the key
    tail = build_backbone(config_from_dict(saved)).tail
    assert not any(isinstance(m, nn.Dropout) for m in tail.modules())


@pytest.mark.parametrize(("overrides", "message"), [
    (["BACKBONE=tiny", "TAIL_DROPOUT=1"], "TAIL_DROPOUT=1.0 must be in [0, 1) (the fraction of a layer's outputs "
     "dropped)"),
    (["BACKBONE=tiny", "TAIL_DROPOUT=-0.1"], "TAIL_DROPOUT=-0.1 must be in [0, 1) (the fraction of a layer's outputs "
     "dropped)"),
    (["BACKBONE=res50", "TAIL_DROPOUT=0.5"], "TAIL_DROPOUT is for the fully connected box heads (BACKBONE=tiny, or "
     "NECK=fpn); BACKBONE=res50 with NECK=none has a convolutional one"),
    (["BACKBONE=vgg16", "TAIL_DROPOUT=0.5"], "TAIL_DROPOUT is for the fully connected box heads (BACKBONE=tiny, or "
     "NECK=fpn); BACKBONE=vgg16 with NECK=none has its own (0.5)"),
])
def test_bad_tail_dropout_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value) == message


def test_tail_dropout_in_the_fpn_head():
    tail = build_backbone(_cfg("res50", "NECK=fpn", "FEAT_STRIDE=32", "TAIL_DROPOUT=0.3"), load_pretrained=False).tail
    assert [m.p for m in tail.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert list(tail.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
