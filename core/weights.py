"""Pretrained weight files fetched by URL (torchvision, FID networks): cached, verified, loaded as data only.

torch's own loaders trust whatever lies in the hub cache: the sha256 prefix in a file's name
(`resnet50-11ad3fa6.pth`) is checked only when the file is downloaded, and some loaders unpickle with
`weights_only=False`. A file planted in `$TORCH_HOME/hub/checkpoints/` would then run code. Here every use
checks the file's sha256 against the prefix in its name (or a digest the caller gives) and reads it with
`weights_only=True`, so a cached file is never more than tensors of the expected content.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from core.atomic import atomic_path
from core.errors import UserError

# torch.hub's convention: the file name carries a prefix of its sha256 after the last dash.
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def hub_dir() -> Path:
    """Where torch keeps downloaded weights: $TORCH_HOME/hub/checkpoints (torch.hub's own rule)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_prefix(url: str) -> str:
    match = HASH_IN_NAME.search(os.path.basename(url))
    if not match:
        raise ValueError(f"{url} carries no sha256 prefix in its file name; pass the digest explicitly")
    return match.group(1)


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def _download(url: str, path: Path, prefix: str, what: str, hint: str) -> None:
    import torch

    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=prefix, progress=False)
    except PermissionError:
        raise UserError(
            f"cannot write {what} to {path.parent}: permission denied (set $TORCH_HOME)"
        ) from None
    except Exception as err:  # URLError, socket errors, a hash mismatch of the download
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what} are not cached and could not be downloaded ({reason[:100]}); {hint}"
        ) from None


def cached_file(url: str, what: str, hint: str, sha256_prefix: str | None = None) -> Path:
    """The verified local copy of `url` in the hub cache, downloaded first when missing.

    `hint` tells the user what to do when the file is neither cached nor downloadable (e.g. which
    `prefetch` command to run on a machine with internet).
    """
    prefix = sha256_prefix or expected_prefix(url)
    path = hub_dir() / os.path.basename(url)
    if not path.is_file():
        _download(url, path, prefix, what, hint)
    if not sha256_of(path).startswith(prefix):
        raise UserError(
            f"{path} does not have the content its name promises (sha256 does not start with {prefix}); "
            "it was corrupted or replaced: delete it and fetch it again"
        )
    return path


def load_url_state_dict(url: str, what: str, hint: str, sha256_prefix: str | None = None) -> dict:
    """The state dict at `url`, from the verified cache, read with `weights_only=True`."""
    import torch

    path = cached_file(url, what, hint, sha256_prefix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        from core.checkpoint import load_error_reason

        raise UserError(f"cannot read {path} as plain weights: {load_error_reason(err)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state
