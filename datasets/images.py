"""Reading images safely: every mode to RGB, unreadable, truncated or decompression-bomb files named in a
one-line error.

A `BadImageError` says what is wrong with the file and to fix or remove it; `main.py` adds "or pass
--skip-bad-images" only when the command being run has that option (`BadImageError.skip_option`), so the
advice never names an option the command lacks. PIL's warnings about a file (corrupt EXIF, a truncated
tag) are held while it is decoded: repeated as warnings when the image reads, dropped when it does not
(the error line then says all there is, with nothing printed before it).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SKIP_OPTION = "--skip-bad-images"
_SHOWN: dict = {}  # the repeated warnings' registry: each is shown once, as the default filter does


class BadImageError(UserError):
    """An image file that cannot be decoded (the message names it); skippable where a command has
    `skip_option`."""

    skip_option = SKIP_OPTION


def _reason(err: Exception) -> str:
    text = str(err).strip()
    bomb = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", text)
    if bomb:  # PIL's DecompressionBombError
        pixels, limit = int(bomb.group(1)), int(bomb.group(2))
        return (
            f"{pixels:,} pixels, more than the {limit:,} decoded at most, a guard against decompression bombs"
        )
    return text.splitlines()[0] if text else type(err).__name__


def _bad(path, err: Exception) -> BadImageError:
    return BadImageError(f"cannot read image {path} ({_reason(err)}); fix or remove it")


@contextlib.contextmanager
def _decoding(path) -> Iterator[None]:
    """Hold the warnings raised while `path` is decoded; turn its decoding errors into BadImageError."""
    from PIL import Image, UnidentifiedImageError

    errors = (
        OSError,
        UnidentifiedImageError,
        SyntaxError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
    )
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            yield
        except errors as err:
            raise _bad(path, err) from None
    for w in held:  # the image read: its warnings are the user's to see, as they would have been
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_SHOWN, source=w.source)


def open_rgb(path: str | os.PathLike, draft: tuple[int, int] | None = None):
    """Decode an image fully and convert it to RGB (grayscale, palette, RGBA, CMYK all handled).

    `draft` (width, height): a JPEG is decoded at the smallest 1/2..1/8 scale that still covers that size
    (libjpeg's DCT scaling: much cheaper than decoding everything and resizing); other formats ignore it."""
    from PIL import Image

    with _decoding(path), Image.open(path) as img:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        return img.convert("RGB")


def image_header(path: str | os.PathLike) -> tuple[str | None, tuple[int, int], str]:
    """(format, (width, height), mode) from the file's header, without decoding the pixels."""
    from PIL import Image

    with _decoding(path), Image.open(path) as img:
        return img.format, img.size, img.mode


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
