"""User photos in, square RGB images and [-1, 1] tensors out; PNGs written atomically.

Every problem with a user's file becomes one HyperboothError line naming the file and the fix.
docs/INPUT_IMAGES.md lists the rules.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hyperbooth.atomic import atomic_file
from hyperbooth.errors import HyperboothError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS: int = 64_000_000  # width * height; a 64 MP photo decodes to ~200 MB as RGB

_SUFFIX_LIST = ", ".join(IMAGE_SUFFIXES)
_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def collect_images(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (non-recursive, sorted, image suffixes only) and files into a list of image paths."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise _error("no images given (pass --images with a folder or image files)")
    found: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        if str(item) == "":
            # Path("") is the current directory; scanning it silently would surprise.
            raise _error("empty image path given (pass a folder or image files to --images)")
        path = Path(item)
        try:
            candidates = _expand(path)
            keys = [candidate.resolve() for candidate in candidates]
        except OSError as error:
            raise _error(
                f"cannot read {path}: {_reason(error)} (check the path's permissions)"
            ) from error
        for candidate, key in zip(candidates, keys, strict=True):
            # A file named twice (or named and inside a named folder) is one photo, not two.
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def load_image(
    path: str | os.PathLike[str], resolution: int, min_size: int | None = None
) -> Image.Image:
    """Open a user image as RGB, upright, centre-cropped to a square and resized to resolution x resolution."""
    if resolution < 1:
        raise _error(f"resolution must be a positive number of pixels, got {resolution}")
    if min_size is None:
        min_size = default_min_size(resolution)
    path = Path(path)
    image = _open_upright(path, resolution, min_size)
    rgb = _to_rgb(image, path)
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # resize with a box crops and resamples in one pass, and skips PIL's crop-size bomb check.
    return rgb.resize(
        (resolution, resolution),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
    )


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a user image as RGB and upright at its own size (the one-line errors of load_image)."""
    path = Path(path)
    return _to_rgb(_open_upright(path, 1, 1), path)


def load_images(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    resolution: int,
    min_size: int | None = None,
) -> list[Image.Image]:
    """Collect and load every image in inputs; the first bad file raises."""
    return [load_image(path, resolution, min_size) for path in collect_images(inputs)]


