"""`serve`: recognise the sources, load their views, bind the server, print the URL, serve until Ctrl-C."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError


@dataclass
class Options:
    sources: list[Path]
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # None: none on loopback, a random one on any other host
    device: str = "auto"
    dataset: str | None = None
    data_dir: Path | None = None
    split: str = "test"
    max_upload: int = 8 << 20  # bytes
    quiet: bool = False
    verbose: bool = False
    extra: dict = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class App:
    """The views (one per source), the shared inference worker and the per-tab session store."""

    def __init__(self, options: Options):
        from core.device import resolve_device
        from explore.sessions import Sessions
        from explore.sources import recognise_all
        from explore.views import Context, build_view
        from explore.worker import InferenceWorker

        self.options = options
        sources = recognise_all(options.sources)
        self.device = resolve_device(options.device)
        self.worker = InferenceWorker()
        self.sessions = Sessions()
        ctx = Context(self.worker, self.device, options)
        try:
            self.views = {}
            for i, source in enumerate(sources):
                if not options.quiet:
                    print(f"explore: loading {source.kind} view of {source.path}", flush=True)
                self.views[f"t{i}"] = build_view(f"t{i}", source, ctx)
        except BaseException:
            self.worker.stop()
            raise

    def describe(self) -> dict:
        return {"tabs": [view.describe() for view in self.views.values()], "device": str(self.device)}

    def close(self) -> None:
        self.worker.stop()


def bind(options: Options):
    """The server on host:port (port 0: a free one), before any model is loaded, so that an address in use
    is reported at once; UserError when the address cannot be used."""
    from explore.server import ExploreServer

    loopback = is_loopback(options.host)
    token = options.token
    if token is None and not loopback:
        token = secrets.token_urlsafe(24)
    try:
        return ExploreServer((options.host, options.port), None, token, loopback, options.verbose)
    except OSError as err:
        reason = err.strerror or str(err)
        hint = "; choose another --port (0 picks a free one)" if err.errno in (98, 48, 10048) else ""
        raise UserError(f"cannot listen on {options.host}:{options.port}: {reason}{hint}") from None


def url_of(server) -> str:
    host, port = server.server_address[:2]
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    token = f"?token={server.token}" if server.token else ""
    return f"http://{shown}:{port}/{token}"


def serve(options: Options, ready=None) -> None:
    """Bind, load the views, print the URL and serve until Ctrl-C (or `server.shutdown()`); `ready(server)` is
    called once the server answers (tests start it on a thread)."""
    server = bind(options)
    try:
        server.app = App(options)
    except BaseException:
        server.server_close()
        raise
    app = server.app
    port = server.server_address[1]
    print(f"explore: {len(app.views)} tab(s) on {app.device} at {url_of(server)}", flush=True)
    if is_loopback(options.host):
        print(f"  from your laptop: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()} (add -J LOGIN_NODE for a "
              f"compute node), then open http://127.0.0.1:{port}/ . Ctrl-C stops the server.", flush=True)  # fmt: skip
    if ready is not None:
        ready(server)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("\nexplore: stopped", file=sys.stderr)
    finally:
        server.server_close()
        app.close()
