"""Damaged checkpoints: one small real run, copies of it damaged one way each (a file cut short, emptied or
garbled; meta.json or config.yaml of the wrong form; weights or momentum buffers that do not fit), and every
command that reads checkpoints (eval, detect, explain, train --resume, report) ends with exit code 2 and one
line on stderr naming the damaged file and what is wrong with it, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import test_cli
import torch
from safetensors.torch import load_file, save_file

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.engine.checkpoint import (
    latest_snapshot,
    load_momentum,
    read_checkpoint,
    read_config,
    snapshot_folders,
)
from frcnn.engine.train import build_optimizer
from frcnn.errors import CheckpointError
from frcnn.model.detector import FasterRCNN

voc, run = test_cli.voc, test_cli.run  # the fixtures: a tiny VOC set and a run of 4 iterations on it (TINY)
LATEST = Path("snapshots") / "iter_0000004"  # TINY: a snapshot every 2 iterations


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- the damage

def _replace(path: Path, data: bytes) -> None:
    """Write a new file in place of ``path`` (the copies share nothing with the run, but safetensors maps
    files: never truncate one that may be mapped)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        loaded = {k: v.clone() for k, v in load_file(str(path)).items()}
        change(loaded)
        save_file(loaded, str(path.with_name(path.name + ".new")))
        os.replace(path.with_name(path.name + ".new"), path)
    return damage


def cut(fraction: float) -> Callable[[Path], None]:
    return lambda path: _replace(path, path.read_bytes()[: int(path.stat().st_size * fraction)])


def garble_header(path: Path) -> None:  # the 8-byte length is intact, the JSON header after it is not
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    _replace(path, bytes(data))


def meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        m = json.loads(path.read_text())
        m = change(m) or m
        path.write_text(json.dumps(m))
    return damage


def text(change: Callable[[str], str]) -> Callable[[Path], None]:
    return lambda path: path.write_text(change(path.read_text()))


def drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def fewer_classes(t: dict[str, torch.Tensor]) -> None:  # what a 3-class run saves (4 classes + background)
    t["classifier.cls_score_net.weight"] = t["classifier.cls_score_net.weight"][:4].clone()
    t["classifier.cls_score_net.bias"] = t["classifier.cls_score_net.bias"][:4].clone()
    t["classifier.bbox_pred_net.weight"] = t["classifier.bbox_pred_net.weight"][:16].clone()
    t["classifier.bbox_pred_net.bias"] = t["classifier.bbox_pred_net.bias"][:16].clone()