def default_min_size(resolution: int) -> int:
    """Shortest accepted side for a resolution: half of it, so no photo is upscaled more than 2x."""
    return max(resolution // 2, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an RGB image to a float32 tensor of shape (3, H, W) with values in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(
            f"to_tensor expects an RGB image, got mode {image.mode!r} (use load_image)"
        )
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3), a writable copy
    return pixels.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Convert a (3, H, W) tensor in [-1, 1] to an RGB image; values outside are clamped."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    values = tensor.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(values).any():
        # NaN has no colour; clamping would hide a diverged model behind black pixels.
        raise ValueError("to_pil got NaN values (the model output diverged)")
    pixels = ((values.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write image as PNG at path atomically: readers see the old file or the whole new one."""
    with atomic_file(path) as temporary, open(temporary, "xb") as file:
        image.save(file, format="PNG")
        file.flush()
        os.fsync(file.fileno())


def _expand(path: Path) -> list[Path]:
    """The image files one --images entry stands for: itself, or a folder's images."""
    if path.is_dir():
        return _images_in_folder(path)
    if not path.exists():
        raise _error(f"image not found: {path} (check the path)")
    if not path.is_file():
        raise _error(f"not an image file: {path} is not a regular file (pass image files)")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise _error(f"not an image file: {path} (expected one of {_SUFFIX_LIST})")
    return [path]


def _images_in_folder(folder: Path) -> list[Path]:
    """Image files directly inside folder, sorted by name so runs are reproducible."""
    # Dot-files are skipped: macOS copies leave "._IMG_0001.jpg" metadata stubs beside photos.
    entries = sorted(
        (entry for entry in folder.iterdir() if not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )
    images = [
        entry for entry in entries if entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
    ]
    if not images:
        if entries:
            more = ", ..." if len(entries) > 3 else ""
            found = "found only " + ", ".join(entry.name for entry in entries[:3]) + more
        else:
            found = "it is empty"
        raise _error(f"no images in folder {folder} (looked for {_SUFFIX_LIST}; {found})")
    return images


def _open_upright(path: Path, resolution: int, min_size: int) -> Image.Image:
    """Decode path after checking its header size; the result is loaded and EXIF-upright."""
    try:
        # Image.open reads only the header. PIL warns past its own limit (~89 MP) and raises
        # past twice that; our smaller MAX_PIXELS check below decides, so its warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise _bomb_error(path, error) from error
    except UnidentifiedImageError as error:
        raise _error(
            f"not a readable image: {path} (cannot identify image file; pass PNG/JPEG/WebP)"
        ) from error
    except FileNotFoundError as error:
        raise _error(f"image not found: {path} (check the path)") from error
    except IsADirectoryError as error:
        raise _error(f"not an image file: {path} is a folder (pass an image file)") from error
    except PermissionError as error:
        raise _error(f"cannot read {path}: permission denied (check its permissions)") from error
    except OSError as error:
        raise _error(f"not a readable image: {path} ({_reason(error)})") from error

    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _error(
                f"image too large: {path} has {width}x{height} pixels, "
                f"limit is {MAX_PIXELS:,} (downscale it first)"
            )
        if min(width, height) < min_size:
            raise _error(
                f"image too small: {path} is {width}x{height}, need at least {min_size} px "
                "on the short side (use a larger photo)"
            )
        # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale while both sides stay
        # >= resolution, so a 48 MP phone photo does not cost a full-size decode.
        image.draft(None, (resolution, resolution))
        try:
            image.load()
        except Exception as error:
            # PIL signals damaged data with many types (OSError, SyntaxError, EOFError,
            # struct.error, ValueError); all mean the same thing to the user.
            raise _error(
                f"not a readable image: {path} ({_reason(error)}; re-export or re-download it)"
            ) from error
        try:
            return ImageOps.exif_transpose(image)
        except Exception as error:
            # Ignoring a broken orientation tag could train on a sideways face.
            raise _error(
                f"unreadable EXIF orientation in {path} ({_reason(error)}; re-save the photo)"
            ) from error


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white."""
    alpha: Image.Image | None = None
    if image.mode.startswith("I") or image.mode == "F":
        alpha = _transparency_mask(image)
        image = _deep_gray_to_l(image, path)
    elif image.mode == "1":
        image = image.convert("L")
    try:
        if alpha is not None:
            image.putalpha(alpha)  # L -> LA
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            # convert("RGBA") turns palette/tRNS transparency into an alpha channel as well.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")  # L replicates, CMYK/YCbCr/P via PIL's conversions
    except ValueError as error:
        raise _error(
            f"unsupported colour mode {image.mode} in {path} ({_reason(error)}; "
            "save it as an 8-bit RGB PNG or JPEG)"
        ) from error


def _deep_gray_to_l(image: Image.Image, path: Path) -> Image.Image:
    """Scale 16/32-bit integer or float grayscale to 8 bits without clipping."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise _error(f"not a readable image: {path} has NaN or infinite pixel values")
    if image.mode.startswith("I;16"):
        # The declared bit depth, not the image's maximum: a dark photo stays dark.
        low, high = 0.0, 65535.0
    else:
        # 'I' and 'F' declare no range: use the usual conventions, else stretch min..max.
        lowest, highest = float(values.min()), float(values.max())
        if image.mode == "F" and lowest >= 0.0 and highest <= 1.0:
            low, high = 0.0, 1.0
        elif lowest >= 0.0 and highest <= 255.0:
            low, high = 0.0, 255.0
        elif lowest >= 0.0 and highest <= 65535.0:
            low, high = 0.0, 65535.0
        else:
            low, high = lowest, max(highest, lowest + 1.0)
    scaled = np.round((values - low) / (high - low) * 255.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _transparency_mask(image: Image.Image) -> Image.Image | None:
    """Alpha for a deep grayscale image with a single transparent value (PNG tRNS), else None."""
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return None
    opaque = np.asarray(image) != transparent
    return Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8))


def _bomb_error(path: Path, error: Exception) -> HyperboothError:
    """Our message for PIL's DecompressionBombError, raised before we can read the size."""
    # PIL reports only the pixel count ("Image size (N pixels) exceeds ...").
    match = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    # Another library may have lowered Image.MAX_IMAGE_PIXELS below ours.
    limit = MAX_PIXELS
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, 2 * Image.MAX_IMAGE_PIXELS)
    return _error(f"image too large: {path} has {size}, limit is {limit:,} (downscale it first)")


def _reason(error: BaseException) -> str:
    """The human part of an exception: strerror for OS errors, else the message or type."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


def _error(message: str) -> HyperboothError:
    """The user-facing error, forced onto one line (file names and PIL messages may hold newlines)."""
    return HyperboothError(" ".join(message.splitlines()))
