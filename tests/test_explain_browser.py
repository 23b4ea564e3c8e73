"""The explain and report pages in a real browser: headless Chromium opens them from disk with no network;
every image must load (naturalWidth > 0) and nothing may go wrong on the console; a screenshot is taken.

Skipped when ``/usr/bin/chromium`` (Debian's ``chromium``) is missing, unless ``FRCNN_REQUIRE_BROWSER=1``
(CI sets it, and installs the package), in which case a missing browser fails the test.

How the page is checked without extra packages: a copy of the page (``check.html`` beside it, so the PNGs
resolve the same way) gets a small script first in ``<head>`` that records every error event (script errors
and resources that fail to load) and every ``console.error``, and after the ``load`` event writes the number
of images, the ones that did not load and the errors into a ``<pre id=frcnn-check>``; ``--dump-dom`` prints
the DOM. The page itself has no script at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from explain_fixtures import CLASSES, checkpoint, config, model, voc_folder
from PIL import Image

from frcnn.explain import explain_image
from frcnn.explain.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-extensions", "--mute-audio"]
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || 'error'));
}, true);
window.addEventListener('unhandledrejection', function (e) { window.__errors.push('rejection: ' + e.reason); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__errors.push(Array.prototype.join.call(arguments, ' '));
    original.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.getAttribute('src'); });
  var pre = document.createElement('pre');
  pre.id = 'frcnn-check';
  pre.textContent = JSON.stringify({images: images.length, broken: broken, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("FRCNN_REQUIRE_BROWSER") == "1":
        pytest.fail("FRCNN_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing (apt-get install chromium)")
    pytest.skip("no /usr/bin/chromium (Debian package chromium); CI installs it")


def _chromium(browser: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(browser), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOME": str(profile)})


def check_page(browser: Path, index: Path, profile: Path) -> dict:
    """Open a copy of ``index`` with the check script; returns ``{images, broken, errors}``."""
    check = index.parent / "check.html"
    check.write_text(index.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    try:
        done = _chromium(browser, profile, "--virtual-time-budget=15000", "--dump-dom", check.as_uri())
    finally:
        check.unlink()
    found = re.search(r'<pre id="frcnn-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no check result from chromium (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(browser: Path, index: Path, profile: Path, path: Path) -> Image.Image:
    _chromium(browser, profile, "--window-size=1280,4000", f"--screenshot={path}", index.as_uri())
    assert path.is_file(), "chromium wrote no screenshot"
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def explain_page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explain")
    image = voc_folder(root / "voc")  # with ground truth: all ten stages
    return explain_image(model(), config(), CLASSES, image, root / "page", threshold=0.2)


def test_explain_page_loads_every_image_without_errors_in_chromium(browser, explain_page, tmp_path):
    result = check_page(browser, explain_page, tmp_path / "profile")
    assert result["images"] == 10
    assert result["broken"] == [] and result["errors"] == []
    shot = screenshot(browser, explain_page, tmp_path / "profile2", explain_page.parent.parent / "screenshot.png")
    pixels = np.asarray(shot)
    assert shot.size == (1280, 4000) and pixels.std() > 20  # a page with pictures, not a blank one
    target = os.environ.get("FRCNN_SCREENSHOT")  # keep it to look at: FRCNN_SCREENSHOT=/some/file.png
    if target:
        shutil.copyfile(explain_page.parent.parent / "screenshot.png", target)


def test_the_check_notices_a_missing_image(browser, explain_page, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(explain_page.parent, broken)
    (broken / "03_rpn.png").unlink()
    result = check_page(browser, broken / "index.html", tmp_path / "profile")
    assert result["broken"] == ["03_rpn.png"] and result["errors"]


def test_report_page_loads_every_image_without_errors_in_chromium(browser, tmp_path):
    voc_folder(tmp_path / "voc")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iteration": i, "rpn_cls": 0.7 / i, "rpn_box": 0.1 / i, "rcnn_cls": 1.2 / i, "rcnn_box": 0.3 / i,
             "total": 2.3 / i, "lr": 0.001, "time": 0.1, "elapsed": 0.1 * i} for i in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint(run / "snapshots" / "iter_0000003", iteration=3)
    index = write_report(run, data=tmp_path / "voc", split="test", num_images=1, progress=False)
    result = check_page(browser, index, tmp_path / "profile")
    assert result["images"] == 5 and result["broken"] == [] and result["errors"] == []
