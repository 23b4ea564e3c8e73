"""PASCAL VOC folders: read annotations into :class:`~frcnn.data.sample.Sample` records, and write them.

Layout::

    ROOT/Annotations/<id>.xml
    ROOT/JPEGImages/<filename>            (<filename> from the XML, else <id>.jpg)
    ROOT/ImageSets/Main/<split>.txt       (one image id per line)

Coordinates: VOC XML boxes are **1-based** inclusive pixel indices (``1 <= xmin <= xmax <= width``).
Every box this module returns is **0-based inclusive** float32 (``x - 1``), the +1 convention of
:class:`~frcnn.data.sample.Sample` (a box ``[0, 0, 9, 9]`` is 10x10 pixels). ``write_voc_xml`` takes
0-based boxes and writes them 1-based, so reading back gives the same numbers.

Policy choices:

* XML is parsed with ``defusedxml`` (no entity expansion, no external entities).
* Class names are stripped of surrounding whitespace and are case-sensitive.
* A degenerate box with ``xmin == xmax`` (or ``ymin == ymax``) is valid: it is one pixel wide.
  A box with ``xmax < xmin``, a coordinate below 1 or beyond ``width``/``height`` is refused, as is a
  non-finite coordinate.
* Every problem is a one-line :class:`~frcnn.errors.DataError` naming the file, or, in lenient mode
  (``problems=[]``), a :class:`~frcnn.data.problems.Problem` in that list (see ``frcnn check-data``).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as StdET  # used to *write* XML only; never to parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import defusedxml.ElementTree as SafeET
import torch
from defusedxml import DefusedXmlException
from PIL import Image

from frcnn.data.images import PathOutside, open_image, path_inside
from frcnn.data.problems import Problem
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["VOCDataset", "is_dir", "is_file", "parse_voc_xml", "shown", "write_voc_xml"]

_COORDS = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class _Object:
    name: str
    box: tuple[float, float, float, float]  # 1-based, as in the XML
    difficult: bool


@dataclass(frozen=True)
class _Annotation:
    """One XML file, checked for everything except class names (which need the class list)."""

    xml_path: Path
    image_path: Path
    width: int
    height: int
    objects: tuple[_Object, ...]


# ------------------------------------------------------------------------------------------ reading


def is_file(path: str | os.PathLike) -> bool:
    """``Path.is_file`` that answers False instead of raising for a name the OS cannot look up (too long)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def shown(path: str | os.PathLike) -> str:
    """``path`` for a one-line message: as it is, or quoted with escapes if a line break (or another character
    that does not print) is part of the name, as a ``<filename>`` or ``file_name`` of the data may make it."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def is_dir(path: str | os.PathLike) -> bool:
    """``Path.is_dir`` that answers False instead of raising for a name the OS cannot look up (too long)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _text(parent, tag: str, where: str, xml_path: Path) -> str:
    node = parent.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise DataError(f"{xml_path}: missing <{tag}> in {where}")
    return node.text.strip()


