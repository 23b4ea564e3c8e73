"""``frcnn demo``: the whole pipeline on a data set it makes itself, on a CPU, in minutes.

1. generate the synthetic shapes set (VOC layout) in ``OUT/data``;
2. train the ``demo-cpu`` preset on its trainval split into ``OUT/model`` (a checkpoint folder);
3. evaluate on the test split: ``OUT/metrics.json``;
4. draw the detections of a few test images into ``OUT/detections``;
5. explain one test image stage by stage: ``OUT/explain/index.html`` (see :mod:`frcnn.explain`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from frcnn.config import load_config
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.data.voc import VOCDataset
from frcnn.engine.evaluate import evaluate, format_table
from frcnn.engine.inference import Predictor
from frcnn.engine.train import TrainingError, train
from frcnn.viz.draw import draw_detections

DEMO_PRESET = "demo-cpu"
NUM_TRAINVAL, NUM_TEST, NUM_DRAWN = 400, 100, 6


def run_demo(
    out: Path,
    seed: int = 0,
    progress: bool = True,
    overrides: tuple[str, ...] = (),
    num_images: tuple[int, int] = (NUM_TRAINVAL, NUM_TEST),
) -> dict:
    """Run the four steps into ``out``; return the evaluation (also in ``out/metrics.json``).

    ``overrides`` (``KEY=VALUE``) and ``num_images`` (trainval, test) exist for tests that need a
    demo of seconds rather than minutes; the command line uses the defaults.
    """
    out = Path(out)
    num_trainval, num_test = num_images
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingError(f"--out {out} is not empty; the demo writes into a new folder")
    started = time.perf_counter()
    cfg = load_config(DEMO_PRESET, (f"RNG_SEED={seed}", *overrides))
    print(f"[1/4] generating {num_trainval} + {num_test} synthetic images in {out / 'data'}")
    make_shapes_dataset(out / "data", num_trainval=num_trainval, num_test=num_test, seed=seed, progress=progress)
    trainval = VOCDataset(out / "data", "trainval")
    test = VOCDataset(out / "data", "test", classes=trainval.classes)
    length = f"{cfg.TRAIN.MAX_EPOCHS:g} epochs" if cfg.TRAIN.MAX_EPOCHS else f"{cfg.TRAIN.MAX_ITERS} iterations"
    print(f"[2/4] training {DEMO_PRESET} for {length} on {len(trainval)} images "
          f"({', '.join(trainval.classes)})")
    model = train(cfg, trainval, out / "model", progress=progress)
    cfg = model.cfg  # as trained: epochs and ANCHOR_SCALES=auto resolved
    predictor = Predictor(model, cfg, trainval.classes)
    print(f"[3/4] evaluating on {len(test)} test images")
    result = evaluate(predictor, test, metric="voc07", progress=progress)
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"[4/4] drawing detections of {NUM_DRAWN} test images into {out / 'detections'}")
    (out / "detections").mkdir()
    for i in range(min(NUM_DRAWN, len(test))):
        sample = test[i]
        image = test.load_image(sample)
        det = predictor.predict([image])[0]
        keep = det.scores >= 0.5
        drawn = draw_detections(image, det.boxes[keep], det.labels[keep], det.scores[keep], trainval.classes)
        drawn.save(out / "detections" / f"{sample.image_id}.png")
    print(f"mAP (VOC07) {result['map']:.4f}; checkpoint {out / 'model'}; metrics {out / 'metrics.json'}")
    from frcnn.explain import explain_image  # every stage of one test image, with its ground truth

    page = explain_image(model, cfg, trainval.classes, test[0].path, out / "explain", write_json=True,
                         checkpoint=str(out / "model"))
    print(f"explain report of test image {test[0].image_id}: {page}")
    return result
