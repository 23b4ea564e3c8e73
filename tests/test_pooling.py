"""RoI pooling (frcnn.model.pooling): crop pooling's sampling points, batches, modes, gradients."""

from __future__ import annotations

import pytest
import torch

from frcnn.model.pooling import crop_pool, pool_rois


def _index_map(axis: str, n: int = 1, size: int = 5, offset: float = 0.0) -> torch.Tensor:
    idx = torch.arange(size, dtype=torch.float32)
    grid = idx.view(1, size).expand(size, size) if axis == "x" else idx.view(size, 1).expand(size, size)
    return torch.stack([grid + offset + 100 * i for i in range(n)]).unsqueeze(1).contiguous()  # (n, 1, 5, 5)


ROI = torch.tensor([[0.0, 16, 16, 48, 48]])  # feature cells 1..3 at stride 16


def test_crop_samples_roi_corners_in_x():
    out = crop_pool(_index_map("x"), ROI, size=3, stride=16, max_pool=False)
    assert out.shape == (1, 1, 3, 3)
    # align_corners=True: x = 1, 2, 3. (align_corners=False would give 1.1667, 2, 2.8333.)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2, 3]] * 3), rtol=0, atol=1e-5)


def test_crop_samples_roi_corners_in_y():
    out = crop_pool(_index_map("y"), ROI, size=3, stride=16, max_pool=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2, 3]] * 3).T, rtol=0, atol=1e-5)


def test_crop_with_max_pool_samples_twice_the_size_then_pools():
    # 6 samples over x = 1..3: 1, 1.4, 1.8, 2.2, 2.6, 3; 2x2 max pooling keeps 1.4, 2.2, 3
    out = crop_pool(_index_map("x"), ROI, size=3, stride=16, max_pool=True)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.4, 2.2, 3.0]] * 3), rtol=0, atol=1e-5)


def test_crop_non_square_roi_and_map():
    features = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).expand(1, 1, 4, 6).contiguous()
    roi = torch.tensor([[0.0, 0, 16, 80, 32]])  # x 0..5, y 1..2
    out = crop_pool(features, roi, size=6, stride=16, max_pool=False)
    torch.testing.assert_close(out[0, 0], torch.arange(6.0).expand(6, 6), rtol=0, atol=1e-5)


def test_each_roi_reads_its_own_image():
    features = _index_map("x", n=2)  # image 1 = image 0 + 100
    rois = torch.tensor([[1.0, 16, 16, 48, 48], [0.0, 16, 16, 48, 48], [1.0, 0, 0, 64, 64]])
    out = crop_pool(features, rois, size=3, stride=16, max_pool=False)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([101.0, 102, 103]), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([1.0, 2, 3]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2, 0, 0], torch.tensor([100.0, 102, 104]), rtol=0, atol=1e-4)


def test_multi_channel_crops_keep_channels_apart():
    features = torch.cat((_index_map("x"), _index_map("y"), _index_map("x") * 10), dim=1)  # (1, 3, 5, 5)
    out = crop_pool(features, ROI.repeat(2, 1), size=3, stride=16, max_pool=False)
    assert out.shape == (2, 3, 3, 3)
    torch.testing.assert_close(out[1, 0, 0], torch.tensor([1.0, 2, 3]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 1, :, 0], torch.tensor([1.0, 2, 3]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 2, 0], torch.tensor([10.0, 20, 30]), rtol=0, atol=1e-4)


def test_align_mode_averages_bins():
    # roi_align (aligned=False) of a linear map: each bin's mean is the value at the bin centre, 1 + (k + 0.5) * 2/3
    out = pool_rois(_index_map("x"), ROI, "align", 3, 16)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([4 / 3, 2.0, 8 / 3]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_output_shapes(mode):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 10, 12, generator=g)
    rois = torch.tensor([[0.0, 0, 0, 50, 60], [1.0, 30, 20, 150, 140], [1.0, 5, 5, 190, 150], [0.0, 10, 10, 11, 11]])
    out = pool_rois(features, rois, mode, 7, 16)
    assert out.shape == (4, 8, 7, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["align", "pool"])
def test_no_rois(mode):
    assert pool_rois(torch.randn(1, 4, 5, 5), torch.zeros((0, 5)), mode, 7, 16).shape == (0, 4, 7, 7)


def test_crop_no_rois():
    assert pool_rois(torch.randn(1, 4, 5, 5), torch.zeros((0, 5)), "crop", 7, 16).shape == (0, 4, 7, 7)


def test_crop_on_one_cell_high_feature_map_is_finite():
    features = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6)
    out = crop_pool(features, torch.tensor([[0.0, 16, 0, 48, 10]]), size=3, stride=16, max_pool=False)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2, 3]] * 3), rtol=0, atol=1e-5)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="POOLING_MODE"):
        pool_rois(torch.randn(1, 4, 5, 5), ROI, "bogus", 7, 16)


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_gradient_flows_to_features_inside_the_roi_only(mode):
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.tensor([[1.0, 16, 16, 48, 48]], requires_grad=mode == "crop")
    pool_rois(features, rois, mode, 7, 16).sum().backward()
    grad = features.grad
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0  # the other image gets nothing
    assert grad[1, :, 5:, :].abs().sum() == 0 and grad[1, :, :, 5:].abs().sum() == 0  # far from the RoI
