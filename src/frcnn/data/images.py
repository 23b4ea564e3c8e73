"""The one way frcnn opens an image file: safely, completely, in RGB.

* A pixel limit (``MAX_IMAGE_PIXELS``, 100 megapixels unless the environment variable
  ``FRCNN_MAX_IMAGE_PIXELS`` says otherwise) is checked on the header, before any pixel is decoded, so a
  small file claiming huge dimensions (a decompression bomb) is refused instead of exhausting memory.
  Pillow's own bomb check (twice its ``Image.MAX_IMAGE_PIXELS``) stays in force as well.
* The format is read from the content, never from the extension; a content that disagrees with the
  extension (a PNG named ``.jpg``) is reported and read by content.
* The whole file is decoded (``load()``): a truncated file is an error, never silently grey pixels.
* Any mode other than RGB (L, LA, 1, P, PA, RGBA, CMYK, I, ...) is reported and converted to RGB
  (palette images with transparency through RGBA; the alpha channel is dropped).
* EXIF orientation is *not* applied: boxes refer to the pixels as stored.

:func:`open_image` returns the RGB image or raises a one-line :class:`~frcnn.errors.DataError`;
:func:`inspect_image` returns every :class:`~frcnn.data.problems.Problem` of the file instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from frcnn.data.problems import Problem
from frcnn.errors import DataError

__all__ = ["MAX_IMAGE_PIXELS", "ImageInfo", "inspect_image", "open_image"]

MAX_IMAGE_PIXELS = int(os.environ.get("FRCNN_MAX_IMAGE_PIXELS", 100_000_000))

_EQUIVALENT = {"MPO": "JPEG"}  # a camera's multi-picture JPEG is a JPEG to every reader


@dataclass(frozen=True)
class ImageInfo:
    """What a file really holds: ``format`` from its content, ``mode`` before conversion, size in pixels."""

    path: Path
    format: str
    mode: str
    width: int
    height: int


class _Refused(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.line)
        self.problem = problem


def _format_problem(path: Path, actual: str) -> Problem | None:
    suffix = path.suffix.lower()
    expected = Image.registered_extensions().get(suffix)
    if expected is not None and _EQUIVALENT.get(expected, expected) == _EQUIVALENT.get(actual, actual):
        return None
    said = f"extension {suffix!r} says {expected}" if expected else f"extension {suffix!r} is not an image type"
    return Problem(str(path), "format-mismatch", f"content is {actual} but the {said}")


def _decode(path: Path, max_pixels: int, rgb: bool) -> tuple[Image.Image | None, ImageInfo]:
    """The fully decoded image in RGB (if ``rgb``, else None) and its info; raises :class:`_Refused`."""
    p = str(path)
    if not path.is_file():
        raise _Refused(Problem(p, "missing-image", "image does not exist"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                info = ImageInfo(path, im.format or "unknown", im.mode, im.width, im.height)
                if im.width * im.height > max_pixels:
                    raise _Refused(Problem(p, "image-too-large", (
                        f"image claims {im.width}x{im.height} = {im.width * im.height / 1e6:.1f} megapixels, over "
                        f"the limit of {max_pixels / 1e6:g} (FRCNN_MAX_IMAGE_PIXELS); refused as a possible "
                        "decompression bomb")))
                try:
                    im.load()
                except (OSError, SyntaxError, ValueError, EOFError) as e:
                    message = f"cannot read image: data truncated or corrupt ({e})"
                    raise _Refused(Problem(p, "truncated-image", message)) from None
                return (_to_rgb(im) if rgb else None), info
    except Image.DecompressionBombError as e:
        raise _Refused(Problem(p, "image-too-large", f"refused as a possible decompression bomb ({e})")) from None
    except UnidentifiedImageError:
        raise _Refused(Problem(p, "unreadable-image", "cannot read image: not a format Pillow can read")) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        kind = "truncated-image" if "truncat" in str(e).lower() else "unreadable-image"
        raise _Refused(Problem(p, kind, f"cannot read image ({type(e).__name__}: {e})")) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def _mode_problem(info: ImageInfo) -> Problem | None:
    if info.mode == "RGB":
        return None
    names = {"L": "grayscale", "LA": "grayscale with alpha", "1": "black-and-white", "P": "palette",
             "PA": "palette with alpha", "RGBA": "RGB with alpha", "CMYK": "CMYK"}
    return Problem(str(info.path), "image-mode",
                   f"image mode is {info.mode} ({names.get(info.mode, 'not RGB')}), converted to RGB")


def inspect_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[ImageInfo | None, list[Problem]]:
    """Decode the file completely and list its problems; ``info`` is None when it cannot be read."""
    path = Path(path)
    try:
        _, info = _decode(path, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, rgb=False)
    except _Refused as e:
        return None, [e.problem]
    found = (_format_problem(path, info.format), _mode_problem(info))
    return info, [p for p in found if p is not None]


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The image in RGB, or a one-line :class:`DataError` naming the file (missing, not an image, truncated,
    over the pixel limit). Another mode is converted; a misleading extension is ignored."""
    try:
        im, _ = _decode(Path(path), MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, rgb=True)
    except _Refused as e:
        raise DataError(e.problem.line) from None
    return im
