"""The root of every on-disk cache: $BIOVIS_CACHE, else ~/.cache/biovis."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$BIOVIS_CACHE, else ~/.cache/biovis (read at every call, so tests can point it elsewhere)."""
    return Path(os.environ.get("BIOVIS_CACHE") or Path.home() / ".cache" / "biovis")
