"""A local HTTP server for tests of downloads and remote shards (no network: the loopback interface only)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

# Environment variables whose proxy would take requests to the loopback server elsewhere (Python's urllib and
# curl both read them)
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serves `handler` on 127.0.0.1 in a thread for the block; yields the base URL ("http://127.0.0.1:PORT")."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def without_proxies(monkeypatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
