"""TEST DOUBLE of the Hugging Face Hub: serves folders the test creates as branches of a model repo.

It speaks what huggingface_hub 2.x calls for `snapshot_download` / `hf_hub_download` / `model_info`
(read from its file_download.py, _snapshot_download.py, hf_api.py, utils/_http.py, utils/_xet.py):

- GET  /api/models/{owner}/{name}/revision/{rev}   -> {"id", "sha", "siblings": [{rfilename, size, blobId, lfs}]}
- GET  /api/models/{owner}/{name}/tree/{rev}       -> [{"type": "file", "path", "size", "oid", "lfs"[, "xetHash"]}]
- HEAD|GET /{owner}/{name}/resolve/{rev}/{path}:
  - a small (git) file: the bytes here, with X-Repo-Commit and ETag (the git blob sha1);
  - an LFS file: 302 to the STORAGE server (a second loopback port), as the real hub redirects to its CDN. The
    redirect carries X-Repo-Commit, ETag, X-Linked-Etag (sha256) and X-Linked-Size; its Location is a signed,
    expiring URL, so storage needs no token (and refuses a bad signature with 403).
- storage: GET /lfs/{sha256}?file=..&expires=..&signature=.. -> the bytes; `Range: bytes=N-[M]` -> 206.
- xet=True (a Xet-backed repo, as the GLM-4.7 quants are): the LFS answers also carry X-Xet-Hash and a
  `Link: <...>; rel="xet-auth"` to GET /api/models/{owner}/{name}/xet-read-token/{rev}, which returns
  X-Xet-Cas-Url (the CAS server, a third loopback port), X-Xet-Access-Token and X-Xet-Token-Expiration; the tree
  lists `xetHash`. The CAS server records what it is asked and answers 404: this double does not implement the
  Xet reconstruction protocol (hf_xet's chunk format), so a Xet download through it fails after asking it.
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) like the real hub. Faults for tests, on
whichever server sends a file's bytes: drop the connection mid-file once, stall mid-file, or flip a byte.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
CHUNK_BYTES = 64 * 1024
RANGE_PATTERN = re.compile(r"^bytes=(\d+)-(\d*)$")
SIGNED_URL_TTL_S = 3600


@dataclass(frozen=True)
class FileEntry:
    """One file of a branch with the hashes the hub reports for it."""

    path: str
    local: Path
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files only
    xet_hash: (
        str | None
    )  # set for LFS files only (64 hex, like a Xet merkle hash; derived, not computed like one)

    def tree_json(self, xet: bool) -> dict:
        entry = {"type": "file", "path": self.path, "size": self.size, "oid": self.git_oid}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
            if xet:
                entry["xetHash"] = self.xet_hash
        return entry

    def sibling_json(self) -> dict:
        entry = {"rfilename": self.path, "size": self.size, "blobId": self.git_oid}
        if self.sha256:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


@dataclass
class FakeRepo:
    """A model repo: branch name -> local folder whose files are that branch's content."""

    repo_id: str
    branches: dict[str, Path]
    _index: dict[str, tuple[str, dict[str, FileEntry]]] = field(default_factory=dict, repr=False)

    def index(self) -> None:
        """Hash every branch's files once; the commit sha is derived from the branch name and the file hashes."""
        self._index.clear()
        for branch, folder in self.branches.items():
            files: dict[str, FileEntry] = {}
            for local in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts):
                data = local.read_bytes()
                rel = local.relative_to(folder).as_posix()
                git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                lfs = local.suffix in LFS_SUFFIXES
                sha256 = hashlib.sha256(data).hexdigest() if lfs else None
                xet_hash = hashlib.sha256(b"xet\0" + data).hexdigest() if lfs else None
                files[rel] = FileEntry(rel, local, len(data), git_oid, sha256, xet_hash)
            commit = hashlib.sha1((branch + "".join(f.git_oid for f in files.values())).encode()).hexdigest()
            self._index[branch] = (commit, files)

    def resolve(self, revision: str) -> tuple[str, dict[str, FileEntry]] | None:
        """A branch name or a commit sha -> (commit, files)."""
        if revision in self._index:
            return self._index[revision]
        for commit, files in self._index.values():
            if commit == revision:
                return commit, files
        return None

    def commit(self, branch: str) -> str:
        """The commit sha the hub reports for a branch."""
        return self._index[branch][0]


