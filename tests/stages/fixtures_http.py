"""A real HTTP server on 127.0.0.1 for the downloader tests, with misbehaving modes.

`LoopbackServer(routes)` serves `routes[path]` bytes with HTTP Range support
(206 + Content-Range) and records every request's path and Range header.
Modes, per server:
- `drop_first`: the first GET of a file promises the full Content-Length, sends
  half the bytes, then closes the connection.
- `fail_first=n`: the first n requests get HTTP 500.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, routes: dict[str, bytes], drop_first: bool = False, fail_first: int = 0):
        self.routes = routes
        self.drop_first = drop_first
        self.fail_first = fail_first
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                with server._lock:
                    n = len(server.requests)
                    server.requests.append((self.path, self.headers.get("Range")))
                if n < server.fail_first:
                    return self._send(500, b"server error", {})
                body = server.routes.get(self.path.split("?", 1)[0])
                if body is None:
                    return self._send(404, b"not found", {})
                m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if m and int(m.group(1)) < len(body):
                    start = int(m.group(1))
                    return self._send(206, body[start:], {
                        "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
                if m:
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                if server.drop_first and n == 0:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    half = body[: len(body) // 2]
                    self.wfile.write(half)
                    server.bytes_sent += len(half)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._send(200, body, {})

            def _send(self, code, body, headers):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server.bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
