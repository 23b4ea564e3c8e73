"""The safe image opener: pixel limit before decoding, format by content, truncation, modes to RGB."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from frcnn.data.images import inspect_image, open_image
from frcnn.engine.detect import open_image as detect_open_image
from frcnn.errors import DataError


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 60-byte PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb's header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def truncated(path: Path, fmt: str) -> Path:
    Image.effect_noise((64, 48), 60).convert("RGB").save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def kinds(path, **kw) -> list[str]:
    return [p.kind for p in inspect_image(path, **kw)[1]]


def test_rgb_jpeg_has_no_problem(tmp_path):
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "a.jpg")
    info, problems = inspect_image(tmp_path / "a.jpg")
    assert problems == [] and (info.format, info.mode, info.width, info.height) == ("JPEG", "RGB", 20, 10)
    assert open_image(tmp_path / "a.jpg").mode == "RGB"


@pytest.mark.parametrize(("mode", "word"), [("L", "grayscale"), ("P", "palette"), ("RGBA", "alpha"),
                                            ("LA", "grayscale"), ("1", "black-and-white"), ("I;16", "I;16")])
def test_other_modes_are_reported_and_converted_to_rgb(tmp_path, mode, word):
    path = tmp_path / "a.png"
    Image.new("RGB", (12, 8), (200, 10, 10)).convert(mode).save(path)
    info, problems = inspect_image(path)
    assert [p.kind for p in problems] == ["image-mode"] and problems[0].repairable
    assert word in problems[0].message and info.mode == Image.open(path).mode
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)


def test_palette_with_transparency_goes_through_rgba(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.save(tmp_path / "t.png", transparency=0)
    assert open_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg_is_converted(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert kinds(tmp_path / "c.jpg") == ["image-mode"]
    assert open_image(tmp_path / "c.jpg").mode == "RGB"


def test_png_named_jpg_is_reported_and_read_by_content(tmp_path):
    Image.new("RGB", (6, 5), (0, 9, 0)).save(tmp_path / "fake.jpg", format="PNG")
    info, problems = inspect_image(tmp_path / "fake.jpg")
    assert info.format == "PNG"
    assert [p.kind for p in problems] == ["format-mismatch"]
    assert "content is PNG but the extension '.jpg' says JPEG" in problems[0].message
    assert open_image(tmp_path / "fake.jpg").size == (6, 5)


def test_jpeg_named_jpeg_or_upper_case_is_fine(tmp_path):
    for name in ("a.jpeg", "b.JPG"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="JPEG")
        assert kinds(tmp_path / name) == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_refused_not_filled_grey(tmp_path, fmt):
    path = truncated(tmp_path / f"t.{fmt.lower()}", fmt)
    assert kinds(path) == ["truncated-image"]
    with pytest.raises(DataError, match=r"t\.(jpeg|png): cannot read image: .*truncat") as info:
        open_image(path)
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    assert kinds(tmp_path / "nope.jpg") == ["missing-image"]
    (tmp_path / "text.jpg").write_text("hello, I am not a picture")
    assert kinds(tmp_path / "text.jpg") == ["unreadable-image"]
    with pytest.raises(DataError, match=r"text\.jpg: cannot read image"):
        open_image(tmp_path / "text.jpg")


def count_decoders(monkeypatch) -> list[tuple[str, str]]:
    """(mode, decoder name) of every pixel decoder Pillow creates from now on: decoding pixels starts there."""
    made: list[tuple[str, str]] = []
    real = Image._getdecoder

    def counting(mode, decoder_name, *args, **kwargs):
        made.append((mode, decoder_name))
        return real(mode, decoder_name, *args, **kwargs)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return made


@pytest.fixture
def decoders(monkeypatch) -> list[tuple[str, str]]:
    return count_decoders(monkeypatch)


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, decoders):
    bomb = png_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # 10 gigapixels, 30 GB decoded
    assert bomb.stat().st_size < 200
    assert kinds(bomb) == ["image-too-large"]
    with pytest.raises(DataError, match=r"bomb\.png: .*decompression bomb"):
        open_image(bomb)
    assert decoders == []  # refused on the header: not one pixel decoded
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")  # the count sees decoding when there is some
    assert open_image(tmp_path / "small.png").size == (20, 10)
    assert decoders == [("RGB", "zip")]


def test_our_pixel_limit_is_below_pillows(tmp_path, decoders):
    big = png_claiming(tmp_path / "big.png", 12_000, 10_000)  # 120 MP: Pillow only warns, we refuse
    info, problems = inspect_image(big)
    assert info is None and problems[0].kind == "image-too-large"
    assert decoders == []  # before decoding: Pillow alone would decode it
    assert "12000x10000 = 120.0 megapixels, over the limit of 100" in problems[0].message


def test_pixel_limit_can_be_lowered(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    assert kinds(tmp_path / "a.png", max_pixels=399) == ["image-too-large"]
    assert kinds(tmp_path / "a.png", max_pixels=400) == []
    with pytest.raises(DataError, match="over the limit"):
        open_image(tmp_path / "a.png", max_pixels=100)


def test_detect_opens_images_the_same_way(tmp_path, decoders):
    bomb = png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(DataError, match="decompression bomb"):
        detect_open_image(bomb)
    assert decoders == []
    Image.new("L", (5, 5)).save(tmp_path / "gray.jpg")
    assert detect_open_image(tmp_path / "gray.jpg").mode == "RGB"
