"""Reading images safely: every mode to RGB, unreadable or truncated files named in a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class BadImageError(UserError):
    """An image file that cannot be decoded."""


def _bad(path, err: Exception) -> BadImageError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return BadImageError(f"cannot read image {path} ({reason}); fix or remove it, or pass --skip-bad-images")


def open_rgb(path: str | os.PathLike, draft: tuple[int, int] | None = None):
    """Decode an image fully and convert it to RGB (grayscale, palette, RGBA, CMYK all handled).

    `draft` (width, height): a JPEG is decoded at the smallest 1/2..1/8 scale that still covers that size
    (libjpeg's DCT scaling: much cheaper than decoding everything and resizing); other formats ignore it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise _bad(path, err) from None


def image_header(path: str | os.PathLike) -> tuple[str | None, tuple[int, int], str]:
    """(format, (width, height), mode) from the file's header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format, img.size, img.mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise _bad(path, err) from None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
