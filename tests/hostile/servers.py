"""HOSTILE TEST DOUBLES of the two network boundaries: a TabbyAPI that lies, and a Hugging Face hub that lies.

HostileTabby answers like the TabbyAPI test server (tests/tabby_test_server: same tiny model, same shapes, same
auth), except where a test tells it to misbehave:
- `logprobs`: a function applied to every top-K dict of /v1/completions (values 0.0, +inf, NaN, strings, 1000,
  shifted upward, reordered, ...); its result is sent as JSON with NaN/Infinity literals allowed;
- `health_issues`: /health answers 503 with these issue descriptions (e.g. rich markup);
- `raw`: {path: Answer} sends exactly these bytes (status, headers, body), optionally one byte at a time every
  `trickle_s` seconds, optionally trickling the status line and headers too;
- `model`: replaces the /v1/model card.
Every request is recorded (method, path, headers) so tests can see what the client sent where.

HostileHub answers the three hub requests glm-deploy's download makes (model_info with files metadata, the
recursive tree listing, resolve) with a listing the test writes: traversal names, absolute paths, huge listings,
or a redirect to another server.

Servers bind 127.0.0.1 on a free port; use them as context managers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from tests.tabby_test_server import server as honest
from tests.tabby_test_server.app import load_model, prepare


@dataclass(frozen=True)
class Answer:
    """Bytes to send as they are: status, headers, body; trickled one byte per `trickle_s` when set."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    body: bytes = b"{}"
    trickle_s: float | None = None
    trickle_headers: bool = False
    content_length: bool = True


@dataclass(frozen=True)
class Seen:
    """One request a hostile server received."""

    method: str
    path: str
    headers: dict[str, str]


def json_bytes(value: Any) -> bytes:
    """JSON as a lax server writes it (NaN and Infinity literals pass)."""
    return json.dumps(value, allow_nan=True).encode("utf-8")


def gzip_bomb_bytes(inflated_gib: int = 4, prefix: bytes = b"") -> bytes:
    """A valid gzip stream of `prefix` + inflated_gib GiB of zeros, about 1 MB per GiB, made in a second or two.

    After a full flush deflate starts afresh, so the compressed form of each further MiB of zeros is the same
    block: compress one MiB once and repeat it (the trailer's CRC is computed over the zeros, so it is a valid file).
    """
    zeros = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(prefix) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(inflated_gib * 1024):
        crc = zlib.crc32(zeros, crc)
    size = len(prefix) + (inflated_gib << 30)
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        + head
        + block * (inflated_gib * 1024)
        + packer.flush()
        + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)
    )


def trickle(body: bytes, every_s: float = 2.0, headers_too: bool = False) -> Answer:
    """A 200 JSON answer sent one byte every `every_s` seconds."""
    return Answer(body=body, trickle_s=every_s, trickle_headers=headers_too)


def huge_json(megabytes: int, key: str = "status") -> Answer:
    """A syntactically plausible JSON object of `megabytes` MiB (one long string)."""
    pad = b"A" * (megabytes << 20)
    return Answer(body=b'{"' + key.encode() + b'": "' + pad + b'"}')


