"""Images for the page: PNG bytes as the CLI writes them, data URLs, uploads checked, heat-map overlays."""

from __future__ import annotations

import base64
import io

import numpy as np

from core.errors import UserError

MAX_PIXELS = 40_000_000  # an upload larger than this is refused before it is decoded


def pngs(images) -> list[bytes]:
    """[-1, 1] RGB images (N, 3, H, W) as PNG bytes, through the CLI's own conversion and PNG writer."""
    from datasets.transforms import to_uint8_images
    from testing.sampling import png_bytes

    return [png_bytes(image) for image in to_uint8_images(images)]


def png_of(pixels: np.ndarray) -> bytes:
    """One HWC uint8 image as PNG bytes (the CLI's writer)."""
    from testing.sampling import png_bytes

    return png_bytes(np.ascontiguousarray(pixels))


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def open_upload(data: bytes, name: str):
    """An uploaded file as a PIL RGB image; a one-line UserError when it is empty or not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError(f"the upload {name!r} is empty; choose an image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise UserError(
                    f"{name!r} has {width}x{height} pixels, more than {MAX_PIXELS // 1_000_000} megapixels; "
                    "upload a smaller image"
                )
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{name!r} is not an image that can be read ({reason[:120]}); upload a PNG or JPEG"
        ) from None


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An HWC uint8 image with a [0, 1] heat map drawn over it in the jet colormap (as `concepts heatmaps`)."""
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.round((1 - alpha) * image.astype(np.float64) + alpha * colours).clip(0, 255).astype(np.uint8)
