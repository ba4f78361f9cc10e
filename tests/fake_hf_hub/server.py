"""TEST DOUBLE of the Hugging Face Hub: serves folders the test creates as branches of a model repo.

It speaks what huggingface_hub 2.x calls for `snapshot_download` / `hf_hub_download` / `model_info`
(read from its file_download.py, _snapshot_download.py, hf_api.py, utils/_http.py):

- GET  /api/models/{owner}/{name}/revision/{rev}   -> {"id", "sha", "siblings": [{rfilename, size, blobId, lfs}]}
- GET  /api/models/{owner}/{name}/tree/{rev}       -> [{"type": "file", "path", "size", "oid", "lfs"}] (recursive)
- HEAD /{owner}/{name}/resolve/{rev}/{path}        -> X-Repo-Commit, ETag (git blob sha1), and for LFS files
  X-Linked-Etag (sha256) / X-Linked-Size, Content-Length, Accept-Ranges
- GET  /{owner}/{name}/resolve/{rev}/{path}        -> the bytes; `Range: bytes=N-[M]` -> 206 + Content-Range
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) like the real hub. No Xet headers are sent,
so the client takes its plain-HTTP path. Faults for tests: drop the connection mid-file once, or stall mid-file.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
CHUNK_BYTES = 64 * 1024
RANGE_PATTERN = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class FileEntry:
    """One file of a branch with the hashes the hub reports for it."""

    path: str
    local: Path
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files only

    def tree_json(self) -> dict:
        entry = {"type": "file", "path": self.path, "size": self.size, "oid": self.git_oid}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
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
                sha256 = hashlib.sha256(data).hexdigest() if local.suffix in LFS_SUFFIXES else None
                files[rel] = FileEntry(rel, local, len(data), git_oid, sha256)
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
    """One request the fake hub saw (for assertions): never the token itself, only whether one was sent."""

    method: str
    path: str
    range: str | None
    authorized: bool


class FakeHub:
    """A threaded local hub; use as a context manager and point HF_ENDPOINT (or endpoint=) at .url."""

    def __init__(self, repos: list[FakeRepo], token: str | None = None) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.token = token
        self.requests: list[RequestRecord] = []
        self._drops: dict[str, int] = {}
        self._stalls: dict[str, tuple[int, threading.Event]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def drop_once(self, path: str, after_bytes: int) -> None:
        """The next GET of `path` sends `after_bytes` bytes of the body, then the connection is cut."""
        with self._lock:
            self._drops[path] = after_bytes

    def stall(self, path: str, after_bytes: int) -> threading.Event:
        """Every GET of `path` sends `after_bytes` bytes, then waits until the returned event is set."""
        event = threading.Event()
        with self._lock:
            self._stalls[path] = (after_bytes, event)
        return event

    def gets(self, path: str) -> list[RequestRecord]:
        """The GET requests for one file's content."""
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.path.endswith("/" + path) and "/resolve/" in r.path
        ]

    def start(self) -> FakeHub:
        for repo in self.repos.values():
            repo.index()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hf-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for _, event in self._stalls.values():
                event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:  # noqa: PYI034 - py3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_fault(self, path: str) -> tuple[int | None, threading.Event | None]:
        with self._lock:
            if path in self._drops:
                return self._drops.pop(path), None
            if path in self._stalls:
                after, event = self._stalls[path]
                return after, event
        return None, None


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        def _dispatch(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            sent = self.headers.get("authorization", "")
            authorized = hub.token is not None and sent == f"Bearer {hub.token}"
            hub.requests.append(RequestRecord(self.command, path, self.headers.get("Range"), authorized))
            if hub.token is not None and not authorized:
                return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            api = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?$", path)
            if api:
                return self._api(api.group(1), api.group(2), api.group(3), head)
            resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if resolve:
                return self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), head)
            self._error(404, "EntryNotFound", "no such endpoint")

        def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, FileEntry]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            found = repo.resolve(revision)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return found

        def _api(self, repo_id: str, kind: str, revision: str, head: bool) -> None:
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            commit, files = found
            if kind == "revision":
                body = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "siblings": [f.sibling_json() for f in files.values()],
                }
            else:
                body = [f.tree_json() for f in files.values()]
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _resolve(self, repo_id: str, revision: str, file_path: str, head: bool) -> None:
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            commit, files = found
            entry = files.get(file_path)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{file_path} does not exist", commit)
            start, end = 0, entry.size - 1
            requested = self.headers.get("Range")
            if requested and not head:
                match = RANGE_PATTERN.match(requested.strip())
                if not match or int(match.group(1)) >= entry.size:
                    return self._error(416, "RangeNotSatisfiable", "bad range", commit)
                start = int(match.group(1))
                end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
            self.send_response(206 if requested and not head else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{entry.git_oid}"')
            if entry.sha256:
                self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
                self.send_header("X-Linked-Size", str(entry.size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            if requested and not head:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            self.end_headers()
            if not head:
                self._send_body(entry, start, end)

        def _send_body(self, entry: FileEntry, start: int, end: int) -> None:
            cut_after, stall = hub._take_fault(entry.path) if start == 0 else (None, None)
            sent = 0
            with entry.local.open("rb") as handle:
                handle.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = handle.read(min(CHUNK_BYTES, remaining))
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

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
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

    return Handler
