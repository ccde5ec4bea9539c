"""CUB-200-2011 through kagglehub, pinned to one dataset version, honouring `KAGGLEHUB_CACHE`."""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError

CUB_HANDLE = "wenewone/cub2002011"
CUB_VERSION = 7
OFFLINE_HINT = "run `python main.py prefetch cub` on a machine with internet, or pass --data-dir to a copy"


def cub_handle() -> str:
    return f"{CUB_HANDLE}/versions/{CUB_VERSION}"


def download_cub(force: bool = False) -> Path:
    """Path of the pinned CUB copy in the kagglehub cache, downloading it when needed.

    A complete cached copy is returned without touching the network; an uncached copy on a machine
    without internet gives one line saying what to do.
    """
    import logging

    try:
        import kagglehub
    except ModuleNotFoundError:
        raise UserError(
            "CUB-200-2011 comes through kagglehub, which is not installed: `pip install kagglehub` and "
            f"{OFFLINE_HINT}"
        ) from None

    logging.getLogger("kagglehub").setLevel(logging.ERROR)
    try:
        path = kagglehub.dataset_download(cub_handle(), force_download=force)
    except Exception as err:  # kagglehub and requests raise many types for "no network"/"not found"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"CUB-200-2011 is not cached and could not be downloaded ({reason[:120]}); {OFFLINE_HINT}"
        ) from None
    return Path(path)
