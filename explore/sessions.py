"""Per browser tab state. Each page load draws a random session id that every request carries
(`X-Explore-Session`), so two tabs of one browser never see each other's chosen image or sliders."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

from core.errors import UserError

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class Sessions:
    """State dicts keyed by (session, tab); the least recently used sessions beyond `limit` are forgotten."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._states: OrderedDict[str, dict[str, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def state(self, session: str | None, tab: str) -> dict:
        if session is None or not SESSION_ID.match(session):
            raise UserError("this request carries no valid session id; reload the page")
        with self._lock:
            tabs = self._states.pop(session, None) or {}
            self._states[session] = tabs
            while len(self._states) > self.limit:
                self._states.popitem(last=False)
            return tabs.setdefault(tab, {})
