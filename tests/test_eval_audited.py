"""benchmarks/eval_audited.py and benchmarks/bccd_audit.json: the audit's boxes become difficult ground truth
that forgives a detection of them and changes nothing else, and the audit file keeps its own rule on BCCD."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from frcnn.data.sample import Sample
from frcnn.model.detector import Detections

_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_audited", _ROOT / "benchmarks" / "eval_audited.py")
audited = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audited)
BCCD = _ROOT.parent / "shared/datasets/BCCD/BCCD"


class TwoImages:
    """Image a: one labelled square (0-based inclusive 10..49) and an unlabelled one at 100..139; image b: empty."""

    classes = ("square", "circle")

    def __init__(self):
        self.samples = [
            Sample("a", Path("a.png"), 200, 200, torch.tensor([[10.0, 10, 49, 49]]), torch.tensor([1]),
                   torch.tensor([False])),
            Sample("b", Path("b.png"), 200, 200, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.bool)),
        ]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.samples[i]


def _dets(boxes, scores, labels):
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                      torch.tensor(labels))


def test_a_detection_of_an_audited_cell_is_forgiven():
    data = TwoImages()
    # the unlabelled square outscores the labelled one: published, the first detection is a false positive
    detections = [_dets([[100, 100, 139, 139], [11, 10, 49, 50]], [0.95, 0.9], [1, 1]), _dets([], [], [])]
    published, fixed = audited.score_both(data, detections, {"a": [(1, [101.0, 99, 140, 139])]})
    # by hand: recall 0 then 1 at precision 1/2, so every 11-point precision is 1/2; audited: 1 at precision 1
    assert published["per_class"]["square"] == pytest.approx(0.5)
    assert fixed["per_class"]["square"] == pytest.approx(1.0)
    assert published["per_class"]["circle"] is None and fixed["per_class"]["circle"] is None  # no circles
    assert published["npos"] == fixed["npos"] == {"square": 1, "circle": 0}  # difficult: not to be found


def test_the_audited_set_appends_difficult_boxes_and_leaves_the_dataset_alone():
    data = TwoImages()
    view = audited.AuditedSet(data, {"a": [(2, [100.0, 100, 139, 139])]})
    a = view[0]
    assert a.boxes.tolist() == [[10, 10, 49, 49], [100, 100, 139, 139]]
    assert a.labels.tolist() == [1, 2] and a.difficult.tolist() == [False, True]
    assert view[1] is data[1] and len(view) == 2 and view.classes == data.classes
    assert data[0].boxes.tolist() == [[10, 10, 49, 49]] and data[0].difficult.tolist() == [False]


def test_an_audit_that_does_not_fit_the_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not in this split, e.g. c"):
        audited.AuditedSet(TwoImages(), {"c": [(1, [0.0, 0, 9, 9])]})
    bad = tmp_path / "audit.json"
    bad.write_text(json.dumps({"boxes": [{"image": "a", "class": "star", "box": [0, 0, 9, 9]}]}))
    with pytest.raises(ValueError, match="class 'star' of a is not one of square, circle"):
        audited.read_audit(bad, TwoImages.classes)
    for text, says in ((json.dumps({"boxes": [{"image": "a", "box": [0, 0, 9, 9]}]}), "missing 'class'"),
                       (json.dumps({"box": []}), "missing 'boxes'"), ("[1]", "not an audit file"),
                       (json.dumps({"boxes": [{"image": "a", "class": "circle", "box": [0, 9]}]}), "has 2 numbers"),
                       (json.dumps({"boxes": [{"image": "a", "class": "circle", "box": ["x", 0, 9, 9]}]}),
                        r"the box of a is not 4 numbers: \['x', 0, 9, 9\]"),
                       ('{"boxes": [', "not a JSON file")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=says):
            audited.read_audit(bad, TwoImages.classes)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"boxes": [{"image": "a", "class": "circle", "box": [0, 0, 9, 9]}]}))
    assert audited.read_audit(ok, TwoImages.classes) == {"a": [(2, [0.0, 0.0, 9.0, 9.0])]}


def test_an_existing_out_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "table.md"
    out.write_text("kept")
    assert audited.main([str(tmp_path / "no-such-run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eval_audited: error: --out {out} exists; choose another file"]
    assert out.read_text() == "kept"


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD}")
def test_the_bccd_audit_keeps_its_rule():
    from frcnn.boxes import box_iou
    from frcnn.data.voc import VOCDataset

    audit = json.loads((_ROOT / "benchmarks" / "bccd_audit.json").read_text())
    test = VOCDataset(BCCD, "test")
    samples = {test[i].image_id: test[i] for i in range(len(test))}
    assert len(audit["boxes"]) == 125 and len(audit["ambiguous"]) == 9
    for entry in audit["boxes"] + audit["ambiguous"]:
        s = samples[entry["image"]]  # a test image
        x1, y1, x2, y2 = entry["box"]
        assert 0 <= x1 < x2 <= s.width - 1 and 0 <= y1 < y2 <= s.height - 1, entry
        label = test.classes.index(entry["class"]) + 1
        same = s.boxes[s.labels == label]
        # the rule it was read with: overlapping no published box of its class (IoU < 0.1, +1 convention)
        if len(same):
            assert float(box_iou(torch.tensor([entry["box"]]), same).max()) < 0.1, entry
