"""frcnn.ops.roi_ops against torchvision's roi_align / roi_pool and the grid_sample crop: forward and backward."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings
from hypothesis import strategies as st

from frcnn.model.pooling import crop_pool_grid_sample, pool_rois
from frcnn.ops import roi_ops

STRIDE = 16


def _rois(g: torch.Generator, n_images: int, h: int, w: int, count: int, dtype=torch.float32) -> torch.Tensor:
    """Random RoIs in input pixels: inside, partly and wholly outside the map, 1-pixel, and the whole map."""
    size = torch.tensor([w, h], dtype=torch.float64) * STRIDE
    centre = (torch.rand(count, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3) * size
    half = torch.exp(torch.rand(count, 2, generator=g, dtype=torch.float64) * 6 - 1) / 2
    boxes = torch.cat((centre - half, centre + half), 1)
    fixed = torch.tensor([[0, 0, w * STRIDE - 1, h * STRIDE - 1],  # the whole map
                          [5, 5, 5, 5], [STRIDE * 2, STRIDE, STRIDE * 2 + 0.5, STRIDE + 0.5],  # tiny
                          [-200, -100, -20, -30], [(w + 3) * STRIDE, 0, (w + 9) * STRIDE, 40],  # outside
                          [-5 * STRIDE, -3 * STRIDE, (w + 4) * STRIDE, (h + 2) * STRIDE]], dtype=torch.float64)
    boxes = torch.cat((boxes, fixed))
    batch = torch.randint(0, n_images, (boxes.shape[0], 1), generator=g).double()
    return torch.cat((batch, boxes), 1).to(dtype)


def _case(seed: int, dtype=torch.float32, n=2, c=5, h=9, w=13, count=30, relu=False):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    if relu:  # zeros everywhere: ties in every max
        features = features.relu()
    return features, _rois(g, n, h, w, count, dtype), torch.randn(count + 6, c, 7, 7, generator=g, dtype=dtype)


def _both(reference, ours, features, grad_out):
    outputs, grads = [], []
    for fn in (reference, ours):
        x = features.clone().requires_grad_()
        out = fn(x)
        out.backward(grad_out)
        outputs.append(out.detach())
        grads.append(x.grad)
    return outputs, grads


MODES = {
    "align": (lambda x, r: tvo.roi_align(x, r, (7, 7), 1 / STRIDE, sampling_ratio=0),
              lambda x, r: roi_ops.roi_align(x, r, 7, 1 / STRIDE)),
    "crop": (lambda x, r: crop_pool_grid_sample(x, r, 7, STRIDE), lambda x, r: roi_ops.crop_pool(x, r, 7, STRIDE)),
    "pool": (lambda x, r: tvo.roi_pool(x, r, (7, 7), 1 / STRIDE), lambda x, r: roi_ops.roi_pool(x, r, 7, 1 / STRIDE)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("relu", [False, True])
def test_forward_and_feature_gradients_match(mode, dtype, relu):
    features, rois, grad_out = _case(0, dtype, relu=relu)
    reference, ours = MODES[mode]
    (want, got), (want_grad, got_grad) = _both(lambda x: reference(x, rois), lambda x: ours(x, rois), features,
                                               grad_out)
    tol = 0 if mode == "pool" else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    # pool gradients: exact with one worker thread; with two, two gradient tables are summed (rounding)
    exact = mode == "pool" and torch.get_num_threads() == 1
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0 if exact else 1e-5)
    assert got.dtype == dtype and got.is_contiguous()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(list(MODES)), h=st.integers(1, 12),
       w=st.integers(1, 12), n=st.integers(1, 3), count=st.integers(1, 12), relu=st.booleans())
def test_random_maps_and_rois(seed, mode, h, w, n, count, relu):
    features, rois, grad_out = _case(seed, torch.float64, n=n, c=3, h=h, w=w, count=count, relu=relu)
    rois = rois.double()
    reference, ours = MODES[mode]
    (want, got), (want_grad, got_grad) = _both(lambda x: reference(x, rois), lambda x: ours(x, rois), features,
                                               grad_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_two_worker_threads_give_the_same_result(mode, monkeypatch):
    features, rois, grad_out = _case(1, count=60)
    _, ours = MODES[mode]
    monkeypatch.setattr(roi_ops, "CHUNK", 4)  # several blocks per worker
    threads = torch.get_num_threads()
    (one, _), (grad_one, _) = _both(lambda x: ours(x, rois), lambda x: ours(x, rois), features, grad_out)
    torch.set_num_threads(2)
    try:
        (two, _), (grad_two, _) = _both(lambda x: ours(x, rois), lambda x: ours(x, rois), features, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(two, one, rtol=0, atol=0)
    torch.testing.assert_close(grad_two, grad_one, rtol=0, atol=1e-5)  # two gradient tables summed


@pytest.mark.parametrize("mode", MODES)
def test_gradients_do_not_depend_on_which_pool_thread_runs_a_worker(mode, monkeypatch):
    """A seeded training run reproduces: on a busy machine one pool thread may run both workers, one after the
    other; the gradient must be the same, bit for bit, as when each has its own thread (gradient tables were
    per pool thread, so the two workers' rows then went into one table in another order)."""
    from concurrent.futures import ThreadPoolExecutor

    features, rois, grad_out = _case(3, c=16, h=6, w=8, count=400)  # small map: RoIs share rows
    _, ours = MODES[mode]
    monkeypatch.setattr(roi_ops, "CHUNK", 2)  # many blocks a worker: many sums whose order could differ
    threads = torch.get_num_threads()
    grads = []
    torch.set_num_threads(2)
    try:
        for pool_threads in (2, 1):  # two workers on two pool threads, then both on one
            monkeypatch.setattr(roi_ops, "_POOL", {2: ThreadPoolExecutor(pool_threads)})
            x = features.clone().requires_grad_()
            ours(x, rois).backward(grad_out)
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("mode", MODES)
def test_two_worker_threads_under_the_callers_inference_mode(mode, monkeypatch):
    """The output is made under the caller's inference_mode; the worker threads must write it in that mode
    too (it is per thread: they failed with 'Inplace update to inference tensor outside InferenceMode')."""
    features, rois, _ = _case(1, count=60)
    reference, ours = MODES[mode]
    monkeypatch.setattr(roi_ops, "CHUNK", 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out = ours(features, rois)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, reference(features, rois), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_features_give_channels_last_crops_with_the_same_values_and_gradients(mode):
    """A channels-last model's tail reads the crops without a conversion; values and gradients as NCHW's."""
    features, rois, grad_out = _case(5, c=6, count=40)
    reference, ours = MODES[mode]
    cl = features.contiguous(memory_format=torch.channels_last)
    (expected, got), (grad_expected, grad_got) = _both(lambda x: reference(x, rois),
                                                       lambda x: ours(x.contiguous(memory_format=torch.channels_last),
                                                                      rois), features, grad_out)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-5)
    out = ours(cl, rois)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert ours(features, rois).is_contiguous()


def test_crop_without_max_pool_and_other_sampling_ratios():
    features, rois, _ = _case(2)
    torch.testing.assert_close(roi_ops.crop_pool(features, rois, 5, STRIDE, max_pool=False),
                               crop_pool_grid_sample(features, rois, 5, STRIDE, max_pool=False), rtol=0, atol=1e-5)
    for ratio in (1, 2, 3):
        torch.testing.assert_close(roi_ops.roi_align(features, rois, 4, 1 / STRIDE, sampling_ratio=ratio),
                                   tvo.roi_align(features, rois, (4, 4), 1 / STRIDE, sampling_ratio=ratio),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_no_rois(mode):
    features = torch.randn(1, 4, 5, 5, requires_grad=True)
    out = MODES[mode][1](features, torch.zeros((0, 5)))
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_pool_rois_dispatches_on_the_cpu(mode):
    features, rois, _ = _case(3)
    reference = MODES[mode][0]
    torch.testing.assert_close(pool_rois(features, rois, mode, 7, STRIDE), reference(features, rois),
                               rtol=0, atol=0 if mode == "pool" else 1e-5)


def test_whole_map_roi_is_large_and_exact():
    # R50-C4-like: many channels, a map of 38x63, RoIs up to the whole map (9 samples per bin)
    g = torch.Generator().manual_seed(4)
    features = torch.randn(1, 64, 38, 63, generator=g)
    rois = torch.tensor([[0.0, 0, 0, 1007, 607], [0, 300, 200, 310, 203], [0, -100, 500, 2000, 700]])
    for mode, (reference, ours) in MODES.items():
        torch.testing.assert_close(ours(features, rois), reference(features, rois), rtol=0,
                                   atol=0 if mode == "pool" else 1e-5)


@pytest.mark.parametrize("mode", ["crop", "align"])
def test_small_pooling_takes_the_gathers_only_when_training(mode, monkeypatch):
    """Below MIN_ROI_CHANNELS (here 36 RoIs x 5 channels) inference keeps torchvision / grid_sample, while features
    that carry a gradient take the gathers (whose backward is the fast one); either way the crops and the gradient
    are the reference's to 1e-5."""
    from frcnn.model import pooling

    calls = []
    for name in ("roi_align", "crop_pool"):
        real = getattr(roi_ops, name)
        monkeypatch.setattr(roi_ops, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    features, rois, grad_out = _case(5)
    assert rois.shape[0] * features.shape[1] < pooling.MIN_ROI_CHANNELS
    with torch.no_grad():
        torch.testing.assert_close(pool_rois(features, rois, mode, 7, STRIDE), MODES[mode][0](features, rois),
                                   rtol=0, atol=1e-5)
    assert calls == []
    reference = features.clone().requires_grad_()
    expected = MODES[mode][0](reference, rois)
    expected.backward(grad_out)
    x = features.clone().requires_grad_()
    out = pool_rois(x, rois, mode, 7, STRIDE)
    out.backward(grad_out)
    assert calls == [1]
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=1e-5)
