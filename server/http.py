"""A small HTTP server beside gRPC: /metrics for Prometheus and /results/<id>/<file> for stored images.

Result URLs are capability URLs: the request id is a random 128-bit value, so only those who were told the id
(the caller, its webhook) can fetch the image. The server runs in its own daemon threads so that a slow
download never touches the event loop or the engine thread.
"""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SideServer:
    def __init__(
        self,
        host: str,
        port: int,
        render_metrics: Callable[[], bytes],
        image_path: Callable[[str, str], Path | None],
    ):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if parts == ["metrics"]:
                    self._send(200, outer.render_metrics(), "text/plain; version=0.0.4; charset=utf-8")
                elif len(parts) == 3 and parts[0] == "results":
                    path = outer.image_path(parts[1], parts[2])
                    if path is None:
                        self._send(404, b"not found\n", "text/plain")
                    else:
                        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                        self._send(200, path.read_bytes(), kind)
                elif parts == ["healthz"]:
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: stay quiet
                pass

        self.render_metrics = render_metrics
        self.image_path = image_path
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pixart-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
