"""hyperbooth.images: every kind of user photo loads as upright square RGB, or fails in one line."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbooth import images
from hyperbooth.errors import HyperboothError
from hyperbooth.images import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    collect_images,
    load_image,
    load_images,
    save_png,
    to_pil,
    to_tensor,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str):
    """An image whose left half is one colour and right half another."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    """One RGB pixel as an int array, for tolerant comparisons after JPEG."""
    return np.asarray(image, dtype=np.int64)[y, x]


def close(actual: np.ndarray, expected: tuple[int, int, int], tolerance: int = 24) -> bool:
    """Whether a pixel is within tolerance of a colour on every channel (JPEG is lossy)."""
    return bool(np.all(np.abs(actual - np.array(expected)) <= tolerance))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR + IEND claiming width x height: cheap to write, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def expect_error(path: Path, call) -> str:
    """Run call, check it raises a one-line HyperboothError naming path, return the message."""
    with pytest.raises(HyperboothError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    return message


# Conversions ------------------------------------------------------------------------------


def test_grayscale_is_replicated_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (40, 40), 77).save(path)
    image = load_image(path, 32)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.all(np.asarray(image) == 77)


def test_rgba_transparency_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    halves((64, 64), (0, 0, 255, 0), (255, 0, 0, 255), "RGBA").save(path)
    image = load_image(path, 64)
    assert tuple(pixel(image, 5, 32)) == WHITE
    assert tuple(pixel(image, 58, 32)) == RED


def test_gray_alpha_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    halves((64, 64), (0, 0), (30, 255), "LA").save(path)
    image = load_image(path, 64)
    assert tuple(pixel(image, 5, 32)) == WHITE
    assert tuple(pixel(image, 58, 32)) == (30, 30, 30)


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (64, 64), 0)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 32, 64))
    image.save(path, transparency=1)  # palette entry 1 (blue, left half) is transparent
    loaded = load_image(path, 64)
    assert tuple(pixel(loaded, 5, 32)) == WHITE
    assert tuple(pixel(loaded, 58, 32)) == RED


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    image = load_image(path, 32)
    assert image.mode == "RGB"
    assert close(pixel(image, 16, 16), RED)


def test_16_bit_png_keeps_its_gradient(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (256, 1))).save(path)
    assert Image.open(path).mode == "I;16"  # the case under test, not an 8-bit fallback
    row = np.asarray(load_image(path, 64), dtype=np.int64)[32, :, 0]
    assert np.all(np.diff(row) >= 0)
    assert row[0] <= 5 and row[-1] >= 250
    assert 100 <= row[32] <= 155  # the middle is mid-gray, not saturated white


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", np.array([[0, 65535]], dtype=np.int32), (0, 255)),  # 16-bit data in 32-bit ints
        ("I", np.array([[0, 255]], dtype=np.int32), (0, 255)),  # 8-bit data in 32-bit ints
        ("F", np.array([[0.0, 1.0]], dtype=np.float32), (0, 255)),  # unit floats
        ("F", np.array([[-5.0, 5.0]], dtype=np.float32), (0, 255)),  # no convention: stretched
    ],
)
def test_deep_grayscale_range(tmp_path: Path, mode: str, values: np.ndarray, expected) -> None:
    path = tmp_path / f"deep_{mode}.tif"
    image = Image.fromarray(np.repeat(np.repeat(values, 32, axis=0), 32, axis=1))
    assert image.mode == mode
    image.save(path)
    loaded = load_image(path, 64)
    assert (pixel(loaded, 8, 32)[0], pixel(loaded, 56, 32)[0]) == expected


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate 90 degrees clockwise
    halves((128, 64), RED, BLUE, "RGB").save(path, exif=exif, quality=95)
    image = load_image(path, 64)
    # Rotated clockwise the stored 128x64 stands 64x128 with the red left half on top; the
    # centre crop keeps rows 32..96, so red above the middle and blue below.
    assert close(pixel(image, 32, 8), RED) and close(pixel(image, 32, 56), BLUE)
    assert close(pixel(image, 4, 8), RED) and close(pixel(image, 60, 8), RED)


@pytest.mark.parametrize("size", [(96, 32), (32, 96)])
def test_centre_crop_keeps_the_middle(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "bands.png"
    bands = Image.new("RGB", size, RED)
    if size[0] > size[1]:
        bands.paste(GREEN, (32, 0, 64, 32))
        bands.paste(BLUE, (64, 0, 96, 32))
    else:
        bands.paste(GREEN, (0, 32, 32, 64))
        bands.paste(BLUE, (0, 64, 32, 96))
    bands.save(path)
    image = load_image(path, 32)
    assert image.size == (32, 32)
    assert np.all(np.asarray(image) == np.array(GREEN, dtype=np.uint8))


def test_small_photo_upscales_and_large_one_downscales(tmp_path: Path) -> None:
    small, large = tmp_path / "small.png", tmp_path / "large.jpg"
    Image.new("RGB", (40, 50), GREEN).save(small)
    Image.new("RGB", (1200, 900), BLUE).save(large)
    assert load_image(small, 64).size == (64, 64)  # 40 >= default min_size 32
    loaded = load_image(large, 64)
    assert loaded.size == (64, 64) and close(pixel(loaded, 32, 32), BLUE)


def test_load_images_reads_a_folder_in_order(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), BLUE).save(tmp_path / "b.png")
    Image.new("RGB", (32, 32), RED).save(tmp_path / "a.png")
    loaded = load_images(tmp_path, 16)
    assert [tuple(pixel(image, 0, 0)) for image in loaded] == [RED, BLUE]


# Collecting paths ---------------------------------------------------------------------------


def test_collect_images_folder_rules(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", "._a.jpg", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "d.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    assert [path.name for path in collect_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]
    assert [path.name for path in collect_images(str(tmp_path))] == ["a.JPG", "b.png", "c.webp"]


def test_collect_images_mixes_files_and_folders_without_duplicates(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["x.png", "y.png"]:
        (folder / name).write_bytes(b"")
    single = tmp_path / "z.tiff"
    single.write_bytes(b"")
    found = collect_images([single, folder, str(folder / "x.png")])
    assert [path.name for path in found] == ["z.tiff", "x.png", "y.png"]
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def test_collect_images_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images in folder" in expect_error(empty, lambda: collect_images(empty))
    others = tmp_path / "others"
    others.mkdir()
    (others / "readme.txt").write_text("hi")
    (others / "clip.gif").write_bytes(b"GIF89a")
    message = expect_error(others, lambda: collect_images(others))
    assert "no images in folder" in message and ".png" in message and "clip.gif" in message
    text = tmp_path / "a.txt"
    text.write_text("hi")
    assert "not an image file" in expect_error(text, lambda: collect_images([text]))
    missing = tmp_path / "gone.png"
    assert "image not found" in expect_error(missing, lambda: collect_images(missing))
    with pytest.raises(HyperboothError, match="no images given"):
        collect_images([])


# Bad files ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.png"
    assert "image not found" in expect_error(path, lambda: load_image(path, 64))


def test_file_name_with_newline_stays_one_line(tmp_path: Path) -> None:
    path = tmp_path / "two\nlines.png"
    message = expect_error(Path("lines.png"), lambda: load_image(path, 64))
    assert "two lines.png" in message


def test_corrupt_bytes(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a readable image" in expect_error(path, lambda: load_image(path, 64))


def test_text_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    message = expect_error(path, lambda: load_image(path, 64))
    assert "cannot identify image file" in message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_errors_instead_of_loading_gray(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable image" in expect_error(path, lambda: load_image(path, 64))


def test_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", (20, 30)).save(path)
    message = expect_error(path, lambda: load_image(path, 128))
    assert "image too small" in message and "20x30" in message and "64 px" in message
    assert load_image(path, 128, min_size=16).size == (128, 128)


@pytest.mark.parametrize("side", [100_000, 10_000, 8_001])
def test_too_large_from_header_alone(tmp_path: Path, side: int) -> None:
    # 100000^2 trips PIL's own bomb error, 10000^2 its warning, 8001^2 only our limit.
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = expect_error(path, lambda: load_image(path, 64))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "image too large" in message and f"{MAX_PIXELS:,}" in message
    assert "Decompression" not in message and "DOS" not in message


def test_pixel_limit_is_read_at_call_time(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "medium.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 5_000)
    message = expect_error(path, lambda: load_image(path, 64))
    assert "100x100" in message and "5,000" in message


# Tensors and saving ---------------------------------------------------------------------------


def test_tensor_round_trip() -> None:
    array = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    tensor = to_tensor(Image.fromarray(array))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 8, 12)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(to_pil(tensor)), array)
    clamped = to_pil(torch.full((3, 2, 2), 5.0))
    assert np.all(np.asarray(clamped) == 255)
    with pytest.raises(ValueError):
        to_pil(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError):
        to_tensor(Image.new("L", (2, 2)))


def test_save_png_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "deeper" / "image.png"
    save_png(Image.new("RGB", (8, 8), RED), path)
    save_png(Image.new("RGB", (8, 8), BLUE), path)  # overwrite in place
    assert tuple(pixel(Image.open(path).convert("RGB"), 0, 0)) == BLUE
    assert sorted(p.name for p in path.parent.iterdir()) == ["image.png"]


def test_save_png_disk_full_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8), RED), path)
    before = path.read_bytes()

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    message = expect_error(path, lambda: save_png(Image.new("RGB", (8, 8), BLUE), path))
    assert "disk space" in message
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
    fresh = tmp_path / "new.png"
    expect_error(fresh, lambda: save_png(Image.new("RGB", (8, 8)), fresh))
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
