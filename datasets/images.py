"""Reading images safely: every mode to RGB, unreadable or truncated files named in a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class BadImageError(UserError):
    """An image file that cannot be decoded."""


def open_rgb(path: str | os.PathLike):
    """Decode an image fully and convert it to RGB (grayscale, palette, RGBA, CMYK all handled)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadImageError(
            f"cannot read image {path} ({reason}); fix or remove it, or pass --skip-bad-images"
        ) from None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
