"""A folder served over HTTP on 127.0.0.1: the publishers' mirror for the weights tests."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    # Paths under /cut/ announce the whole file but send half of it, then hang up.
    def do_GET(self) -> None:
        if self.path.startswith("/cut/"):
            data = (Path(self.server.root) / self.path.removeprefix("/cut/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def translate_path(self, path: str) -> str:
        return str(Path(self.server.root) / path.lstrip("/"))

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1; yields the base URL (``/cut/<path>`` sends half a file)."""
    root.mkdir(parents=True, exist_ok=True)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root = str(root)  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def publish(root: Path, rel: str, data: bytes) -> str:
    """Put ``data`` at ``rel`` under the served folder; returns its sha256."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