def set_nan(key: str) -> Callable[[dict], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[key].view(-1)[0] = float("nan")
    return change


RPN = "rpn.rpn_net.weight"

# (id, file damaged, file the line names, damage, what the line says)
CASES = [
    ("weights-empty", "model.safetensors", None, lambda p: _replace(p, b""), r"empty file \(0 bytes\)"),
    ("weights-truncated", "model.safetensors", None, cut(0.5), r"not a valid safetensors file .*truncated"),
    ("weights-8-bytes", "model.safetensors", None, lambda p: _replace(p, p.read_bytes()[:8]),
     r"\(8 bytes, header: .*truncated"),
    ("weights-header-garbage", "model.safetensors", None, garble_header, r"invalid JSON in header.*corrupted"),
    ("weights-header-length", "model.safetensors", None, lambda p: _replace(p, b"\xff" * 8 + p.read_bytes()[8:]),
     r"header too large"),
    ("weights-trailing-junk", "model.safetensors", None, lambda p: _replace(p, p.read_bytes() + b"junk"),
     r"not a valid safetensors file"),
    ("weights-missing-key", "model.safetensors", None, tensors(drop("rpn.rpn_cls_score_net.bias")),
     r"missing rpn\.rpn_cls_score_net\.bias"),
    ("weights-extra-key", "model.safetensors", None,
     tensors(lambda t: t.update({"head.extra.weight": torch.zeros(3)})), r"unexpected head\.extra\.weight"),
    ("weights-wrong-shape", "model.safetensors", None,
     tensors(lambda t: t.update({RPN: t[RPN][:, :64].clone()})),
     r"rpn\.rpn_net\.weight is \[128, 64, 3, 3\] in the file, the model needs \[128, 128, 3, 3\]"),
    ("weights-other-class-count", "model.safetensors", None, tensors(fewer_classes),
     r"classifier\.cls_score_net\.weight is \[4, 512\] .* needs \[5, 512\]: weights for 3 classes, the model has 4"),
    ("weights-nan", "model.safetensors", None, tensors(set_nan(RPN)), r"rpn\.rpn_net\.weight holds NaN"),
    ("weights-integers", "model.safetensors", None, tensors(lambda t: t.update({RPN: t[RPN].to(torch.int32)})),
     r"rpn\.rpn_net\.weight is torch\.int32"),
    ("weights-pickle", "model.safetensors", None, lambda p: _replace(p, b"\x80\x04K\x01."),
     r"is a Python pickle"),
    ("meta-empty", "meta.json", None, lambda p: p.write_text(""), r"not valid JSON"),
    ("meta-truncated", "meta.json", None, cut(0.5), r"not valid JSON .*truncated"),
    ("meta-not-utf8", "meta.json", None, lambda p: p.write_bytes(b'{"format": "\xff"}'), r"not UTF-8"),
    ("meta-a-list", "meta.json", None, lambda p: p.write_text("[1, 2]"), r"expected a JSON object, got a list"),
    ("meta-classes-numbers", "meta.json", None, meta(lambda m: m.update(classes=[1, 2, 3, 4])),
     r"classes must be a non-empty list of class names \(strings\), got \[1, 2, 3, 4\]"),
    ("meta-classes-a-string", "meta.json", None, meta(lambda m: m.update(classes="circle")),
     r"classes must be .*got 'circle'"),
    ("meta-classes-empty", "meta.json", None, meta(lambda m: m.update(classes=[])), r"classes must be"),
    ("meta-classes-repeated", "meta.json", None,
     meta(lambda m: m.update(classes=["circle", "square", "circle", "triangle"])), r"'circle' is listed 2 times"),
    ("meta-more-classes", "meta.json", "model.safetensors",
     meta(lambda m: m.update(classes=[*m["classes"], "hexagon"])),
     r"and meta\.json \(5 classes\): .*weights for 4 classes, the model has 5"),
    ("meta-iteration-negative", "meta.json", None, meta(lambda m: m.update(iteration=-3)),
     r"iteration must be a whole number >= 0, got -3"),
    ("meta-iteration-string", "meta.json", None, meta(lambda m: m.update(iteration="4")), r"iteration .* got '4'"),
    ("meta-iteration-fraction", "meta.json", None, meta(lambda m: m.update(iteration=2.5)), r"iteration .* 2\.5"),
    ("meta-iteration-missing", "meta.json", None, meta(lambda m: m.pop("iteration") and m),
     r"iteration .* got nothing"),
    ("meta-format", "meta.json", None, meta(lambda m: m.update(format="other-tool")), r"not a frcnn checkpoint"),
    ("meta-world-size", "meta.json", None, meta(lambda m: m.update(world_size=0)), r"world_size .* got 0"),
    ("meta-grad-scaler", "meta.json", None, meta(lambda m: m.update(grad_scaler=[1.0])),
     r"grad_scaler must be an object, got a list"),
    ("meta-grad-scaler-keys", "meta.json", None, meta(lambda m: m.update(grad_scaler={"scale": 2.0})),
     r"grad_scaler needs a finite number for growth_factor"),
    ("config-empty", "config.yaml", None, lambda p: p.write_text(""), r"empty file"),
    ("config-not-yaml", "config.yaml", None, text(lambda t: t + "TRAIN: [\n"), r"not valid YAML \(.* line \d+"),
    ("config-not-utf8", "config.yaml", None, lambda p: p.write_bytes(b"TRAIN:\n  AMP: \xff\n"), r"not UTF-8"),
    ("config-a-list", "config.yaml", None, lambda p: p.write_text("- TRAIN\n- TEST\n"),
     r"expected a mapping of config keys, got a list"),
    ("config-unknown-key", "config.yaml", None, text(lambda t: t + "ANCHOR_COUNT: 9\n"),
     r"unknown config key ANCHOR_COUNT"),
    ("config-wrong-type", "config.yaml", None, text(lambda t: t.replace("MAX_ITERS: 4", "MAX_ITERS: many")),
     r"TRAIN\.MAX_ITERS expects a number, got 'many'"),
    ("config-cut-short", "config.yaml", None, text(lambda t: t[: t.index("DEVICE: auto") + len("DEVICE: au")]),
     r"cut short \(ends mid-line, no NUM_WORKERS and 2 more\)"),  # NUM_WORKERS, DIST_BACKEND, MEMORY_FORMAT
    ("config-aliases", "config.yaml", None,
     text(lambda t: "x: &a [1, 1]\ny: [*a, *a]\n" + t), r"not valid YAML \(an alias"),
    ("config-other-backbone", "config.yaml", "model.safetensors",
     text(lambda t: t.replace("BACKBONE: tiny", "BACKBONE: vgg16").replace("FEAT_STRIDE: 8", "FEAT_STRIDE: 16")),
     r"\(BACKBONE vgg16, NECK none\) .*: missing head\.0\.bias and 19 more, unexpected .* \(another BACKBONE\?\)"),
    ("config-other-neck", "config.yaml", "model.safetensors", text(lambda t: t.replace("NECK: none", "NECK: fpn")),
     r"\(BACKBONE tiny, NECK fpn\) .*: the weights are a NECK=none model's \(one C4 feature map\), the model is "
     r"NECK=fpn \(a feature pyramid\)"),
    ("config-bad-choice", "config.yaml", None, text(lambda t: t.replace("POOLING_MODE: align", "POOLING_MODE: mean")),
     r"POOLING_MODE='mean' is not one of"),
    ("config-unbuildable", "config.yaml", None, text(lambda t: t.replace("RPN_CHANNELS: 128", "RPN_CHANNELS: -3")),
     r"describes no model frcnn can build \(RuntimeError: .*negative dimension -3"),
]
COMMANDS = ["eval", "detect", "explain", "train --resume"]


def checkpoint_copy(run: Path, command: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of what ``command`` reads: ``(the folder to give it, the checkpoint folder it reads)``."""
    if command == "train --resume":  # the run's config.yaml and log, and its latest snapshot
        out = tmp_path / "run"
        shutil.copytree(run / LATEST, out / LATEST)
        for name in ("config.yaml", "metrics.jsonl"):
            shutil.copyfile(run / name, out / name)
        return out, out / LATEST
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("model.safetensors", "config.yaml", "meta.json"):
        shutil.copyfile(run / name, out / name)
    return out, out


def argv(command: str, folder: Path, voc: Path, tmp_path: Path) -> list[str]:
    image = str(sorted((voc / "JPEGImages").glob("*.jpg"))[0])
    return {
        "eval": ["eval", "--checkpoint", str(folder), "--data", str(voc), "--split", "test", "--no-progress"],
        "detect": ["detect", "--checkpoint", str(folder), image, "--out", str(tmp_path / "detect")],
        "explain": ["explain", "--checkpoint", str(folder), image, "--out", str(tmp_path / "explain")],
        "train --resume": ["train", "--data", str(voc), "--split", "trainval", "--out", str(folder), "--resume",
                           "--no-progress"],
        "report": ["report", str(folder), "--data", str(voc), "--split", "test", "--no-progress"],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_undamaged_copy_works(command, run, voc, tmp_path):
    folder, _ = checkpoint_copy(run, command, tmp_path)
    assert main(argv(command, folder, voc, tmp_path)) == 0


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("damaged", "named", "damage", "says"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(command, damaged, named, damage, says, run, voc, tmp_path,
                                                          capsys):
    folder, checkpoint = checkpoint_copy(run, command, tmp_path)
    damage(checkpoint / damaged)
    code = main(argv(command, folder, voc, tmp_path))
    line = one_line(capsys)
    assert code == 2, line
    assert line.startswith(f"frcnn {command.split()[0]}: error: {checkpoint / (named or damaged)}: "), line
    assert re.search(says, line), line
    assert len(line) < 400, line


# ----------------------------------------------------------------------- optimizer state (train --resume)

N_PARAMS = 35  # demo-cpu's trainable parameters, one momentum buffer each


def add_buffer(key: str, value: torch.Tensor | None = None) -> Callable[[dict], None]:
    return lambda t: t.update({key: torch.zeros(3) if value is None else value})


def move_buffer(old: str, new: str) -> Callable[[dict], None]:
    return lambda t: t.update({new: t.pop(old)})


OPTIMIZER_CASES = [
    ("optimizer-empty", lambda p: _replace(p, b""), r"empty file \(0 bytes\), no momentum buffers"),
    ("optimizer-truncated", cut(0.7), r"not a valid safetensors file of momentum buffers .*truncated"),
    ("optimizer-header-garbage", garble_header, r"invalid JSON in header"),
    ("optimizer-missing", lambda p: p.unlink(), r"no optimizer\.safetensors to resume from"),
    ("optimizer-more-buffers", tensors(add_buffer(str(N_PARAMS))),
     rf"{N_PARAMS + 1} momentum buffers for the model's {N_PARAMS} parameters"),
    ("optimizer-position-beyond", tensors(move_buffer("0", str(N_PARAMS + 4))),
     rf"momentum buffer {N_PARAMS + 4} but the model has {N_PARAMS} parameters \(0\.\.{N_PARAMS - 1}\)"),
    ("optimizer-wrong-shape", tensors(lambda t: t.update({"0": t["0"][:1].clone()})),
     r"momentum buffer 0 is \[1, 3, 3, 3\], parameter 0 is \[\d+, 3, 3, 3\]"),
    ("optimizer-not-a-position", tensors(move_buffer("3", "conv1.weight")),
     r"key 'conv1\.weight' is not a parameter position"),
    ("optimizer-unicode-digit", tensors(move_buffer("3", "\u00b2")), r"key '\u00b2' is not a parameter position"),
    ("optimizer-integers", tensors(lambda t: t.update({"2": t["2"].to(torch.int64)})),
     r"momentum buffer 2 is torch\.int64, not floating point"),
    ("optimizer-nan", tensors(set_nan("5")), r"momentum buffer 5 holds NaN"),
]


@pytest.mark.parametrize(("damage", "says"), [pytest.param(*case[1:], id=case[0]) for case in OPTIMIZER_CASES])
def test_damaged_optimizer_state_is_one_line_at_resume(damage, says, run, voc, tmp_path, capsys):
    folder, snapshot = checkpoint_copy(run, "train --resume", tmp_path)
    assert len(load_file(str(snapshot / "optimizer.safetensors"))) == N_PARAMS
    damage(snapshot / "optimizer.safetensors")
    code = main(argv("train --resume", folder, voc, tmp_path))
    line = one_line(capsys)
    assert code == 2, line
    assert line.startswith(f"frcnn train: error: {snapshot}"), line
    assert "optimizer.safetensors" in line and re.search(says, line), line


def test_a_buffer_that_does_not_fit_leaves_the_optimizer_untouched(run):
    cfg = load_config(str(run / "config.yaml"))
    optimizer = build_optimizer(FasterRCNN(cfg, 4, load_pretrained=False), cfg.TRAIN)
    buffers = load_file(str(run / LATEST / "optimizer.safetensors"))
    buffers["34"] = torch.zeros(2)  # 34 buffers fit, this one does not
    with pytest.raises(CheckpointError, match=r"momentum buffer 34 is \[2\]"):
        load_momentum(optimizer, buffers, run / LATEST)
    assert not optimizer.state
    del buffers["34"]
    load_momentum(optimizer, buffers, run / LATEST)
    assert len(optimizer.state) == 34


# ----------------------------------------------------------------------------------- incomplete snapshots

def test_latest_snapshot_skips_incomplete_ones_and_says_so(tmp_path):
    root = tmp_path / "snapshots"
    for it, complete in ((2, True), (4, True), (6, False), (10, False)):
        (root / f"iter_{it:07d}").mkdir(parents=True)
        if complete:
            (root / f"iter_{it:07d}" / "meta.json").write_text("{}")
    (root / "iter_notes.txt").write_text("not a snapshot")
    (root / "iter_0000099").write_text("a file, not a snapshot")
    said: list[str] = []
    assert latest_snapshot(root, say=said.append) == root / "iter_0000004"
    assert said == [f"{root / name}: skipped, an incomplete snapshot (no meta.json: its writing was interrupted)"
                    for name in ("iter_0000006", "iter_0000010")]
    assert latest_snapshot(root) == root / "iter_0000004"  # quiet without say
    assert latest_snapshot(tmp_path / "none") is None
    # in iteration order, also past 7 digits (iter_10000000 sorts before iter_9000000 by name)
    (root / "iter_10000000").mkdir()
    (root / "iter_10000000" / "meta.json").write_text("{}")
    (root / "iter_9000000").mkdir()
    assert snapshot_folders(root)[-2:] == [root / "iter_9000000", root / "iter_10000000"]
    assert latest_snapshot(root) == root / "iter_10000000"


def test_resume_past_an_incomplete_snapshot_continues_from_the_one_before(run, voc, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / LATEST / "meta.json").unlink()  # killed while writing the snapshot of iteration 4
    assert main(argv("train --resume", out, voc, tmp_path)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert read_checkpoint(out / LATEST).iteration == 4
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    # the same weights as the run that was not interrupted (nothing in the loop depends on how it started)
    resumed, original = load_file(str(out / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(resumed[k], original[k]) for k in original)


def test_resume_says_which_incomplete_snapshot_it_skipped(run, voc, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / LATEST / "meta.json").unlink()
    assert main(argv("train --resume", out, voc, tmp_path)) == 0
    assert f"{out / LATEST}: skipped, an incomplete snapshot" in capsys.readouterr().out


# ------------------------------------------------------------ what the fix in another file still has to do

REPORT_CASES = [case for case in CASES if case[0] in ("weights-truncated", "meta-a-list", "config-not-yaml")]


@pytest.mark.parametrize(("damaged", "named", "damage", "says"),
                         [pytest.param(*case[1:], id=case[0]) for case in REPORT_CASES])
def test_report_names_a_damaged_snapshot(damaged, named, damage, says, run, voc, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    damage(out / LATEST / damaged)
    code = main(argv("report", out, voc, tmp_path))
    line = one_line(capsys)
    assert code == 2 and f"{out / LATEST / damaged}: " in line and re.search(says, line), line


ROOT_CONFIG_CASES = [
    ("not-yaml", lambda t: t + "TRAIN: [\n", r"not valid YAML"),
    ("a-list", lambda t: "- TRAIN\n", r"expected a mapping"),
    ("unknown-key", lambda t: t + "ANCHOR_COUNT: 9\n", r"unknown config key ANCHOR_COUNT"),
    ("wrong-type", lambda t: t.replace("MAX_ITERS: 4", "MAX_ITERS: many"), r"MAX_ITERS expects a number"),
    ("empty", lambda t: "", r"empty file"),
]


@pytest.mark.parametrize(("change", "says"), [pytest.param(*case[1:], id=case[0]) for case in ROOT_CONFIG_CASES])
def test_read_config_names_the_file(change, says, run, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(change((run / "config.yaml").read_text()))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: .*{says}"):
        read_config(path)


@pytest.mark.parametrize(("change", "says"), [pytest.param(*case[1:], id=case[0]) for case in ROOT_CONFIG_CASES])
def test_resume_names_a_damaged_run_config(change, says, run, voc, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "config.yaml").write_text(change((out / "config.yaml").read_text()))
    code = main(argv("train --resume", out, voc, tmp_path))
    line = one_line(capsys)
    assert code == 2 and f"{out / 'config.yaml'}: " in line and re.search(says, line), line


@pytest.mark.parametrize(("change", "says"), [pytest.param(*case[1:], id=case[0]) for case in ROOT_CONFIG_CASES[:2]])
def test_report_names_a_damaged_run_config(change, says, run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "config.yaml").write_text(change((out / "config.yaml").read_text()))
    code = main(["report", str(out), "--no-progress"])
    line = one_line(capsys)
    assert code == 2 and f"{out / 'config.yaml'}: " in line and re.search(says, line), line


def test_resume_into_another_model_layout_is_one_line(run, voc, tmp_path, capsys):
    folder, snapshot = checkpoint_copy(run, "train --resume", tmp_path)
    code = main([*argv("train --resume", folder, voc, tmp_path), "--set", "RPN_CHANNELS=64"])
    line = one_line(capsys)
    assert code == 2 and f"{snapshot / 'model.safetensors'}: does not fit" in line, line
    assert re.search(r"rpn\.rpn_net\.weight is \[128, 128, 3, 3\] in the file, the model needs \[64, 128, 3, 3\]",
                     line), line
