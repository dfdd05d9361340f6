"""The HTTP server of ``weightslab ui``: the standard library's threading server, one page and a few
fragments, bound to 127.0.0.1 unless told otherwise.

Routes (every response is built from the catalog as it is at that request):

- ``GET /`` (``?metric=NAME``): the page;
- ``GET /card?ref=REF``: one checkpoint's card (an HTML fragment the page's script inserts);
- ``GET /diff?a=REF&b=REF``: a page with the diff (``&part=1``: the fragment alone); torch is
  imported here, the first time a diff is asked;
- ``GET /gc``: what ``weightslab gc`` would free (a fragment; computed on demand, not at every page);
- ``POST /verify`` (``ref``, ``token``): only with ``allow_actions``; verifies one checkpoint and
  answers with its card. The token is a random value put in the page, so that another web site open
  in the same browser cannot make it post.

Every response forbids loading anything from elsewhere (``Content-Security-Policy``: the page's one
script and style run by a per-response nonce, requests only to this server) and is not cached.
Requests whose ``Host`` is not this server's address are refused while it listens on a loopback
address (a DNS-rebinding page could otherwise read it). HTTP/1.0: one request per connection, so
that no connection holds a thread after its answer and :meth:`UiServer.shutdown` joins them all.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, WeightslabError
from . import page
from .site import Site

__all__ = ["UiServer", "make_server", "is_loopback"]

log = logging.getLogger(__name__)

#: Seconds a connection may take to send its request before its thread gives up. Short: a browser
#: opens connections ahead of need (preconnects) that may never carry a request, and each holds a
#: thread until this passes; one that is closed is simply opened again when needed.
REQUEST_TIMEOUT_SECONDS = 3.0
#: A POST body larger than this is refused (a form with a ref and a token is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: "_HttpServer"
    timeout = REQUEST_TIMEOUT_SECONDS
    server_version = "weightslab-ui"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # --- routing ----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        nonce = secrets.token_urlsafe(16)
        try:
            if not self._host_allowed():
                self._send(HTTPStatus.MISDIRECTED_REQUEST, page.error(
                    f"this server answers to {self.server.ui.url}, not to the host {self.headers.get('Host')!r}"),
                    nonce)
                return
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, max_num_fields=20).items()}
            if method == "POST":
                if url.path != "/verify":
                    self._send(HTTPStatus.METHOD_NOT_ALLOWED, page.error("only /verify takes a POST"), nonce)
                    return
                self._verify(nonce)
                return
            route = {"/": self._page, "/card": self._card, "/diff": self._diff, "/gc": self._gc}.get(url.path)
            if route is None:
                self._send(HTTPStatus.NOT_FOUND, page.error(f"no page {url.path}; the page is at /"), nonce)
                return
            route(query, nonce)
        except (CheckpointNotFoundError, ValueError) as exc:
            self._send(HTTPStatus.NOT_FOUND, page.error(str(exc)), nonce)
        except (CorruptCheckpointError, FormatVersionError) as exc:
            self._send(HTTPStatus.UNPROCESSABLE_ENTITY, page.error(str(exc)), nonce)
        except PermissionError as exc:
            self._send(HTTPStatus.FORBIDDEN, page.error(str(exc)), nonce)
        except (WeightslabError, OSError) as exc:
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, page.error(f"{type(exc).__name__}: {exc}"), nonce)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("weightslab ui: %s %s failed", method, self.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, page.error(f"{type(exc).__name__}: {exc}"), nonce)

    def _host_allowed(self) -> bool:
        if not is_loopback(self.server.ui.host):
            return True  # (--host: whoever reaches it is meant to)
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.strip("[]") in ("localhost", "127.0.0.1", "::1") or is_loopback(name.strip("[]"))

    # --- answers --------------------------------------------------------------------------------
    def _page(self, query: dict[str, str], nonce: str) -> None:
        site = self.server.ui.site
        self._send(HTTPStatus.OK, page.page(site.overview(), metric=query.get("metric"), nonce=nonce,
                                            allow_actions=site.allow_actions), nonce)

    def _card(self, query: dict[str, str], nonce: str) -> None:
        ref = query.get("ref")
        if not ref:
            raise ValueError("/card needs ?ref=<hash>@<step>")
        ui = self.server.ui
        self._send(HTTPStatus.OK, page.card(ui.site.card(ref), location=ui.site.location,
                                            allow_actions=ui.site.allow_actions, token=ui.token), nonce)

    def _diff(self, query: dict[str, str], nonce: str) -> None:
        a, b = query.get("a", "").strip(), query.get("b", "").strip()
        if not (a and b):
            raise ValueError("/diff needs ?a=<ref>&b=<ref>, two checkpoints")
        site = self.server.ui.site
        try:
            result = page.diff(site.compare(a, b))
        except ImportError as exc:  # (the listing works without torch; reading tensors does not)
            result = page.error(f"the diff reads hyperparameters and tensors with torch, which cannot be imported "
                                f"here ({exc}); install torch, or run `weightslab diff {a} {b}` where it is")
        if query.get("part"):
            self._send(HTTPStatus.OK, result, nonce)
        else:
            self._send(HTTPStatus.OK, page.diff_page(site.overview(), result, a, b, nonce=nonce), nonce)

    def _gc(self, query: dict[str, str], nonce: str) -> None:
        site = self.server.ui.site
        self._send(HTTPStatus.OK, page.reclaimable(site.reclaimable(), remote=site.root.remote is not None), nonce)

    def _verify(self, nonce: str) -> None:
        ui = self.server.ui
        if not ui.site.allow_actions:
            raise PermissionError("this server is read-only: start it with `weightslab ui --allow-actions` to verify "
                                  "from the page")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError(f"a POST body of {length} bytes; at most {MAX_BODY_BYTES} are read")
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"),
                                                           max_num_fields=20).items()}
        if not secrets.compare_digest(form.get("token", ""), ui.token):
            raise PermissionError("the form's token is not this server's: reload the page and click verify again")
        ref = form.get("ref", "")
        if not ref:
            raise ValueError("/verify needs a ref")
        ui.site.verify(ref)
        if form.get("part"):
            self._card({"ref": ref}, nonce)
        else:  # (without the script: back to the card)
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", "/card?" + urllib.parse.urlencode({"ref": ref}))
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, status: HTTPStatus, body: str, nonce: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy",
                         f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                         "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
                         "frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = False  # joined by server_close(): no request thread outlives shutdown()
    block_on_close = True
    ui: "UiServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that navigated away while its request was answered closed the connection: that
        # is not an error of the page (socketserver would print a traceback for it).
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class UiServer:
    """The running page: ``url``, ``start()`` (serves on a daemon thread), ``shutdown()`` (stops and
    closes the socket, joins every thread); a context manager that starts and shuts down."""

    def __init__(self, site: Site, *, host: str, port: int):
        self.site = site
        self.host = host
        self.token = secrets.token_urlsafe(24)  # (what a POST must carry: see the module's docstring)
        self._http = _HttpServer((host, port), _Handler)
        self._http.ui = self
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "UiServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._http.serve_forever, name="weightslab-ui", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`shutdown` (from another thread) or an exception (Ctrl-C)."""
        self._http.serve_forever()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()  # (joins the request threads)

    def __enter__(self) -> "UiServer":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def make_server(root: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 0,
                allow_actions: bool = False) -> UiServer:
    """A server over an existing root (default: ``$WEIGHTSLAB_ROOT`` or ``./experiments``; a URL through
    the command line's mirror), bound now and not yet serving: call ``start()`` or use it in ``with``.
    ``port=0`` picks a free port (``.url`` says which). Raises ``NotARootError`` when there is no root."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535 (0: any free port), got {port}")
    return UiServer(Site.open(root, allow_actions=allow_actions), host=host, port=port)