@dataclass(frozen=True)
class RequestRecord:
    """One request a server of the fake hub saw (for assertions); never a credential, only which one was sent.

    server: "hub", "storage" or "cas"; file: the repo path whose bytes or redirect it was about (None for API
    calls); content: whether this answer carried the file's bytes; credential: None, "hf-token", "xet-token" or
    "other" (what the Authorization header held).
    """

    method: str
    path: str
    range: str | None
    server: str
    file: str | None
    content: bool
    credential: str | None

    @property
    def authorized(self) -> bool:
        """The request carried the hub token."""
        return self.credential == "hf-token"


class _QuietHTTPServer(ThreadingHTTPServer):
    """A client hanging up mid-answer (a cut download, hf_xet closing its pool) is no server error."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server:
    """One threaded HTTP server on a free loopback port."""

    def __init__(self, name: str, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = _QuietHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeHub:
    """A threaded local hub plus its storage (and, with xet=True, CAS) server; use as a context manager and
    point HF_ENDPOINT (or endpoint=) at .url."""

    def __init__(self, repos: list[FakeRepo], token: str | None = None, *, xet: bool = False) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.token = token
        self.xet = xet
        self.xet_token = "xet_" + secrets.token_hex(16)
        self.requests: list[RequestRecord] = []
        self._signing_key = secrets.token_bytes(32)
        self._drops: dict[str, int] = {}
        self._stalls: dict[str, tuple[int, threading.Event]] = {}
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._hub: _Server | None = None
        self._storage: _Server | None = None
        self._cas: _Server | None = None

    @property
    def url(self) -> str:
        assert self._hub is not None, "start the hub first"
        return self._hub.url

    @property
    def storage_url(self) -> str:
        assert self._storage is not None, "start the hub first"
        return self._storage.url

    @property
    def cas_url(self) -> str:
        assert self._cas is not None, "start the hub with xet=True first"
        return self._cas.url

    def drop_once(self, path: str, after_bytes: int) -> None:
        """The next GET of `path`'s bytes sends `after_bytes` bytes of the body, then the connection is cut."""
        with self._lock:
            self._drops[path] = after_bytes

    def stall(self, path: str, after_bytes: int) -> threading.Event:
        """Every GET of `path`'s bytes sends `after_bytes` bytes, then waits until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._stalls[path] = (after_bytes, event)
        return event

    def corrupt(self, path: str) -> None:
        """Every GET of `path`'s bytes has one byte flipped (same size): what only a hash check can catch."""
        with self._lock:
            self._corrupt.add(path)

    def clear_faults(self) -> None:
        """Serve every file intact again (releasing any stalled response)."""
        with self._lock:
            for _, event in self._stalls.values():
                event.set()
            self._drops.clear()
            self._stalls.clear()
            self._corrupt.clear()

    def gets(self, path: str) -> list[RequestRecord]:
        """The GET requests that were answered with `path`'s bytes (on the hub or on storage)."""
        return [r for r in self.requests if r.method == "GET" and r.file == path and r.content]

    def on(self, server: str) -> list[RequestRecord]:
        """Every request one server ("hub", "storage", "cas") saw."""
        return [r for r in self.requests if r.server == server]

    def start(self) -> FakeHub:
        for repo in self.repos.values():
            repo.index()
        self._hub = _Server("fake-hf-hub", _hub_handler(self))
        self._storage = _Server("fake-hf-storage", _storage_handler(self))
        if self.xet:
            self._cas = _Server("fake-hf-xet-cas", _cas_handler(self))
        return self

    def stop(self) -> None:
        with self._lock:
            for _, event in self._stalls.values():
                event.set()
        for server in (self._hub, self._storage, self._cas):
            if server is not None:
                server.stop()

    def __enter__(self) -> FakeHub:  # noqa: PYI034 - py3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def signed_location(self, entry: FileEntry) -> str:
        """A storage URL for one LFS file, signed and expiring like a CDN's."""
        expires = int(time.time()) + SIGNED_URL_TTL_S
        query = f"file={quote(entry.path)}&expires={expires}"
        signature = hmac.new(self._signing_key, f"{entry.sha256}?{query}".encode(), "sha256").hexdigest()
        return f"{self.storage_url}/lfs/{entry.sha256}?{query}&signature={signature}"

    def check_signature(self, sha256: str, query: dict[str, list[str]]) -> str | None:
        """The file path a valid, unexpired signed URL grants; None otherwise."""
        try:
            path, expires, signature = query["file"][0], int(query["expires"][0]), query["signature"][0]
        except (KeyError, IndexError, ValueError):
            return None
        expected = hmac.new(
            self._signing_key, f"{sha256}?file={quote(path)}&expires={expires}".encode(), "sha256"
        ).hexdigest()
        return path if hmac.compare_digest(signature, expected) and expires > time.time() else None

    def find_lfs(self, sha256: str, path: str) -> FileEntry | None:
        """The LFS file with this content hash and path in any repo and branch."""
        for repo in self.repos.values():
            for _, files in repo._index.values():
                entry = files.get(path)
                if entry is not None and entry.sha256 == sha256:
                    return entry
        return None

    def credential(self, header: str) -> str | None:
        """Which credential an Authorization header holds (never the value itself)."""
        if not header:
            return None
        if self.token is not None and header == f"Bearer {self.token}":
            return "hf-token"
        if header == f"Bearer {self.xet_token}":
            return "xet-token"
        return "other"

    def take_fault(self, path: str) -> tuple[int | None, threading.Event | None, bool]:
        """(cut after N bytes, stall event, flip a byte) for the next response carrying `path`'s bytes."""
        with self._lock:
            corrupt = path in self._corrupt
            if path in self._drops:
                return self._drops.pop(path), None, corrupt
            if path in self._stalls:
                after, event = self._stalls[path]
                return after, event, corrupt
        return None, None, corrupt


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing: quiet logs, request records, ranged bodies with faults, hub-style errors."""

    protocol_version = "HTTP/1.1"
    hub: FakeHub
    server_name = "hub"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.dispatch(head=False)

    def do_HEAD(self) -> None:
        self.dispatch(head=True)

    def dispatch(self, head: bool) -> None:
        raise NotImplementedError

    def record(self, file: str | None = None, content: bool = False) -> None:
        self.hub.requests.append(
            RequestRecord(
                self.command,
                unquote(urlsplit(self.path).path),
                self.headers.get("Range"),
                self.server_name,
                file,
                content,
                self.hub.credential(self.headers.get("authorization", "")),
            )
        )

    def send_file(self, entry: FileEntry, head: bool, extra_headers: dict[str, str]) -> None:
        """200 or 206 (Range) with the file's bytes; faults apply to a body that starts at byte 0."""
        start, end = 0, entry.size - 1
        requested = self.headers.get("Range")
        if requested and not head:
            match = RANGE_PATTERN.match(requested.strip())
            if not match or int(match.group(1)) >= entry.size:
                return self.error(416, "RangeNotSatisfiable", "bad range")
            start = int(match.group(1))
            end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
        self.send_response(206 if requested and not head else 200)
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if requested and not head:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if not head:
            self._send_body(entry, start, end)

    def _send_body(self, entry: FileEntry, start: int, end: int) -> None:
        cut_after, stall, corrupt = self.hub.take_fault(entry.path)
        if start != 0:
            cut_after, stall = None, None
        flip_at = entry.size // 2 if corrupt else -1
        sent = 0
        with entry.local.open("rb") as handle:
            handle.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                offset = start + sent
                chunk = bytearray(handle.read(min(CHUNK_BYTES, remaining)))
                if offset <= flip_at < offset + len(chunk):
                    chunk[flip_at - offset] ^= 0xFF
                if cut_after is not None and sent + len(chunk) >= cut_after:
                    self.wfile.write(chunk[: cut_after - sent])
                    self.wfile.flush()
                    if stall is not None:
                        stall.wait(timeout=120)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                remaining -= len(chunk)

    def error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        def dispatch(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if (
                hub.token is not None
                and self.hub.credential(self.headers.get("authorization", "")) != "hf-token"
            ):
                self.record(file=resolve.group(3) if resolve else None)
                return self.error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            if resolve:
                return self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), head)
            self.record()
            api = re.match(
                r"^/api/models/([^/]+/[^/]+)/(revision|tree|xet-read-token)/([^/]+)(?:/.*)?$", path
            )
            if api:
                return self._api(api.group(1), api.group(2), api.group(3), head)
            self.error(404, "EntryNotFound", "no such endpoint")

        def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, FileEntry]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            found = repo.resolve(revision)
            if found is None:
                self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return found

        def _api(self, repo_id: str, kind: str, revision: str, head: bool) -> None:
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            commit, files = found
            headers = {"X-Repo-Commit": commit}
            if kind == "revision":
                body: object = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "siblings": [f.sibling_json() for f in files.values()],
                }
            elif kind == "tree":
                body = [f.tree_json(hub.xet) for f in files.values()]
            elif hub.xet:
                expires = int(time.time()) + 3600
                body = {"casUrl": hub.cas_url, "accessToken": hub.xet_token, "exp": expires}
                headers.update(
                    {
                        "X-Xet-Cas-Url": hub.cas_url,
                        "X-Xet-Access-Token": hub.xet_token,
                        "X-Xet-Token-Expiration": str(expires),
                    }
                )
            else:
                return self.error(404, "EntryNotFound", "this repository is not Xet-backed")
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _resolve(self, repo_id: str, revision: str, file_path: str, head: bool) -> None:
            found = hub.repos[repo_id].resolve(revision) if repo_id in hub.repos else None
            entry = found[1].get(file_path) if found else None
            self.record(file=file_path, content=entry is not None and entry.sha256 is None and not head)
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            commit = found[0]
            if entry is None:
                return self.error(404, "EntryNotFound", f"{file_path} does not exist", commit)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.git_oid}"'}
            if entry.sha256 is None:
                return self.send_file(entry, head, headers)
            headers.update(
                {
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                    "Location": hub.signed_location(entry),
                    "Content-Length": "0",
                }
            )
            if hub.xet:
                token_route = f"{hub.url}/api/models/{repo_id}/xet-read-token/{commit}"
                headers.update(
                    {"X-Xet-Hash": str(entry.xet_hash), "Link": f'<{token_route}>; rel="xet-auth"'}
                )
            self.send_response(302)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()

    Handler.hub = hub
    return Handler


def _storage_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_name = "storage"

        def dispatch(self, head: bool) -> None:
            split = urlsplit(self.path)
            match = re.match(r"^/lfs/([0-9a-f]{64})$", split.path)
            granted = hub.check_signature(match.group(1), parse_qs(split.query)) if match else None
            entry = hub.find_lfs(match.group(1), granted) if match and granted else None
            self.record(file=granted, content=entry is not None and not head)
            if entry is None:
                return self.error(403, "Forbidden", "bad or expired signature")
            self.send_file(
                entry,
                head,
                {
                    "ETag": f'"{entry.sha256}"',
                    "Content-Disposition": f'attachment; filename="{Path(entry.path).name}";',
                },
            )

    Handler.hub = hub
    return Handler


def _cas_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_name = "cas"

        def dispatch(self, head: bool) -> None:
            self.record()
            self.error(404, "NotImplemented", "the fake CAS does not implement Xet reconstruction")

        def do_POST(self) -> None:
            self.dispatch(head=False)

    Handler.hub = hub
    return Handler
