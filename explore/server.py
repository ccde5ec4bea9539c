"""The HTTP side of the page: the standard library's ThreadingHTTPServer, a handful of routes, and the rules.

- `/` the page, `/static/NAME` its files (only those in explore/static/), `/api/tabs` the tabs,
  `/api/TAB/ACTION` a view's action. JSON in and out; uploads are the raw request body.
- Bound to loopback, requests must name a loopback host (`Host: 127.0.0.1:PORT` or `localhost`: a page
  from elsewhere cannot reach the server through DNS rebinding). With a token (required for any other host),
  every request must carry it: `?token=` (which sets a cookie), the cookie, or `Authorization: token T`;
  anything else gets 403.
- A POST must come from the page itself: its `Origin`, when sent, is the server's, and API calls carry the
  tab's session header (a custom header, which a cross-site form or fetch cannot send without a preflight).
- Every response forbids the browser to load anything from elsewhere (Content-Security-Policy).
"""

from __future__ import annotations

import hmac
import json
import sys
import traceback
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from core.errors import UserError
from explore.views import Blob, NotFound, Request, TooLarge
from explore.worker import Superseded

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}  # fmt: skip
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
MAX_JSON = 1 << 20
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip


def host_name(host_header: str) -> str:
    """The host part of a Host header: '127.0.0.1:8765' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class ExploreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app, token: str | None, loopback: bool, verbose: bool = False):
        self.app, self.token, self.loopback, self.verbose = app, token, loopback, verbose
        self.cookie_name = "biovis-explore-token"
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "biovis-explore"
    sys_version = ""
    server: ExploreServer

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            sys.stderr.write(f"explore: {self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("X-Frame-Options", "DENY")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Cache-Control" not in (headers or {}):
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: dict) -> None:
        body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json")

    def _error(self, status: int, message: str) -> None:
        if self.path.startswith("/api/"):
            self._json(status, {"error": message})
        else:
            self._send(status, f"{status}: {message}\n".encode(), "text/plain; charset=utf-8")

    # ------------------------------------------------------------------ the rules

    def _token_given(self, query: dict) -> str | None:
        """The token this request carries, and where: 'query', 'cookie' or 'header' (None: none)."""
        token = self.server.token
        candidates = [("query", query.get("token"))]
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("token "):
            candidates.append(("header", auth[6:].strip()))
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:  # a malformed cookie header is no token
            cookie = SimpleCookie()
        if self.server.cookie_name in cookie:
            candidates.append(("cookie", cookie[self.server.cookie_name].value))
        for where, value in candidates:
            if value and hmac.compare_digest(value.encode(), token.encode()):
                return where
        return None

    def _allowed(self, query: dict) -> tuple[bool, str | None]:
        """(whether to serve this request, where its token was); sends the 403 itself."""
        host = host_name(self.headers.get("Host", ""))
        if self.server.token is None:
            if self.server.loopback and host not in LOOPBACK_NAMES:
                self._error(
                    403, f"host {host!r} refused: this server answers to 127.0.0.1 and localhost only"
                )
                return False, None
            where = None
        else:
            where = self._token_given(query)
            if where is None:
                self._error(403, "this page needs its token: open the URL `python main.py explore` printed "
                                 "(http://HOST:PORT/?token=...)")  # fmt: skip
                return False, None
        if self.command == "POST":
            origin = self.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host", ""):
                self._error(403, f"cross-origin request from {origin} refused")
                return False, None
        return True, where

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query))
        ok, where = self._allowed(query)
        if not ok:
            self._discard_body()
            return
        path = parts.path
        if self.command == "POST" and not path.startswith("/api/"):
            self._discard_body()  # no page takes a body: read it, so the connection stays in step
        try:
            if path == "/":
                if where == "query":  # keep the token in a cookie, out of the address bar
                    cookie = (
                        f"{self.server.cookie_name}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
                    )
                    self._send(303, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})
                    return
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/") :])
            elif path == "/api/tabs":
                self._json(200, self.server.app.describe())
            elif path.startswith("/api/"):
                self._api(path[len("/api/") :], query)
            else:
                self._error(404, f"no page at {path}")
        except BrokenPipeError:
            pass

    def _static(self, name: str) -> None:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            self._error(404, f"no file {name}")
            return
        self._send(200, files[name].read_bytes(), TYPES.get(files[name].suffix, "application/octet-stream"),
                   {"Cache-Control": "no-cache"})  # fmt: skip

    def _discard_body(self) -> None:
        """Read a refused request's body (up to 64 MiB) so that the browser sees the answer; else close."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64 << 20:
            self.close_connection = True
            return
        while length > 0:
            length -= len(self.rfile.read(min(length, 1 << 20)) or b"x" * length)

    def _body(self, limit: int) -> bytes:
        if self.command != "POST":
            return b""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise UserError("send the request with a Content-Length (chunked bodies are not accepted)")
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self._discard_body()
            raise TooLarge(f"the upload is {length / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB "
                           "(`explore --max-upload-mb`)")  # fmt: skip
        return self.rfile.read(length)

    def _api(self, rest: str, query: dict) -> None:
        app = self.server.app
        tab, _, action = rest.partition("/")
        view = app.views.get(tab)
        try:
            content_type = self.headers.get("Content-Type", "")
            is_json = content_type.startswith("application/json")
            body = self._body(
                MAX_JSON if is_json else app.options.max_upload
            )  # first: the connection stays in step
            if view is None:
                raise NotFound(f"no tab {tab!r}")
            method, handler = view.actions().get(action, (None, None))
            if handler is None:
                raise NotFound(f"the {view.kind} tab has no action {action!r}")
            if method != self.command and not (method == "GET" and self.command == "HEAD"):
                self._error(405, f"{action} takes {method} requests")
                return
            session = self.headers.get("X-Explore-Session")
            if self.command == "POST" and session is None:
                raise UserError("POST requests come from the page, with its session header; reload the page")
            request = Request(query, body, content_type, unquote(self.headers.get("X-Filename", "upload"))[:200],
                              session)  # fmt: skip
            if session is not None:
                request.state = app.sessions.state(session, tab)
            result = handler(request)
        except Superseded:
            self._json(200, {"superseded": True})
            return
        except UserError as error:
            self._json(getattr(error, "status", 400), {"error": error.message})
            return
        except Exception as error:  # a bug: the traceback on the console, the server keeps serving
            traceback.print_exc()
            self._json(
                500, {"error": f"internal error ({type(error).__name__}: {error}); see the server's console"}
            )
            return
        if isinstance(result, Blob):
            cache = {"Cache-Control": "private, max-age=3600"} if result.cache else {}
            self._send(200, result.data, result.content_type, cache)
        else:
            self._json(200, result)
