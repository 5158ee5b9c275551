"""A real S3 server on loopback for the tests (moto in server mode), and a proxy in front of it
that fails chosen requests: the faults a network and a busy store produce, between a real
client and a real server."""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BUCKET = "zckpt-test"
KEY, SECRET = "testing", "testing"
# A fault: given (method, path and query), None to forward the request, an HTTP status to
# answer it with (an S3 error document), or "drop" to close the connection without an answer.
Fault = Callable[[str, str], "int | str | None"]
# What the proxy forwards of a request: given (method, path, the headers to forward, which it
# may change, and the body), the body to send on.
OnRequest = Callable[[str, str, "dict[str, str]", bytes], bytes]
# What it answers: given (method, path, request headers, the body forwarded, the server's
# headers, the server's body), the headers and body to answer with.
OnResponse = Callable[
    [str, str, "dict[str, str]", bytes, "list[tuple[str, str]]", bytes],
    "tuple[list[tuple[str, str]], bytes]",
]

_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown", 404: "NoSuchKey"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1, with one bucket."""

    endpoint: str
    _server: Any

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options that reach this server."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    def stop(self) -> None:
        self._server.stop()


def start_server() -> S3Server:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return S3Server(endpoint, server)


_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


@dataclass
class FaultProxy:
    """An HTTP proxy on loopback in front of ``upstream``; ``faults`` decide each request."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, int | str]] = field(default_factory=list)
    # (method, path, the request's headers with lower-case names), every request
    headers: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    # Rewrite a request's body before it is forwarded, a response before it is answered (the
    # bytes a network corrupts; a server that encrypts with SSE-KMS), where set.
    on_request: OnRequest | None = None
    on_response: OnResponse | None = None
    port: int = 0
    _httpd: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self
        host, port = self.upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if n == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                sent = {k.lower(): v for k, v in self.headers.items()}
                proxy.headers.append((self.command, self.path, sent))
                verdict: int | str | None = None
                for fault in proxy.faults:
                    verdict = fault(self.command, self.path)
                    if verdict is not None:
                        break
                if verdict == "drop":
                    proxy.seen.append((self.command, self.path, "drop"))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(verdict, int):
                    proxy.seen.append((self.command, self.path, verdict))
                    code = _CODES.get(verdict, "InternalError")
                    doc = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(verdict)
                    self.send_header("Connection", "close")  # as S3 does on errors
                    self.close_connection = True
                    self.send_header("Content-Type", "application/xml")
                    self.send_header(
                        "Content-Length", str(len(doc) if self.command != "HEAD" else 0)
                    )
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(doc)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if proxy.on_request is not None:
                    body = proxy.on_request(self.command, self.path, headers, body)
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    answer = r.getheaders()
                finally:
                    conn.close()
                if proxy.on_response is not None:
                    answer, data = proxy.on_response(
                        self.command, self.path, sent, body, answer, data
                    )
                proxy.seen.append((self.command, self.path, r.status))
                self.send_response(r.status)
                head = self.command == "HEAD"  # its Content-Length is the object's
                for k, v in answer:
                    if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def record_requests(storage: Any) -> list[tuple[str, str]]:
    """Every S3 request ``storage`` (a ``FsspecStorage`` on S3) makes from now on, as
    (operation, key relative to the bucket), in the order they were sent."""
    backend, calls = storage._backend, []
    real = backend._call

    async def recording(what: str, method: str, **kw: Any) -> Any:
        calls.append((method, str(kw.get("Key", kw.get("Prefix", "")))))
        return await real(what, method, **kw)

    backend._call = recording
    return calls
