"""A fault-injecting HTTP proxy in front of the real vLLM server: the only test double in the suite.

`plan(path, attempt_number, body)` decides per request (`body` is the request's JSON, {} if none): an int is an
HTTP status to answer instead of the server, a float is seconds to stall before forwarding (a slow server), CUT
forwards but breaks the connection halfway through the answer (a server killed while answering), None forwards at
once. While the server behind it is down (killed by a test, not yet restarted) the proxy closes each connection
without an answer, as a dead server's socket does. Requests are counted so tests can assert what the trainer
retried. `rewrite(path, request_body, answer)`, if given, returns the JSON answer to send in place of the server's
(completions of a known structure, which a random model cannot be made to write).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import requests


CUT = "cut"


class FaultProxy:
    def __init__(self, target: str, plan: Callable[[str, int, dict], int | float | str | None], port: int = 0,
                 rewrite: Callable[[str, dict, dict], dict] | None = None):
        self.target = target
        self.plan = plan
        self.rewrite = rewrite
        self.requests = Counter()
        self.faults = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests[self.path] += 1
                try:
                    parsed = json.loads(body) if body else {}
                except ValueError:
                    parsed = {}
                status = proxy.plan(self.path, proxy.requests[self.path], parsed)
                if isinstance(status, float):
                    proxy.faults["stall"] += 1
                    time.sleep(status)
                    status = None
                if status is not None and status != CUT:
                    proxy.faults[status] += 1
                    payload = b'{"error": "injected fault"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                try:
                    upstream = requests.request(self.command, proxy.target + self.path, data=body,
                                                headers=headers, timeout=300)
                except requests.ConnectionError:
                    proxy.faults["down"] += 1
                    self.close_connection = True
                    return
                content = upstream.content
                if proxy.rewrite is not None and upstream.status_code == 200 and \
                        upstream.headers.get("Content-Type", "").startswith("application/json"):
                    content = json.dumps(proxy.rewrite(self.path, parsed, upstream.json())).encode()
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if status == CUT:
                    proxy.faults[CUT] += 1
                    self.wfile.write(content[:len(content) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(content)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
