"""The explore page's test servers, built once per test session and shared by the API and browser tests.

Sources: the tiny VisCoIN bundle (helpers_viscoin), a retrieval model trained for two epochs on the small
world, the tiny Phylo-NN and CVAE runs (helpers_generate, shared with the generation tests) and the folder
holding the VisCoIN ensemble's runs (classifier and VisCoIN logs). The server runs in this process on a thread,
on a free port; `client(server)` sends requests as the page does."""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

_BUILT: dict = {}


@dataclass
class Sources:
    bundle: Path
    retrieval: Path
    retrieval_data: Path
    phylo: Path
    cvae: Path
    runs: Path
    cache: Path


def retrieval_run(root: Path) -> Path:
    from training.retrieval import RetrievalConfig, train_retrieval

    run = root / "retrieval"
    if not (run / "best.safetensors").is_file():
        cfg = RetrievalConfig.preset("tiny", {"world": "small", "epochs": 2, "batch_size": 16,
                                     "eval_every": 3, "device": "cpu", "num_workers": 0})  # fmt: skip
        train_retrieval(cfg, run, quiet=True)
    return run


def session_sources(tmp_path_factory) -> Sources:
    """Every model the page opens in the tests, trained once per session (about 15 s on two cores)."""
    if "sources" in _BUILT:
        return _BUILT["sources"]
    from helpers_generate import cvae, phylo, single_threaded
    from helpers_viscoin import session_viscoin

    base = tmp_path_factory.getbasetemp()
    root = base / "explore"
    root.mkdir(exist_ok=True)
    tiny = session_viscoin(tmp_path_factory)
    with single_threaded():
        retrieval = retrieval_run(root)
    from core.checkpoint import read_meta

    data = Path(read_meta(retrieval / "best.safetensors")["dataset"]["path"])
    _BUILT["sources"] = Sources(tiny.bundle, retrieval, data, phylo(base), cvae(base), tiny.run_dir.parent,
                                root / "cache")  # fmt: skip
    return _BUILT["sources"]


@dataclass
class Server:
    server: object  # explore.server.ExploreServer
    thread: threading.Thread
    sources: Sources

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def app(self):
        return self.server.app

    def view(self, kind: str):
        return next(v for v in self.app.views.values() if v.kind == kind)


def start_server(sources: Sources, **options) -> Server:
    """`explore` on a thread (port 0), with the options given; returns once it answers."""
    from explore.app import Options, serve

    ready = threading.Event()
    holder = {}

    def on_ready(server):
        holder["server"] = server
        ready.set()

    paths = options.pop("paths", None) or [
        sources.bundle,
        sources.retrieval,
        sources.phylo,
        sources.cvae,
        sources.runs,
    ]
    opts = Options(list(paths), **{"port": 0, "device": "cpu", "quiet": True, **options})
    errors = []

    def run():
        try:
            serve(opts, ready=on_ready)
        except BaseException as error:  # reported by the test that waits
            errors.append(error)
            ready.set()

    mp = pytest.MonkeyPatch()
    mp.setenv("BIOVIS_CACHE", str(sources.cache))  # the index the retrieval view builds at start
    try:
        thread = threading.Thread(target=run, name="explore-test-server", daemon=True)
        thread.start()
        while not ready.wait(1.0):  # the views load their models first (slow on a busy machine)
            assert thread.is_alive(), "the explore server stopped before it was ready"
    finally:
        mp.undo()
    if errors:
        raise errors[0]
    return Server(holder["server"], thread, sources)


def session_server(tmp_path_factory) -> Server:
    """The loopback server of the tests, one per session."""
    if "server" not in _BUILT:
        _BUILT["server"] = start_server(session_sources(tmp_path_factory))
    return _BUILT["server"]


def stop(server: Server) -> None:
    server.server.shutdown()
    server.thread.join(timeout=30)


class Client:
    """Requests as the page sends them: a session header, JSON bodies, raw uploads."""

    def __init__(self, port: int, session: str = "test-session-0001", host: str = "127.0.0.1"):
        self.port, self.session, self.host = port, session, host

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(
                method, path, body=body, headers={"X-Explore-Session": self.session, **(headers or {})}
            )
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def get(self, path: str, **headers):
        status, _, data = self.request("GET", path, headers=headers)
        return status, json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, value: dict | None = None, **headers):
        status, _, data = self.request("POST", path, json.dumps(value or {}).encode(),
                                       {"Content-Type": "application/json", **headers})  # fmt: skip
        return status, json.loads(data)

    def upload(self, path: str, data: bytes, name: str = "upload.png", **headers):
        status, _, body = self.request("POST", path, data, {"Content-Type": "image/png", "X-Filename": name,
                                                            **headers})  # fmt: skip
        return status, json.loads(body)


def png_of_data_url(url: str) -> bytes:
    import base64

    assert url.startswith("data:image/png;base64,"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])