def _number(text: str, tag: str, where: str, xml_path: Path) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{xml_path}: {where} has a non-numeric <{tag}> {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{xml_path}: {where} has a non-finite <{tag}> {text!r}")
    return value


def _image_path(images_dir: Path, filename: str, xml_path: Path) -> Path:
    """``images_dir / filename``, refusing names that leave ``images_dir``, lexically or through a symbolic link
    (:func:`frcnn.data.images.path_inside`)."""
    try:
        return path_inside(images_dir, filename)
    except PathOutside as e:
        raise DataError(f"{xml_path}: <filename> {filename!r} {e.says(images_dir)}") from None


def _size(root, xml_path: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        raise DataError(f"{xml_path}: missing <size>")
    dims = []
    for tag in ("width", "height"):
        value = _number(_text(size, tag, "<size>", xml_path), tag, "<size>", xml_path)
        if value < 1 or not value.is_integer():
            raise DataError(f"{xml_path}: <size> has <{tag}> {value:g}, expected a positive integer")
        dims.append(int(value))
    return dims[0], dims[1]


def _read_object(obj, i: int, xml_path: Path, size: tuple[int, int] | None) -> _Object:
    """One ``<object>``; its box is checked against ``size`` (width, height) unless ``size`` is None."""
    where = f"box {i}"
    name = _text(obj, "name", where, xml_path)
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DataError(f"{xml_path}: missing <bndbox> in {where} ({name})")
    x1, y1, x2, y2 = (_number(_text(bndbox, t, where, xml_path), t, where, xml_path) for t in _COORDS)
    if size is not None:
        width, height = size
        if x2 < x1:
            raise DataError(f"{xml_path}: {where} has x2 < x1 (xmin={x1:g}, xmax={x2:g})")
        if y2 < y1:
            raise DataError(f"{xml_path}: {where} has y2 < y1 (ymin={y1:g}, ymax={y2:g})")
        if x1 < 1 or y1 < 1 or x2 > width or y2 > height:
            raise DataError(
                f"{xml_path}: {where} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width}x{height} image "
                f"(VOC coordinates are 1-based: 1 <= xmin <= xmax <= width)"
            )
    difficult_node = obj.find("difficult")
    difficult = False
    if difficult_node is not None and difficult_node.text and difficult_node.text.strip():
        flag = _number(difficult_node.text.strip(), "difficult", where, xml_path)
        if flag not in (0, 1):
            raise DataError(f"{xml_path}: {where} has <difficult> {flag:g}, expected 0 or 1")
        difficult = bool(flag)
    return _Object(name, (x1, y1, x2, y2), difficult)


def _note(problems: list[Problem] | None, xml_path: Path, kind: str, error: DataError, box: int | None = None) -> None:
    """Strict (``problems`` is None): raise ``error`` again. Lenient: record it as a :class:`Problem`."""
    if problems is None:
        raise error
    message = str(error).removeprefix(f"{xml_path}: ")
    problems.append(Problem(str(xml_path), kind, message, box=box, image_id=xml_path.stem))


def _parse(xml_path: Path):
    try:
        return SafeET.parse(xml_path).getroot()
    except DefusedXmlException as e:
        raise DataError(f"{xml_path}: refused unsafe XML ({type(e).__name__}: entities/DTDs are not allowed)") from None
    except SafeET.ParseError as e:
        raise DataError(f"{xml_path}: XML does not parse ({e})") from None
    except (LookupError, ValueError) as e:  # an encoding Python lacks (bogus, rot13) or expat cannot use (utf-32)
        raise DataError(f"{xml_path}: XML does not parse ({e})") from None
    except OSError as e:
        raise DataError(f"{xml_path}: cannot read ({e.strerror or e})") from None


def _read_annotation(xml_path: Path, images_dir: Path, problems: list[Problem] | None = None) -> _Annotation | None:
    """Strict (``problems`` None): the checked annotation or a DataError. Lenient: every problem is appended
    to ``problems``; an annotation that cannot be read gives None, a bad ``<size>`` gives width = height = 0,
    a bad ``<object>`` is left out, and boxes are *not* checked against the image (check.py does that with
    the image's real size)."""
    try:
        root = _parse(xml_path)
    except DataError as e:
        kind = ("missing-annotation" if not is_file(xml_path) else
                "unsafe-xml" if "unsafe XML" in str(e) else "unparsable-annotation")
        _note(problems, xml_path, kind, e)
        return None
    if root.tag != "annotation":
        _note(problems, xml_path, "unparsable-annotation",
              DataError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>"))
        return None

    filename_node = root.find("filename")
    if filename_node is not None and filename_node.text and filename_node.text.strip():
        filename = filename_node.text.strip()
    else:
        filename = f"{xml_path.stem}.jpg"
    try:
        image_path = _image_path(images_dir, filename, xml_path)
    except DataError as e:
        _note(problems, xml_path, "path-outside-data", e)
        return None

    try:
        width, height = _size(root, xml_path)
    except DataError as e:
        _note(problems, xml_path, "size-missing", e)
        width = height = 0

    objects = []
    for i, obj in enumerate(root.findall("object"), start=1):
        try:
            objects.append(_read_object(obj, i, xml_path, (width, height) if problems is None else None))
        except DataError as e:
            _note(problems, xml_path, "bad-annotation", e, box=i)
    return _Annotation(xml_path, image_path, width, height, tuple(objects))


def _to_sample(
    ann: _Annotation, class_to_index: Mapping[str, int], image_id: str, problems: list[Problem] | None = None
) -> Sample:
    """Labels from ``class_to_index``; an unknown class is an error (strict) or a recorded problem and a
    box left out (lenient)."""
    kept = []
    for i, obj in enumerate(ann.objects, start=1):
        if obj.name not in class_to_index:
            known = ", ".join(sorted(class_to_index, key=class_to_index.__getitem__))
            error = DataError(f"{ann.xml_path}: box {i} has unknown class {obj.name!r} (known classes: {known})")
            _note(problems, ann.xml_path, "unknown-class", error, box=i)
            continue
        kept.append(obj)
    n = len(kept)
    boxes = torch.tensor([o.box for o in kept], dtype=torch.float32).reshape(n, 4) - 1.0
    return Sample(
        image_id=image_id,
        path=ann.image_path,
        width=ann.width,
        height=ann.height,
        boxes=boxes,
        labels=torch.tensor([class_to_index[o.name] for o in kept], dtype=torch.int64).reshape(n),
        difficult=torch.tensor([o.difficult for o in kept], dtype=torch.bool).reshape(n),
    )


def parse_voc_xml(
    xml_path: str | os.PathLike, class_to_index: Mapping[str, int], images_dir: str | os.PathLike | None = None,
    problems: list[Problem] | None = None,
) -> Sample | None:
    """Read one VOC annotation into a :class:`Sample` (boxes 0-based inclusive, labels from ``class_to_index``).

    ``images_dir`` defaults to ``<xml_path>/../../JPEGImages`` (the VOC layout). ``image_id`` is the XML's stem.
    Raises :class:`DataError` for unparsable or unsafe XML, missing tags, non-numeric coordinates,
    inverted boxes, boxes outside the image, unknown class names and a ``<filename>`` outside ``images_dir``.
    With a ``problems`` list (lenient), those go into the list instead, boxes are not checked against the
    image, and an annotation that cannot be read gives ``None``.
    """
    xml_path = Path(xml_path)
    images_dir = Path(images_dir) if images_dir is not None else xml_path.parent.parent / "JPEGImages"
    ann = _read_annotation(xml_path, images_dir, problems)
    return None if ann is None else _to_sample(ann, class_to_index, xml_path.stem, problems)


# ------------------------------------------------------------------------------------------ data set


class VOCDataset:
    """The images of one split of a VOC folder, annotations parsed once in ``__init__``.

    ``classes`` is the tuple of class names; name ``classes[i]`` is label ``i + 1`` (0 is background).
    If not given, it is every class name found in the split's XMLs, sorted alphabetically; pass the
    training set's ``classes`` when reading a test split so that labels agree.

    Strict (``problems`` None, what training and evaluation use): the first problem is a one-line
    :class:`DataError`. Lenient (``problems`` a list, what ``frcnn check-data`` uses): every problem of the
    annotations is appended to ``problems`` and the split is read as far as it can be: an annotation that
    cannot be read is left out (``ids`` are the images kept, ``listed`` every id of the split file), boxes
    are kept as written (even inverted or outside the image) and images are not opened. Missing folders
    and split files are errors in both modes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        classes: Sequence[str] | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        annotations_dir = self.root / "Annotations"
        images_dir = self.root / "JPEGImages"
        sets_dir = self.root / "ImageSets" / "Main"
        if not is_dir(self.root):
            raise DataError(f"{self.root}: no such data folder")
        for folder in (annotations_dir, images_dir, sets_dir):
            if not is_dir(folder):
                raise DataError(
                    f"{folder}: missing folder (a VOC root holds Annotations/, JPEGImages/, ImageSets/Main/)"
                )
        split_file = sets_dir / f"{split}.txt"
        if not is_file(split_file):
            available = sorted(p.stem for p in sets_dir.glob("*.txt") if "_" not in p.stem)
            raise DataError(f"{split_file}: no such split (available: {', '.join(available) or 'none'})")
        self.listed: tuple[str, ...] = _read_split(split_file)

        read = [(i, _read_annotation(annotations_dir / f"{i}.xml", images_dir, problems)) for i in self.listed]
        kept = [(i, ann) for i, ann in read if ann is not None]
        self.ids: tuple[str, ...] = tuple(i for i, _ in kept)
        annotations = [ann for _, ann in kept]
        for ann in annotations:
            if problems is None and not is_file(ann.image_path):
                raise DataError(f"{ann.xml_path}: image {shown(ann.image_path)} does not exist")

        if classes is None:
            classes = sorted({o.name for ann in annotations for o in ann.objects})
            if not classes and problems is None:  # lenient: the problems say why
                raise DataError(f"{split_file}: no objects in any annotation of this split, so no classes")
        self.classes: tuple[str, ...] = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise DataError(f"{self.root}: class names must be unique and non-empty, got {list(self.classes)}")
        class_to_index = {name: i for i, name in enumerate(self.classes, start=1)}
        self._samples = tuple(_to_sample(ann, class_to_index, i, problems) for ann, i in zip(annotations, self.ids))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> Sample:
        return self._samples[i]

    def __repr__(self) -> str:
        return f"VOCDataset({str(self.root)!r}, {self.split!r}, {len(self)} images, classes={self.classes})"

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image in RGB (:func:`frcnn.data.images.open_image`); a :class:`DataError` naming the
        file if it is missing, unreadable, truncated, over the pixel limit, or its size disagrees with the
        annotation."""
        image = open_image(sample.path)
        if image.size != (sample.width, sample.height):
            raise DataError(
                f"{sample.path}: image is {image.width}x{image.height} but its annotation says "
                f"{sample.width}x{sample.height}"
            )
        return image


def _read_split(split_file: Path) -> tuple[str, ...]:
    ids: list[str] = []
    seen: set[str] = set()
    try:
        text = split_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{split_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{split_file}: cannot read ({e.strerror or e})") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        image_id = fields[0]
        if image_id in (".", "..") or Path(image_id).name != image_id or "\0" in image_id:
            raise DataError(f"{split_file}: line {line_no}: {image_id!r} is not a plain image id")
        if image_id in seen:
            raise DataError(f"{split_file}: line {line_no}: image id {image_id!r} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise DataError(f"{split_file}: lists no image ids")
    return tuple(ids)


# ------------------------------------------------------------------------------------------ writing


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def write_voc_xml(
    path: str | os.PathLike,
    filename: str,
    width: int,
    height: int,
    objects: Iterable[tuple[str, Sequence[float]] | tuple[str, Sequence[float], bool]],
) -> None:
    """Write a VOC annotation. ``objects`` are ``(name, box)`` or ``(name, box, difficult)`` with ``box``
    **0-based inclusive** ``(x1, y1, x2, y2)`` (as in :class:`Sample`); the XML gets them 1-based."""
    root = StdET.Element("annotation")
    StdET.SubElement(root, "folder").text = "JPEGImages"
    StdET.SubElement(root, "filename").text = filename
    size = StdET.SubElement(root, "size")
    StdET.SubElement(size, "width").text = str(int(width))
    StdET.SubElement(size, "height").text = str(int(height))
    StdET.SubElement(size, "depth").text = "3"
    StdET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        name, box = obj[0], obj[1]
        difficult = bool(obj[2]) if len(obj) > 2 else False
        node = StdET.SubElement(root, "object")
        StdET.SubElement(node, "name").text = name
        StdET.SubElement(node, "pose").text = "Unspecified"
        StdET.SubElement(node, "truncated").text = "0"
        StdET.SubElement(node, "difficult").text = "1" if difficult else "0"
        bndbox = StdET.SubElement(node, "bndbox")
        for tag, value in zip(_COORDS, box):
            StdET.SubElement(bndbox, tag).text = _format(float(value) + 1.0)
    StdET.indent(root, space="\t")
    Path(path).write_bytes(StdET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n")
