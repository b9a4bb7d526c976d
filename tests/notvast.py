"""Wrong API URLs for the messages about them: a port nobody listens on, and a web server that
is not the Vast.ai API (a page where JSON should be, or an HTTP error of its own)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WEB_PAGE = b"<!doctype html><html><body>Welcome</body></html>"


def unused_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class NotVast:
    url: str
    requests: list[str] = field(default_factory=list)  # "METHOD /path" as received


@contextmanager
def not_vast(
    status: int = 200, body: bytes = WEB_PAGE, content_type: str = "text/html"
) -> Iterator[NotVast]:
    """A server that answers every request with ``status`` and ``body``."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append(f"{self.command} {self.path.split('?')[0]}")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield NotVast(f"http://127.0.0.1:{server.server_port}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
