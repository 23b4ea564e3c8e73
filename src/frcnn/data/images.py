"""The one way frcnn opens an image file: safely, completely, in RGB.

* A pixel limit (``MAX_IMAGE_PIXELS``, 100 megapixels unless the environment variable
  ``FRCNN_MAX_IMAGE_PIXELS`` says otherwise) is checked on the header, before any pixel is decoded, so a
  small file claiming huge dimensions (a decompression bomb) is refused instead of exhausting memory.
  Pillow's own bomb check (twice its ``Image.MAX_IMAGE_PIXELS``) stays in force as well.
* The format is read from the content, never from the extension; a content that disagrees with the
  extension (a PNG named ``.jpg``) is reported and read by content.
* The whole file is decoded (``load()``): a truncated file is an error, never silently grey pixels.
* Any mode other than RGB (L, LA, 1, P, PA, RGBA, CMYK, I, ...) is reported and converted to RGB
  (palette images with transparency through RGBA; the alpha channel is dropped). 16-bit grayscale (``I;16``,
  and ``I`` from a PNG) is scaled to 8 bits (``round(v * 255 / 65535)``), not clipped at 255 as Pillow's own
  conversion does; CMYK goes through Pillow's conversion (an Adobe inverted CMYK JPEG is un-inverted on reading).
* EXIF orientation *is* applied (:func:`PIL.ImageOps.exif_transpose`): images are read upright, as phones and
  annotation tools show them, and the size everything uses (``ImageInfo.width``/``height``, boxes, the
  size an annotation is checked against) is the upright size; ``ImageInfo.stored_size`` is the size of the
  pixels as stored. A missing or invalid tag (not 1..8) or unreadable EXIF means "as stored".
* A file with several frames (an animated GIF, a multi-page TIFF; not a camera's MPO JPEG) is read as its
  first frame and reported (``multi-frame-image``).

:func:`open_image` returns the RGB image or raises a one-line :class:`~frcnn.errors.DataError`;
:func:`inspect_image` returns every :class:`~frcnn.data.problems.Problem` of the file instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from frcnn.data.problems import Problem
from frcnn.errors import DataError

__all__ = ["MAX_IMAGE_PIXELS", "ImageInfo", "PathOutside", "inspect_image", "open_image", "path_inside"]

MAX_IMAGE_PIXELS = int(os.environ.get("FRCNN_MAX_IMAGE_PIXELS", 100_000_000))

_EQUIVALENT = {"MPO": "JPEG"}  # a camera's multi-picture JPEG is a JPEG to every reader


@dataclass(frozen=True)
class ImageInfo:
    """What a file really holds: ``format`` from its content, ``mode`` before conversion, size in pixels."""

    path: Path
    format: str
    mode: str
    width: int  # upright (EXIF orientation applied)
    height: int
    orientation: int = 1  # the EXIF orientation tag applied (1: none, or no valid tag)
    frames: int = 1  # frames in the file (the first is read)

    @property
    def stored_size(self) -> tuple[int, int]:
        """``(width, height)`` of the pixels as stored, before the EXIF orientation (5..8 swap the sides)."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


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
                frames = 1 if im.format == "MPO" else getattr(im, "n_frames", 1)
                if frames > 1:
                    im.seek(0)  # counting the frames may have moved off the first one
                    im.load()
                orientation = _orientation(im)
                side = (im.height, im.width) if orientation >= 5 else (im.width, im.height)
                info = ImageInfo(path, im.format or "unknown", im.mode, *side, orientation, frames)
                if not rgb:
                    return None, info
                return _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im), info
    except Image.DecompressionBombError as e:
        raise _Refused(Problem(p, "image-too-large", f"refused as a possible decompression bomb ({e})")) from None
    except UnidentifiedImageError:
        raise _Refused(Problem(p, "unreadable-image", "cannot read image: not a format Pillow can read")) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        kind = "truncated-image" if "truncat" in str(e).lower() else "unreadable-image"
        raise _Refused(Problem(p, kind, f"cannot read image ({type(e).__name__}: {e})")) from None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8), or 1 when there is none, it is invalid, or the EXIF cannot be read."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the pixels unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _SIXTEEN_BIT or (im.mode == "I" and im.format == "PNG"):  # 16-bit grayscale
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
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


def _frames_problem(info: ImageInfo) -> Problem | None:
    if info.frames <= 1:
        return None
    return Problem(str(info.path), "multi-frame-image",
                   f"{info.format} file holds {info.frames} frames (animated or multi-page); the first is used")


def inspect_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[ImageInfo | None, list[Problem]]:
    """Decode the file completely and list its problems; ``info`` is None when it cannot be read."""
    path = Path(path)
    try:
        _, info = _decode(path, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, rgb=False)
    except _Refused as e:
        return None, [e.problem]
    found = (_format_problem(path, info.format), _mode_problem(info), _frames_problem(info))
    return info, [p for p in found if p is not None]


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The image in RGB, upright (EXIF orientation applied), or a one-line :class:`DataError` naming the file
    (missing, not an image, truncated, over the pixel limit). Another mode is converted; a misleading extension
    is ignored; of several frames, the first is read."""
    try:
        im, _ = _decode(Path(path), MAX_IMAGE_PIXELS if max_pixels is None else max_pixels, rgb=True)
    except _Refused as e:
        raise DataError(e.problem.line) from None
    return im


class PathOutside(ValueError):
    """A file name that leaves its folder; ``link`` is the real target when a symbolic link took it out."""

    def __init__(self, link: str | None = None) -> None:
        super().__init__(f"symbolic link to {link}" if link else "leaves the folder")
        self.link = link

    def says(self, folder: str | os.PathLike) -> str:
        """``points outside FOLDER`` and, for a link, where it really goes (without the file that names it)."""
        return f"points outside {folder}" + (f" (a symbolic link to {self.link})" if self.link else "")


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name`` (normalised, relative if ``folder`` is), or :class:`PathOutside` when that leaves
    ``folder``: an absolute name, ``..`` components that climb out, the folder itself, or a symbolic link (the
    file or a folder on the way) whose real target lies outside the folder's real location. A link that stays
    inside is fine, and so is a ``folder`` that is itself a link: both sides are resolved
    (:func:`os.path.realpath`) before they are compared."""
    target = os.path.normpath(os.path.join(folder, name))
    base, lexical = os.path.abspath(folder), os.path.abspath(target)
    if os.path.isabs(name) or os.path.commonpath([base, lexical]) != base or lexical == base:
        raise PathOutside()
    try:
        real_base, real_target = os.path.realpath(base), os.path.realpath(lexical)
    except (OSError, ValueError):  # a name the OS cannot look up (a NUL byte): no link, and no file either
        return Path(target)
    if os.path.commonpath([real_base, real_target]) != real_base or real_target == real_base:
        raise PathOutside(real_target)
    return Path(target)
