"""Data and checkpoint folders from other people: each attack as a small crafted file, refused in one line."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from test_check_data import LAUGHS
from test_images import count_decoders, png_claiming
from test_voc import make_root, obj, peak_allocation, xml

from frcnn.cli import main
from frcnn.config import dump_yaml, load_config
from frcnn.data import open_dataset
from frcnn.data.check import check_data
from frcnn.data.voc import VOCDataset
from frcnn.engine.checkpoint import read_checkpoint
from frcnn.errors import CheckpointError, DataError


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------- XML


def test_billion_laughs_is_refused_without_expansion(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj(), filename=None), "lol": LAUGHS})
    # &i; is 1e9 characters; even expat's own amplification guard lets about 40 MB through before it stops
    with peak_allocation() as peak, pytest.raises(DataError, match=r"lol\.xml: refused unsafe XML"):
        VOCDataset(root, "train")
    assert peak[0] < 1_000_000, peak  # about 0.1 MB: refused at the first entity declaration
    report = check_data(root, "train")
    assert [(p.kind, p.image_id) for p in report.problems] == [("unsafe-xml", "lol")]
    with peak_allocation() as peak:  # again, now that the first call has done its imports
        check_data(root, "train")
    assert peak[0] < 1_000_000, peak


def test_external_entity_is_refused(tmp_path):
    text = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>'
    root = make_root(tmp_path, {"a": text})
    assert [p.kind for p in check_data(root, "train").problems] == ["unsafe-xml"]


# ----------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../../x.jpg"])
def test_voc_filename_outside_the_data_folder(tmp_path, name, capsys):
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename=name)})
    with pytest.raises(DataError, match="points outside"):
        VOCDataset(root, "train")
    assert [p.kind for p in check_data(root, "train").problems] == ["path-outside-data"]
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(tmp_path / "o")]) == 2
    assert "points outside" in one_line(capsys) and not (tmp_path / "o").exists()


def test_coco_file_name_outside_the_data_folder(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "../../../etc/passwd", "width": 9, "height": 9}],
                                "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(DataError, match="points outside"):
        open_dataset(path)
    assert [p.kind for p in check_data(path).problems] == ["path-outside-data"]


# ----------------------------------------------------------------------------------------------- images


def test_decompression_bomb_in_a_data_set(tmp_path, capsys, monkeypatch):
    decoders = count_decoders(monkeypatch)
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename=None)})
    png_claiming(root / "JPEGImages" / "a.jpg", 200_000, 200_000)
    ds = VOCDataset(root, "train")
    with pytest.raises(DataError, match=r"a\.jpg: refused as a possible decompression bomb"):
        ds.load_image(ds[0])
    assert [p.kind for p in check_data(root).problems] == ["image-too-large"]
    assert main(["check-data", "--data", str(root), "--no-progress"]) == 1
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(tmp_path / "o")]) == 2
    assert "decompression bomb" in one_line(capsys)
    assert decoders == []  # refused on the header each time: not one pixel decoded


# ----------------------------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this would create a file: the proof that nothing was unpickled is that it is not there."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def checkpoint_folder(path, weights: bytes | None, extra: dict[str, bytes] = ()):
    path.mkdir()
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    (path / "config.yaml").write_text(dump_yaml(load_config("demo-cpu")))
    (path / "meta.json").write_text(json.dumps({"format": "frcnn-checkpoint", "classes": ["a"], "iteration": 1}))
    for name, data in dict(extra).items():
        (path / name).write_bytes(data)
    return path


def test_a_pickle_named_safetensors_is_refused_and_never_unpickled(tmp_path, capsys):
    Payload.marker = tmp_path / "PWNED"
    folder = checkpoint_folder(tmp_path / "ckpt", pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a Python pickle, not safetensors"):
        read_checkpoint(folder)
    image = tmp_path / "x.png"
    png_claiming(image, 8, 8)
    assert main(["detect", "--checkpoint", str(folder), str(image), "--out", str(tmp_path / "o")]) == 2
    assert "never unpickles" in one_line(capsys)
    assert not Payload.marker.exists()


def test_a_torch_save_archive_is_refused(tmp_path):
    Payload.marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "w.pt")
    folder = checkpoint_folder(tmp_path / "ckpt", (tmp_path / "w.pt").read_bytes())
    with pytest.raises(CheckpointError, match="is a torch.save zip archive"):
        read_checkpoint(folder)
    assert not Payload.marker.exists()


def test_a_folder_with_only_a_pth_is_not_a_checkpoint(tmp_path):
    Payload.marker = tmp_path / "PWNED"
    folder = checkpoint_folder(tmp_path / "ckpt", None, {"model.pth": pickle.dumps(Payload())})
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors; model\.pth would need unpickling"):
        read_checkpoint(folder)
    assert not Payload.marker.exists()
