"""frcnn report: a training run's page from metrics.jsonl and its snapshots, also while the run is going."""

from __future__ import annotations

import json

import pytest
from explain_fixtures import CLASSES, checkpoint, voc_folder

from frcnn.cli import main
from frcnn.explain.report import read_metrics, write_report

KEYS = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")


def _run(folder, iterations=(2, 4, 6), snapshots=(4,), partial_line=True):
    folder.mkdir(parents=True)
    lines = []
    for it in iterations:
        record = {"iteration": it, **{k: 1.0 / it for k in KEYS}, "lr": 0.01 * it, "time": 0.1, "elapsed": it / 10}
        record["total"] = sum(record[k] for k in KEYS)
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n" + ('{"iteration": 8, "rpn_c' if partial_line else "")  # a line being written
    (folder / "metrics.jsonl").write_text(text)
    for it in snapshots:
        checkpoint(folder / "snapshots" / f"iter_{it:07d}", iteration=it)
    return folder


def test_metrics_reader_skips_a_half_written_line(tmp_path):
    run = _run(tmp_path / "run", snapshots=())
    records = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [2, 4, 6]


def test_report_of_a_running_training_without_data(tmp_path):
    run = _run(tmp_path / "run", snapshots=())
    index = write_report(run, progress=False)
    assert index == run / "report" / "index.html"
    page = index.read_text()
    assert "losses.png" in page and "learning_rate.png" in page and "--data" in page
    assert "last_logged_iteration" in page and ">6<" in page


def test_report_with_data_evaluates_each_snapshot_and_can_be_rewritten(tmp_path):
    voc_folder(tmp_path / "voc")
    run = _run(tmp_path / "run", snapshots=(2, 4))
    index = write_report(run, data=tmp_path / "voc", split="test", num_images=1, threshold=0.0, progress=False)
    names = {p.name for p in index.parent.glob("*.png")}
    assert names == {"losses.png", "learning_rate.png", "map.png", "pr.png", "test_images.png"}
    page = index.read_text()
    assert "iteration 2" in page and "iteration 4" in page and "mAP" in page
    for name in CLASSES:
        assert name in page
    write_report(run, progress=False)  # a second run replaces the report it wrote, and only that
    assert {p.name for p in index.parent.glob("*.png")} == {"losses.png", "learning_rate.png"}
    assert "map.png" not in index.read_text()


def test_report_never_writes_into_a_folder_of_the_user(tmp_path, capsys):
    run = _run(tmp_path / "run", snapshots=())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    assert capsys.readouterr().err.startswith("frcnn report: error: --out")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main(["report", str(run), "--no-progress"]) == 0
    assert str(run / "report" / "index.html") in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["", "not json\n"])
def test_a_folder_without_log_or_checkpoint_is_not_a_run(tmp_path, bad):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(bad)
    assert main(["report", str(tmp_path / "run")]) == 2


def test_a_demo_layout_finds_its_data_and_a_saved_evaluation_is_shown(tmp_path):
    out = tmp_path / "demo"
    run = _run(out / "model", snapshots=(3,))
    (out / "metrics.json").write_text(json.dumps({"map": 0.25, "metric": "voc07",
                                                  "per_class": {"circle": 0.5, "square": 0.0, "star": None}}))
    page = write_report(run, progress=False).read_text()
    assert "0.2500" in page and "n/a (no gt)" in page and "demo/metrics.json" in page  # saved, no data beside it
    voc_folder(out / "data")  # frcnn demo's layout: OUT/model beside OUT/data
    page = write_report(run, progress=False).read_text()
    assert "map.png" in page and "test_images.png" in page
