"""Training loop: schedule, resumption equal to an uninterrupted run, refusal to overwrite, NaN stop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_overfit import TinySet

from frcnn.config import load_config
from frcnn.engine.batches import TrainBatches, iteration_seed
from frcnn.engine.checkpoint import read_checkpoint
from frcnn.engine.train import TrainingError, build_optimizer, epoch_schedule, learning_rate, train
from frcnn.errors import ConfigError
from frcnn.model.detector import FasterRCNN

FAST = ["TRAIN.SCALES=[96]", "TEST.SCALES=[96]", "TRAIN.DISPLAY=2", "TRAIN.WARMUP_ITERS=3", "DEVICE=cpu",
        "TRAIN.STEPSIZE=[5]", "TRAIN.LEARNING_RATE=0.01", "TRAIN.AMP=none"]  # float32 (demo-cpu's auto may be bf16)


def _cfg(*extra: str):
    return load_config("demo-cpu", FAST + list(extra))


def test_learning_rate_schedule():
    cfg = load_config(None, ["TRAIN.LEARNING_RATE=0.1", "TRAIN.STEPSIZE=[10, 20]", "TRAIN.WARMUP_ITERS=4",
                             "TRAIN.WARMUP_FACTOR=0.25"])
    assert learning_rate(cfg.TRAIN, 0) == pytest.approx(0.025)
    assert learning_rate(cfg.TRAIN, 2) == pytest.approx(0.1 * (0.25 * 0.5 + 0.5))
    assert learning_rate(cfg.TRAIN, 4) == pytest.approx(0.1)
    assert learning_rate(cfg.TRAIN, 10) == pytest.approx(0.01)
    assert learning_rate(cfg.TRAIN, 25) == pytest.approx(0.001)


def test_batches_visit_every_image_and_flip_once_per_epoch():
    cfg = _cfg()
    batches = TrainBatches(TinySet(), cfg)
    epoch = [batches.entries(i)[0] for i in range(8)]
    assert sorted(epoch) == sorted((i, f) for i in range(4) for f in (False, True))
    assert batches.entries(3) == TrainBatches(TinySet(), cfg).entries(3)  # a pure function of (seed, it)
    assert iteration_seed(3, 5) != iteration_seed(3, 6) != iteration_seed(4, 5)


def test_flipped_batch_mirrors_the_boxes():
    cfg = _cfg("TRAIN.SCALES=[160]")
    batches = TrainBatches(TinySet(), cfg)
    it = next(i for i in range(8) if batches.entries(i)[0] == (1, True))
    batch = batches[it]
    # image 1 has one circle at x 12..75 in a 160 px image: mirrored it spans 84..147
    assert batch.gt_boxes[0].tolist() == [[84.0, 70.0, 147.0, 133.0]]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    data = TinySet()
    train(_cfg("TRAIN.MAX_ITERS=8", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "full", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=4", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "part", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=8", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "part", resume=True,
          progress=False)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    part = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert full.keys() == part.keys()
    for key in full:
        assert torch.equal(full[key], part[key]), key
    assert read_checkpoint(tmp_path / "part").iteration == 8
    log = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4, 6, 8]
    expected = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["total"] for r in log] == pytest.approx([r["total"] for r in expected])


def test_training_refuses_a_non_empty_folder_and_a_resume_without_snapshot(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not empty"):
        train(_cfg("TRAIN.MAX_ITERS=1"), TinySet(), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(TrainingError, match="no snapshot"):
        train(_cfg("TRAIN.MAX_ITERS=1"), TinySet(), tmp_path / "empty", resume=True, progress=False)


def test_a_non_finite_loss_stops_with_iteration_and_images(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration \d+ .* on images \['img"):
        train(_cfg("TRAIN.MAX_ITERS=6", "TRAIN.LEARNING_RATE=1e30", "TRAIN.WARMUP_ITERS=0"), TinySet(),
              tmp_path / "run", progress=False)


def test_scientific_notation_in_overrides_is_a_number():
    # YAML 1.1 alone reads "1e-3" as a string; users type it all the time
    assert load_config(None, ["TRAIN.LEARNING_RATE=1e-3"]).TRAIN.LEARNING_RATE == pytest.approx(0.001)
    assert load_config(None, ["PRETRAINED=1e3"]).PRETRAINED == "1e3"
    assert load_config(None, ["TRAIN.STEPSIZE=[1e3, 2e3]"]).TRAIN.STEPSIZE == (1000, 2000)


# ------------------------------------------------------------------------- optimizer: groups, rates, schedule

def _param_names(model, pred) -> set[str]:
    return {n for n, p in model.named_parameters() if pred(n, p)}


def _group_names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


@pytest.mark.parametrize("double_bias, bias_decay", [(True, False), (False, False), (True, True), (False, True)])
def test_parameter_groups_double_bias_and_bias_decay(double_bias, bias_decay):
    cfg = _cfg(f"TRAIN.DOUBLE_BIAS={str(double_bias).lower()}", f"TRAIN.BIAS_DECAY={str(bias_decay).lower()}",
               "TRAIN.WEIGHT_DECAY=0.0005", "TRAIN.MOMENTUM=0.8")
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 2)
    for p in model.head[0].parameters():  # frozen parameters (as fixed blocks are) never reach the optimizer
        p.requires_grad_(False)
    frozen = _param_names(model, lambda n, p: not p.requires_grad)
    assert frozen == {"head.0.weight"}
    optimizer = build_optimizer(model, cfg.TRAIN)
    weights, biases = optimizer.param_groups
    assert _group_names(model, weights) == _param_names(model, lambda n, p: p.requires_grad and not _is_bias(n))
    assert _group_names(model, biases) == _param_names(model, lambda n, p: p.requires_grad and _is_bias(n))
    assert "rpn.rpn_net.bias" in _group_names(model, biases) and "head.1.bias" in _group_names(model, biases)
    assert len(weights["params"]) + len(biases["params"]) == len(list(model.parameters())) - 1
    assert weights["weight_decay"] == 0.0005 and weights["lr_mult"] == 1.0
    assert biases["weight_decay"] == (0.0005 if bias_decay else 0.0)
    assert biases["lr_mult"] == (2.0 if double_bias else 1.0)
    assert all(g["momentum"] == 0.8 for g in optimizer.param_groups)


def test_optimizer_is_fused_and_steps_as_sgd_with_momentum_written_out():
    """Three steps of the (fused, on a CPU) optimizer against ``buf = m * buf + grad + decay * p; p -= lr * mult * buf``
    with given gradients, for a weight (decayed) and a bias (doubled rate, not decayed)."""
    lr, decay, m = 0.1, 0.01, 0.9
    cfg = _cfg(f"TRAIN.LEARNING_RATE={lr}", f"TRAIN.WEIGHT_DECAY={decay}", f"TRAIN.MOMENTUM={m}")
    layer = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(layer, cfg.TRAIN)
    assert optimizer.defaults["fused"]
    for group in optimizer.param_groups:  # as train() does each iteration
        group["lr"] = lr * group["lr_mult"]
    generator = torch.Generator().manual_seed(0)
    expected = {n: p.detach().clone() for n, p in layer.named_parameters()}
    buffers = {n: torch.zeros_like(p) for n, p in expected.items()}
    for step in range(3):
        for name, p in layer.named_parameters():
            p.grad = torch.randn(p.shape, generator=generator)
            bias = name == "bias"
            d_p = p.grad + (0.0 if bias else decay) * expected[name]
            buffers[name] = d_p if step == 0 else m * buffers[name] + d_p
            expected[name] = expected[name] - lr * (2.0 if bias else 1.0) * buffers[name]
        optimizer.step()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-6, atol=1e-7)


def test_first_training_step_moves_weights_and_biases_by_their_own_rates(tmp_path):
    """One iteration of ``train`` against SGD written out: ``p - lr * mult * (grad + decay * p)`` (the first
    momentum buffer is the gradient itself), with the gradient of the same batch computed here."""
    lr, decay = 0.02, 0.05
    cfg = _cfg("TRAIN.MAX_ITERS=1", "TRAIN.SNAPSHOT_ITERS=1", "TRAIN.DISPLAY=1", "TRAIN.WARMUP_ITERS=0",
               f"TRAIN.LEARNING_RATE={lr}", f"TRAIN.WEIGHT_DECAY={decay}")
    assert cfg.TRAIN.DOUBLE_BIAS and not cfg.TRAIN.BIAS_DECAY
    data = TinySet()
    train(cfg, data, tmp_path / "run", progress=False)
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == pytest.approx(lr)

    torch.manual_seed(cfg.RNG_SEED)  # the model train() builds, and its first batch
    model = FasterRCNN(cfg, len(data.classes)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = TrainBatches(data, cfg)[0]
    torch.manual_seed(batch.seed)
    losses = model(batch.images, batch.image_sizes, batch.gt_boxes, batch.gt_labels, generator=batch.generators())
    sum(losses.values()).backward()

    def update(name: str, p: torch.Tensor, mult: float, wd: float) -> torch.Tensor:
        return -lr * mult * (p.grad + wd * before[name])

    checked = {"bias": 0, "weight": 0}
    for name, p in model.named_parameters():
        moved = after[name] - before[name]
        bias = _is_bias(name)
        expected = update(name, p, 2.0 if bias else 1.0, 0.0 if bias else decay)
        wrong = update(name, p, 1.0 if bias else 2.0, decay if bias else 0.0)  # the other group's rule
        scale = float(expected.norm())
        assert scale > 0, name
        assert float((moved - expected).norm()) <= 1e-3 * scale + 1e-6, name
        if float((wrong - expected).norm()) > 0.1 * scale:
            assert float((moved - wrong).norm()) > 0.05 * scale, name
            checked["bias" if bias else "weight"] += 1
    assert checked["bias"] > 5 and checked["weight"] > 5  # the rules tell the groups apart on many tensors


def test_learning_rate_known_answers():
    t = load_config(None, ["TRAIN.LEARNING_RATE=0.001", "TRAIN.STEPSIZE=[10, 20]", "TRAIN.GAMMA=0.5"]).TRAIN
    assert t.WARMUP_ITERS == 0
    # the step takes effect at the iteration equal to STEPSIZE, not one later
    assert [learning_rate(t, i) for i in (0, 9, 10, 19, 20, 10**6)] == pytest.approx(
        [0.001, 0.001, 0.0005, 0.0005, 0.00025, 0.00025])
    # linear scaling: world_size times the rate; "none" ignores the number of processes
    lin = load_config(None, ["TRAIN.LEARNING_RATE=0.001", "TRAIN.STEPSIZE=[10]", "TRAIN.LR_SCALING=linear"]).TRAIN
    assert learning_rate(lin, 0, world_size=4) == pytest.approx(0.004)
    assert learning_rate(lin, 10, world_size=4) == pytest.approx(0.0004)
    assert learning_rate(t, 0, world_size=4) == pytest.approx(0.001)
    # warm-up: linear from WARMUP_FACTOR x the rate to the rate, on top of steps and scaling
    w = load_config(None, ["TRAIN.LEARNING_RATE=0.01", "TRAIN.STEPSIZE=[3]", "TRAIN.WARMUP_ITERS=5",
                           "TRAIN.WARMUP_FACTOR=0.2", "TRAIN.LR_SCALING=linear"]).TRAIN
    assert [learning_rate(w, i, world_size=2) for i in range(7)] == pytest.approx(
        [0.02 * 0.2, 0.02 * 0.36, 0.02 * 0.52, 0.002 * 0.68, 0.002 * 0.84, 0.002, 0.002])


def test_cosine_learning_rate_known_answers():
    """LR_SCHEDULE=cosine: 0.01 x (1 + cos(pi t / 100)) / 2, i.e. 0.01, 0.0085355 (t = 25: (1 + 1/sqrt 2) / 2), 0.005,
    0.0014645, 0 at MAX_ITERS and after; STEPSIZE and GAMMA play no part; warm-up and linear scaling multiply it."""
    t = load_config(None, ["TRAIN.LEARNING_RATE=0.01", "TRAIN.MAX_ITERS=100", "TRAIN.STEPSIZE=[10]",
                           "TRAIN.LR_SCHEDULE=cosine"]).TRAIN
    assert [learning_rate(t, i) for i in (0, 25, 50, 75, 100, 150)] == pytest.approx(
        [0.01, 0.0085355339, 0.005, 0.0014644661, 0.0, 0.0], abs=1e-10)
    w = load_config(None, ["TRAIN.LEARNING_RATE=0.01", "TRAIN.MAX_ITERS=100", "TRAIN.LR_SCHEDULE=cosine",
                           "TRAIN.WARMUP_ITERS=50", "TRAIN.WARMUP_FACTOR=0.2", "TRAIN.LR_SCALING=linear"]).TRAIN
    assert learning_rate(w, 25, world_size=2) == pytest.approx(0.02 * 0.8535533906 * 0.6)
    with pytest.raises(ConfigError, match="TRAIN.LR_SCHEDULE"):
        load_config(None, ["TRAIN.LR_SCHEDULE=poly"])


def test_cosine_schedule_line_says_so():
    t = load_config(None, ["TRAIN.MAX_EPOCHS=2", "TRAIN.STEP_EPOCHS=[1]", "TRAIN.LR_SCHEDULE=cosine"]).TRAIN
    assert epoch_schedule(t, 10).line() == ("schedule: 2 epochs of 20 images (10 + mirrored), 1 image an iteration = "
                                            "40 iterations, cosine LR to 0 (TRAIN.STEP_EPOCHS unused)")


def test_memory_format_sets_the_training_layout_not_the_weights(tmp_path):
    """MEMORY_FORMAT=channels_last trains with channels-last convolution weights, contiguous with contiguous
    ones; after an iteration the weights agree to float rounding, and the checkpoint loads either way."""
    runs = {}
    for fmt in ("channels_last", "contiguous"):
        cfg = _cfg("TRAIN.MAX_ITERS=1", "TRAIN.SNAPSHOT_ITERS=1", "TRAIN.WARMUP_ITERS=0", f"MEMORY_FORMAT={fmt}")
        model = train(cfg, TinySet(), tmp_path / fmt, progress=False)
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
                             and w.is_contiguous() == (fmt == "contiguous") for w in convs), fmt
        runs[fmt] = load_file(str(tmp_path / fmt / "model.safetensors"))
        assert read_checkpoint(tmp_path / fmt).iteration == 1
    a, b = runs.values()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two layouts did run: oneDNN rounds them differently
