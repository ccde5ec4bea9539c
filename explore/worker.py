"""One inference worker: every model call of the page runs on this thread, one at a time, in arrival order.

Requests carry a slot (a browser tab's slider, its image choice ...). A request that a newer one of the same
slot replaces before it started is dropped (`Superseded`) and the newer one takes its place in the queue, so
dragging a slider never queues up work: at most one render per slot waits while another runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class Superseded(Exception):
    """A newer request of the same slot replaced this one before it ran."""


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class InferenceWorker:
    """`worker.run(slot, fn)` runs `fn()` on the worker thread and returns its result (or raises its error,
    or `Superseded`). `slot=None` never coalesces."""

    def __init__(self, name: str = "explore-inference"):
        self._pending: OrderedDict[Hashable, _Job] = OrderedDict()
        self._cond = threading.Condition()
        self._stopped = False
        self.ran = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, slot: Hashable | None, fn: Callable[[], Any]) -> _Job:
        job = _Job(fn)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the inference worker has stopped")
            key = object() if slot is None else slot
            old = self._pending.get(key)
            if old is not None:  # replaced in place: the slot keeps its turn in the queue
                old.error = Superseded()
                old.done.set()
                self.dropped += 1
            self._pending[key] = job
            self._cond.notify()
        return job

    def run(self, slot: Hashable | None, fn: Callable[[], Any]) -> Any:
        job = self.submit(slot, fn)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    for job in self._pending.values():
                        job.error = RuntimeError("the server is stopping")
                        job.done.set()
                    self._pending.clear()
                    return
                _, job = self._pending.popitem(last=False)
            try:
                job.result = job.fn()
            except BaseException as error:  # handed to the waiting request, which reports it
                job.error = error
            self.ran += 1
            job.done.set()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
