"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server (tests only).

It forwards each request to the upstream server, except that it answers a seeded share of
requests with 503 SlowDown (bounded by `max_faults`), 403 AccessDenied (`deny_body`) to every
request for the buckets in `deny_buckets`, and `conditional_error` (status, body) to every
conditional PUT (one with If-None-Match). Once `stall_after` requests were served it stalls
the next `stall_count` requests (all, when None): it reads them and never answers, until
`release()` or `stop()`, as a server that stopped answering would. It serves on its own threads and stops by itself after `lifetime`
seconds at the latest.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)


def error_xml(code: str, message: str) -> bytes:
    """An S3 error body (an empty code gives a body without a <Code>)."""
    tag = f"<Code>{code}</Code>" if code else ""
    head = '<?xml version="1.0" encoding="UTF-8"?>\n'
    return f"{head}<Error>{tag}<Message>{message}</Message></Error>".encode()


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        share: float = 0.0,
        max_faults: int = 1000,
        seed: int = 0,
        deny_buckets: tuple[str, ...] = (),
        lifetime: float = 300.0,
        deny_body: bytes = DENIED,
        conditional_error: tuple[int, bytes] | None = None,
        stall_after: int | None = None,
        stall_count: int | None = None,
    ):
        u = urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.share, self.max_faults = share, max_faults
        self.rng = random.Random(seed)
        self.deny = set(deny_buckets)
        self.deny_body, self.conditional_error = deny_body, conditional_error
        self.stall_after, self.stall_left = stall_after, stall_count
        self.stalled = 0
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.faults = self.denied = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                with proxy.lock:
                    proxy.requests += 1
                    stall = (
                        proxy.stall_after is not None
                        and proxy.requests > proxy.stall_after
                        and (proxy.stall_left is None or proxy.stall_left > 0)
                    )
                    if stall:
                        proxy.stalled += 1
                        if proxy.stall_left is not None:
                            proxy.stall_left -= 1
                if stall:  # read, never answer: the client's timeout must end it
                    proxy.released.wait(lifetime)
                    self.close_connection = True
                    return
                with proxy.lock:
                    deny = bucket in proxy.deny
                    fault = (
                        not deny
                        and proxy.faults < proxy.max_faults
                        and proxy.rng.random() < proxy.share
                    )
                    if fault:
                        proxy.faults += 1
                    if deny:
                        proxy.denied += 1
                if deny or fault:
                    self._reply(403 if deny else 503, proxy.deny_body if deny else SLOWDOWN)
                    return
                if (
                    proxy.conditional_error
                    and self.command == "PUT"
                    and self.headers.get("If-None-Match")
                ):
                    self._reply(*proxy.conditional_error)
                    return
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.up_host}:{proxy.up_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = r.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _reply(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def release(self) -> None:
        """Stalled requests end (unanswered); later ones are served."""
        with self.lock:
            self.stall_after = None
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
