"""The operations port: ``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server.

``/healthz`` answers as long as the process serves requests (liveness). ``/readyz`` asks a
callable supplied by the stream, which returns one entry per check: ``None`` when it passed,
else a short reason. The callable must be cheap (probes come every few seconds from several
places); the stream caches its broker and database checks.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sinks.redaction import redact

log = logging.getLogger(__name__)

# check name -> None (passed) or the reason it failed
Readiness = Callable[[], Mapping[str, str | None]]

__all__ = ["OpsServer", "Readiness", "redact"]


class OpsServer:
    """A threading HTTP server in a daemon thread; one request cannot block another."""

    def __init__(
        self,
        render_metrics: Callable[[], bytes],
        readiness: Readiness | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._render = render_metrics
        self._readiness = readiness
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; returns the bound port."""
        ops = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, ops._render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(200, {"status": "alive"})
                elif path == "/readyz":
                    status, body = ops.ready()
                    self._json(status, body)
                else:
                    self._json(404, {"error": "not found", "paths": ["/metrics", "/healthz",
                                                                     "/readyz"]})  # fmt: skip

            def _json(self, status: int, body: object) -> None:
                data = json.dumps(body, sort_keys=True).encode()
                self._reply(status, data, "application/json")

            def _reply(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                # Probes and scrapes every few seconds would drown the useful lines.
                log.debug("http: " + format, *args)

        server = ThreadingHTTPServer(self._address, Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ops-http", daemon=True)
        self._thread.start()
        return int(server.server_address[1])

    def ready(self) -> tuple[int, dict[str, object]]:
        """The /readyz status code and body."""
        if self._readiness is None:
            return 200, {"status": "ready", "checks": {}}
        try:
            checks = dict(self._readiness())
        except Exception as err:  # a broken check must answer "not ready", never hang or 500
            checks = {"readiness": f"check raised {type(err).__name__}: {redact(str(err))}"}
        failed = sorted(name for name, reason in checks.items() if reason is not None)
        body: dict[str, object] = {
            "status": "not ready" if failed else "ready",
            "checks": {k: "ok" if v is None else redact(v) for k, v in sorted(checks.items())},
        }
        if failed:
            body["failed"] = failed
        return (503 if failed else 200), body

    def stop(self) -> None:
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