def gzip_bomb_answer(bomb: bytes) -> Answer:
    """A 200 whose gzip Content-Encoding inflates to gigabytes."""
    return Answer(headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")), body=bomb)


def redirect(location: str, status: int = 307) -> Answer:
    """A redirect elsewhere (verify must not follow it, and must never send the key there)."""
    return Answer(
        status=status, headers=(("Location", location), ("Content-Type", "text/plain")), body=b"moved"
    )


class _Server:
    """A threaded loopback HTTP server that records requests; subclasses give the handler's _answer()."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> _Server:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                self._serve("GET")

            def do_HEAD(self) -> None:
                self._serve("HEAD")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                path = urlsplit(self.path).path
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                with owner._lock:
                    owner.seen.append(Seen(method, path, {k.lower(): v for k, v in self.headers.items()}))
                try:
                    answer = owner._answer(method, path, self.headers, raw)
                    _send(self, answer, head=method == "HEAD")
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, method: str, path: str, headers: Any, raw: bytes) -> Answer:
        raise NotImplementedError

    def requests_to(self, path: str) -> list[Seen]:
        """The recorded requests for one path."""
        with self._lock:
            return [s for s in self.seen if s.path == path]


def _send(handler: BaseHTTPRequestHandler, answer: Answer, head: bool = False) -> None:
    """Write an Answer; trickled answers go out byte by byte (the client's whole-request deadline is tested)."""
    reason = {
        200: "OK",
        302: "Found",
        307: "Temporary Redirect",
        401: "Unauthorized",
        404: "Not Found",
        503: "Service Unavailable",
    }.get(answer.status, "Status")
    lines = [f"HTTP/1.1 {answer.status} {reason}"] + [f"{k}: {v}" for k, v in answer.headers]
    if answer.content_length:
        lines.append(f"Content-Length: {len(answer.body)}")
    else:
        lines.append("Connection: close")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    body = b"" if head else answer.body
    if answer.trickle_s is None:
        handler.wfile.write(head_bytes)
        for start in range(0, len(body), 1 << 20):
            handler.wfile.write(body[start : start + (1 << 20)])
        handler.wfile.flush()
        if not answer.content_length:
            handler.close_connection = True
        return
    if not answer.trickle_headers:
        handler.wfile.write(head_bytes)
        handler.wfile.flush()
        head_bytes = b""
    for byte in head_bytes + body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(answer.trickle_s)


LogprobHook = Callable[[dict[str, float]], Any]


class HostileTabby(_Server):
    """TabbyAPI-shaped: the honest test server's answers, bent where the test says (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        api_key: str,
        *,
        model_name: str = "tiny",
        logprobs: LogprobHook | None = None,
        health_issues: list[str] | None = None,
        raw: dict[str, Answer] | None = None,
        model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "api_tokens.yml").write_text(
            yaml.safe_dump({"api_key": api_key, "admin_key": "admin-" + api_key})
        )
        config = {
            "network": {"host": "127.0.0.1", "port": 1},
            "model": {
                "model_name": model_name,
                "max_seq_len": 4096,
                "cache_size": 4096,
                "cache_mode": "5,4",
                "reasoning": True,
            },
        }
        prepared = prepare(config, workdir)
        load_model(prepared)
        self.state = prepared.state
        self.logprobs = logprobs
        self.health_issues = health_issues
        self.raw = raw or {}
        self.model = model

    def _answer(self, method: str, path: str, headers: Any, raw: bytes) -> Answer:
        if path in self.raw:
            return self.raw[path]
        try:
            if method == "GET" and path == "/health":
                if self.health_issues is not None:
                    return Answer(
                        503,
                        body=json_bytes(
                            {
                                "status": "unhealthy",
                                "issues": [
                                    {"time": "2026-01-01T00:00:00Z", "description": text}
                                    for text in self.health_issues
                                ],
                            }
                        ),
                    )
                status, payload = honest.health(self.state)
                return Answer(status, body=json_bytes(payload))
            honest._check_key(self.state, headers)
            if method == "GET" and path == "/v1/model":
                return Answer(
                    body=json_bytes(self.model if self.model is not None else honest.model_card(self.state))
                )
            body = json.loads(raw or b"null")
            if method == "POST" and path == "/v1/completions":
                answer = honest.completions(self.state, body)
                if self.logprobs is not None:
                    for choice in answer["choices"]:
                        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
                        if tops and tops[0]:
                            tops[0] = self.logprobs(tops[0])
                return Answer(body=json_bytes(answer))
            route = honest.ROUTES.get((method, path))
            if route is None:
                raise honest.ApiError(404, "Not Found")
            return Answer(body=json_bytes(route(self.state, body)))
        except honest.ApiError as error:
            return Answer(error.status, body=json_bytes({"detail": error.detail}))


class Canary(_Server):
    """A server that only records: where a redirect would lead, to see whether anything (or any key) arrives."""

    def _answer(self, method: str, path: str, headers: Any, raw: bytes) -> Answer:
        return Answer(body=json_bytes({"status": "healthy", "issues": []}))


@dataclass
class HubFile:
    """One entry of the listing a hostile hub reports (the name is whatever the test wants)."""

    path: str
    data: bytes = b"{}"
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class HostileHub(_Server):
    """Hugging Face hub-shaped: serves `files` for any repo and revision, or redirects every API call."""

    files: list[HubFile] = field(default_factory=list)
    redirect_to: str | None = None
    error: tuple[int, str] | None = None  # every API call answers this status with this message
    commit: str = "0123456789abcdef0123456789abcdef01234567"

    def __post_init__(self) -> None:
        super().__init__()

    def _answer(self, method: str, path: str, headers: Any, raw: bytes) -> Answer:
        path = unquote(path)
        if self.redirect_to is not None:
            return redirect(self.redirect_to + path, 302)
        if self.error is not None:
            status, message = self.error
            return Answer(
                status,
                headers=(("Content-Type", "application/json"), ("X-Error-Message", message)),
                body=json_bytes({"error": message}),
            )
        if path.startswith("/api/models/") and "/revision/" in path:
            repo = path[len("/api/models/") :].split("/revision/")[0]
            siblings = [
                {
                    "rfilename": f.path,
                    "size": len(f.data),
                    "blobId": f.git_oid,
                    **(
                        {"lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}}
                        if f.lfs
                        else {}
                    ),
                }
                for f in self.files
            ]
            return Answer(
                headers=(("Content-Type", "application/json"), ("X-Repo-Commit", self.commit)),
                body=json_bytes(
                    {"id": repo, "modelId": repo, "sha": self.commit, "private": False, "siblings": siblings}
                ),
            )
        if path.startswith("/api/models/") and "/tree/" in path:
            entries = [
                {
                    "type": "file",
                    "path": f.path,
                    "size": len(f.data),
                    "oid": f.git_oid,
                    **({"lfs": {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}} if f.lfs else {}),
                }
                for f in self.files
            ]
            return Answer(body=json_bytes(entries))
        if "/resolve/" in path:
            name = path.split("/resolve/", 1)[1].split("/", 1)[1]
            found = next((f for f in self.files if f.path == name), None)
            if found is None:
                return Answer(404, headers=(("X-Error-Code", "EntryNotFound"),), body=b'{"error": "no"}')
            extra = (
                (("X-Linked-Etag", f'"{found.sha256}"'), ("X-Linked-Size", str(len(found.data))))
                if found.lfs
                else ()
            )
            return Answer(
                headers=(
                    ("Content-Type", "application/octet-stream"),
                    ("X-Repo-Commit", self.commit),
                    ("ETag", f'"{found.git_oid}"'),
                    *extra,
                ),
                body=found.data,
            )
        return Answer(
            404, headers=(("X-Error-Code", "EntryNotFound"),), body=b'{"error": "no such endpoint"}'
        )


def free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gzip_text(text: str) -> bytes:
    """gzip of a small text (a hostile reference or answer that is honest about its size)."""
    return gzip.compress(text.encode("utf-8"), mtime=0)
