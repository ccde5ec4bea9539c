"""The page's views, one per kind of source: Concepts (VisCoIN), Retrieval, Generation (Phylo-NN, CVAE), Runs.

A view loads its model once, describes itself to the page (`describe`) and answers the page's requests
(`actions`: name -> (HTTP method, handler)). Handlers take a `Request` and return a JSON-able dict or a
`Blob`; model calls go through the shared inference worker."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError


class NotFound(UserError):
    status = 404


class TooLarge(UserError):
    status = 413


@dataclass
class Blob:
    data: bytes
    content_type: str = "image/png"
    cache: bool = True  # the same URL always answers the same bytes while the server runs


@dataclass
class Request:
    params: dict[str, str]
    body: bytes = b""
    content_type: str = ""
    filename: str = "upload"
    session: str | None = None
    state: dict = field(default_factory=dict)  # this browser tab's state for this view

    @property
    def is_upload(self) -> bool:
        return not self.content_type.startswith("application/json")

    def json(self) -> dict:
        if not self.body:
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise UserError("the request body is not JSON") from None
        if not isinstance(value, dict):
            raise UserError("the request body must be a JSON object")
        return value


@dataclass
class Context:
    """What every view shares: the worker, the device and the command's options."""

    worker: Any
    device: Any
    options: Any


def integer(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a one-line UserError naming `name`."""
    try:
        number = int(value)
        if isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise UserError(f"{name} must be in {low}..{high}, got {number}")
    return number


def number(value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """`value` as a finite float in [low, high], or a one-line UserError naming `name`."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(result) or not low <= result <= high:
        raise UserError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return result


def finite(value: float, digits: int = 6) -> float | None:
    """A float for JSON: rounded, None for NaN and infinities."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


class Cache:
    """A small thread-safe LRU of computed bytes (thumbnails)."""

    def __init__(self, size: int = 2048):
        import threading

        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, compute):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class View:
    kind = ""

    def __init__(self, tab_id: str, source, ctx: Context):
        self.id, self.source, self.ctx = tab_id, source, ctx

    @property
    def title(self) -> str:
        return self.source.name

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "title": self.title, "source": str(self.source.path)}

    def actions(self) -> dict:
        return {}

    def slot(self, request: Request, name: str) -> tuple:
        """The worker slot of this browser tab's `name` requests: a newer one replaces a waiting older one."""
        return (request.session, self.id, name)


def build_view(tab_id: str, source, ctx: Context) -> View:
    """The view of a recognised source (models loaded now, so that a bad input stops the command at start)."""
    if source.kind == "concepts":
        from explore.views.concepts import ConceptsView as cls
    elif source.kind == "retrieval":
        from explore.views.retrieval import RetrievalView as cls
    elif source.kind == "phylo":
        from explore.views.phylo import PhyloView as cls
    elif source.kind == "cvae":
        from explore.views.cvae import CVAEView as cls
    elif source.kind == "runs":
        from explore.views.runs import RunsView as cls
    else:  # recognise() never returns another kind
        raise ValueError(f"no view for source kind {source.kind!r}")
    return cls(tab_id, source, ctx)
