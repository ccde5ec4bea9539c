"""Bad image files in one line: a 109 KB PNG of 30000 x 30000 pixels (a decompression bomb) named, skipped
and counted where the command can skip; the `--skip-bad-images` advice only where the command has that
option; PIL's warnings about a file that then fails to read never printed before the error line."""

from __future__ import annotations

import io
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_main

from datasets.images import BadImageError, image_header, open_rgb

BOMB_MESSAGE = (
    "cannot read image {path} (900,000,000 pixels, more than the 178,956,970 decoded at most, a guard against "
    "decompression bombs); fix or remove it"
)


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG of side x side black 1-bit pixels: 109 KB on disk, 900 megapixels decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def corrupt_exif_jpeg(truncated: bool) -> bytes:
    """A JPEG whose EXIF block points past its end (PIL warns while reading it), cut in half if asked."""
    from PIL import Image

    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x0f\x00\x02\x00\x00\x00\x20\x00\x00\x00\x50"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    return data[: len(data) // 2] if truncated else data


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")
    assert path.stat().st_size < 110_000
    return path


def _world_copy(small_world: Path, dst: Path, content: bytes, every: bool = True) -> Path:
    """The small world under `dst` (as --data-dir) with every image (or the first) replaced by `content`."""
    world = shutil.copytree(small_world.parent, dst / small_world.parent.name)
    images = sorted((world / "CUB_200_2011" / "images").rglob("*.png"))
    for image in images if every else images[:1]:
        image.write_bytes(content)
    return dst


def test_a_decompression_bomb_is_a_bad_image(bomb):
    from datasets.transforms import decode_rgb

    for read in (image_header, open_rgb, lambda p: decode_rgb(p, None, 32)):
        with pytest.raises(BadImageError) as err:
            read(bomb)
        assert err.value.message == BOMB_MESSAGE.format(path=bomb)


def test_a_bomb_is_skipped_and_counted_where_the_command_skips(
    bomb, small_world, tmp_path, capsys, monkeypatch
):
    from datasets.cub import CUBDataset

    root = shutil.copytree(small_world, tmp_path / "world")
    shutil.copy(bomb, CUBDataset(root, "train").image_path(0))
    assert CUBDataset(root, "train", skip_bad_images=True)[0] is None
    with pytest.raises(BadImageError, match="decompression bombs"):
        CUBDataset(root, "train")[0]

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(bomb, folder / "bomb.png")
    for image in sorted((small_world / "images").rglob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_main(("vdna", "make", str(folder), "--out", str(tmp_path / "v"), "-e", "rand_resnet50",
                       "--image-size", "32", "--distribution", "gaussian", "-q"), capsys, monkeypatch)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "VDNA of 2 images" in result.stdout and f"skipped 1 unreadable images in {folder}" in result.stdout


def test_the_skip_advice_follows_the_command(bomb, small_world, tmp_path, capsys, monkeypatch):
    """A command with --skip-bad-images (every trainer: the shared data options) names it in its error; one
    without it does not. The stderr of `train cvae` (a real process, so that warnings would show) is that one
    line, without the warnings PIL raised about the corrupt file first."""
    import main

    assert all(main.has_option("--skip-bad-images", c.split()) for c in ("train classifier", "train cvae",
                                                                       "retrieve query"))  # fmt: skip
    assert not any(main.has_option("--skip-bad-images", c.split()) for c in ("test classifier",
                                                                           "generate interpolate"))  # fmt: skip
    data = _world_copy(small_world, tmp_path / "bombs", bomb.read_bytes())
    result = run_main(("train", "classifier", "--world", "small", "--data-dir", str(data), "--epochs", "1",
                       "--device", "cpu", "--quiet", "--out", str(tmp_path / "c")), capsys, monkeypatch)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: cannot read image ")
    path = result.stderr.split("cannot read image ", 1)[1].split(" (", 1)[0]
    assert result.stderr.strip() == "error: " + BOMB_MESSAGE.format(path=path) + ", or pass --skip-bad-images"

    data = _world_copy(small_world, tmp_path / "exif", corrupt_exif_jpeg(truncated=True))
    done = run_cli("train", "cvae", "--world", "small", "--data-dir", str(data), "--steps", "1", "--device", "cpu",
                   "--out", str(tmp_path / "v"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    path = done.stderr.split("cannot read image ", 1)[1].split(" (", 1)[0]
    assert Path(path).parent.parent.name == "images"
    assert (
        done.stderr
        == f"error: cannot read image {path} (image file is truncated (128 bytes not processed)); fix or remove it"
        ", or pass --skip-bad-images\n"
    )


def test_pil_warnings_are_held_for_a_bad_file_and_kept_for_a_good_one(tmp_path):
    bad, good = tmp_path / "bad.jpg", tmp_path / "good.jpg"
    bad.write_bytes(corrupt_exif_jpeg(truncated=True))
    good.write_bytes(corrupt_exif_jpeg(truncated=False))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(BadImageError):
            open_rgb(bad)
        assert shown == []
        assert open_rgb(good).size == (64, 64)
    assert any("Corrupt EXIF data" in str(w.message) for w in shown)
