"""A fault-injecting HTTP proxy between pprl and moto's S3 server, on loopback, for the transient-fault tests.

Every request is forwarded unchanged (the Host header too, so signatures still match) except those the schedule
picks: a share of requests gets S3's ``503 SlowDown``, and a share has its connection dropped: before the request
reaches the server, after the server has acted on it (the client then cannot know whether a PUT landed: the
hardest case for exactly-once bookkeeping), or halfway through the response body. The schedule is a fixed cycle over the request count, so a run's
faults are reproducible and never hit the same operation more than twice in a row.
"""

from __future__ import annotations

import http.client
import itertools
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
# One cycle: 12 requests, 5 of them faulty; two faults in a row at most.
DEFAULT_SCHEDULE = ("ok", "slow-down", "ok", "drop-before", "ok", "truncate", "ok", "drop-after", "slow-down", "ok", "ok", "ok")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` point ``AWS_ENDPOINT_URL_S3`` at ``proxy.endpoint``; ``proxy.faults``
    counts what was injected; ``proxy.enabled = False`` forwards everything."""

    def __init__(self, upstream: str, schedule: tuple[str, ...] = DEFAULT_SCHEDULE):
        self.upstream = urlparse(upstream)
        self.enabled = True
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self._schedule = itertools.cycle(schedule)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True, name="s3-fault-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def next_action(self) -> str:
        with self._lock:
            self.requests += 1
            action = next(self._schedule) if self.enabled else "ok"
            if action != "ok":
                self.faults[action] += 1
            return action

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                body = self._body()
                action = proxy.next_action()
                if action == "drop-before":
                    return self._drop()
                if action == "slow-down":
                    return self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                status, headers, payload = self._forward(body)
                if action == "drop-after" or (action == "truncate" and len(payload) < 2):
                    return self._drop()
                if action == "truncate":  # the promised length, half the bytes, then the connection goes
                    self._reply(status, headers | {"Content-Length": str(len(payload))}, payload[: len(payload) // 2])
                    return self._drop()
                self._reply(status, headers, payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    if self.command == "HEAD":
                        kept["Content-Length"] = response.getheader("Content-Length") or "0"
                    return response.status, kept, payload
                finally:
                    upstream.close()

            def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _drop(self) -> None:
                self.close_connection = True
                self.connection.shutdown(2)

        return Handler
