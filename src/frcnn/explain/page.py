"""Self-contained HTML pages: ``index.html`` with inline CSS and the PNGs beside it, no script, no network.

A page opens from disk (``file://``) in any browser: every picture is a relative link to a PNG in the same
folder, every style is inline, nothing is fetched from anywhere else.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from frcnn.errors import FrcnnError

MARKER = ".frcnn-page.json"  # written into every page folder; a folder holding it may be rewritten

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1e1e1e;
       background: #f4f4f4; line-height: 1.45; }
header { background: #20303f; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 24px; }
header p { margin: 2px 0; color: #d0d8e0; font-size: 14px; }
nav { padding: 10px 28px; background: #fff; border-bottom: 1px solid #ddd; font-size: 14px; }
nav a { margin-right: 14px; color: #20598f; text-decoration: none; white-space: nowrap; }
main { padding: 8px 28px 40px 28px; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 18px 0; padding: 14px 20px; }
section h2 { margin: 0 0 8px 0; font-size: 20px; }
section p.text { max-width: 980px; }
figure { margin: 10px 0; overflow-x: auto; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; }
table.numbers { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.numbers td, table.numbers th { border: 1px solid #ddd; padding: 3px 10px; text-align: left;
                                     vertical-align: top; }
table.numbers th { background: #f0f3f6; font-weight: 600; }
td.num { font-family: Menlo, Consolas, monospace; }
.note { color: #555; font-size: 13px; }
"""


@dataclass
class Section:
    anchor: str
    title: str
    text: str = ""
    numbers: dict[str, Any] | None = None
    image: Image.Image | None = None
    image_name: str = ""
    caption: str = ""
    html_body: str = ""  # extra trusted HTML (already escaped), e.g. a table
    notes: list[str] = field(default_factory=list)


class OutputError(FrcnnError):
    """The output folder is in the way (a file, or a folder holding something that is not our page)."""


def prepare_out(out: Path, rewritable: bool = False) -> None:
    """Create ``out``; refuse a folder that holds anything, unless ``rewritable`` and it is one of our pages."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (rewritable and (out / MARKER).is_file()):
            raise OutputError(f"--out {out} is not empty; choose a new or empty folder (nothing is overwritten)")
        try:  # our own page: remove the files it listed (and nothing else)
            written = json.loads((out / MARKER).read_text()).get("files", [])
        except (json.JSONDecodeError, OSError, AttributeError):
            written = []
        for name in written:
            if isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", ".."):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 12:
            return "[" + ", ".join(_fmt(v) for v in value[:12]) + f", ... ({len(value)} in all)]"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if value is None:
        return "n/a"
    return str(value)


def numbers_table(numbers: dict[str, Any]) -> str:
    """A two-column table; nested dicts become nested tables, lists of dicts are summarised."""
    rows = []
    for key, value in numbers.items():
        if isinstance(value, dict):
            cell = numbers_table(value) if value else "none"
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            cell = "<br>".join(html.escape(", ".join(f"{k}: {_fmt(v)}" for k, v in item.items()))
                               for item in value[:10])
            if len(value) > 10:
                cell += f"<br>... ({len(value)} in all)"
        else:
            cell = html.escape(_fmt(value))
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td class=num>{cell}</td></tr>")
    return "<table class=numbers>" + "".join(rows) + "</table>"


def write_page(out: Path, title: str, subtitle: Sequence[str], sections: Sequence[Section],
               data: dict[str, Any] | None = None) -> Path:
    """Write each section's image as ``out/<image_name>.png`` and the page as ``out/index.html``."""
    written: list[str] = []
    parts = [
        "<!DOCTYPE html>", "<html lang=en>", "<head>", "<meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<header><h1>{html.escape(title)}</h1>", *[f"<p>{html.escape(s)}</p>" for s in subtitle], "</header>",
        "<nav>" + " ".join(f"<a href='#{html.escape(s.anchor)}'>{html.escape(s.title)}</a>" for s in sections)
        + "</nav>", "<main>",
    ]
    for s in sections:
        parts.append(f"<section id='{html.escape(s.anchor)}'><h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p class=text>{html.escape(s.text)}</p>")
        if s.image is not None:
            name = f"{s.image_name or s.anchor}.png"
            s.image.save(out / name, compress_level=3)
            written.append(name)
            alt = html.escape(s.caption or s.title)
            parts.append(f"<figure><img src='{html.escape(name)}' width={s.image.width} height={s.image.height} "
                         f"alt='{alt}'>" + (f"<figcaption class=note>{alt}</figcaption>" if s.caption else "")
                         + "</figure>")
        if s.html_body:
            parts.append(s.html_body)
        if s.numbers:
            parts.append(numbers_table(s.numbers))
        for note in s.notes:
            parts.append(f"<p class=note>{html.escape(note)}</p>")
        parts.append("</section>")
    parts += ["</main>", "</body>", "</html>"]
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    written.append(index.name)
    (out / MARKER).write_text(json.dumps({"generator": "frcnn", "title": title, "files": written, **(data or {})},
                                         indent=1))
    return index


def to_jsonable(value: Any) -> Any:
    """Numbers of the stages as plain JSON (NaN as null)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_jsonable(value.item())
    return value
