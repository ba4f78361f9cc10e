"""Model download from the Hugging Face hub (huggingface_hub): reuse, disk check, resume, integrity, token handling.

Resume: huggingface_hub resumes a dropped connection inside one call with an HTTP Range request (against the
storage host the hub redirects LFS files to, without the token); across interrupted runs it keeps every finished
file (local-dir metadata records the commit), so a re-run fetches only the files that were not complete. Version
2.x discards a partial file, so the unit of cross-run resume is one file (an EXL3 shard). Xet-backed files go
through hf_xet when it is installed (HF_HUB_DISABLE_XET=1: plain HTTP). Details: docs/downloads.md.
Integrity: after download every file's size, and every LFS file's sha256, is compared with what the hub reports;
a completion marker (.glm-deploy-complete.json, with the commit sha) then lets later runs skip the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import disk, inputs, redact, validate
from ..atomic import write_text
from ..errors import BadInput, EnvironmentMissing, ToolkitError
from ..facts.layout import MODEL_MARKER
from ..facts.profiles import BRANCH_PATTERN, REPO_PATTERN
from ..redact import printable

HASH_BLOCK_BYTES = 8 * 1024 * 1024
# A quant branch holds a few dozen files (config, tokenizer, shards); a listing this long is not a model.
MAX_FILES = 10_000
# The one metadata request (the branch's commit and file list) ends by this deadline, however the hub answers.
METADATA_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a revision as the hub reports it (sha256 only for LFS files)."""

    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class RemoteSnapshot:
    """A branch resolved to its commit, with every file's size and hash."""

    repo: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        """Bytes on disk once complete."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class ModelFetch:
    """Where the model is and how it got there (the fetch-model result)."""

    path: str
    repo: str
    revision: str
    commit: str
    total_bytes: int
    files: int
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def model_path(models_dir: Path, revision: str) -> Path:
    """The folder of one quant: models/<branch> (TabbyAPI's model_name is this folder's name)."""
    if not BRANCH_PATTERN.fullmatch(revision):
        raise BadInput(f"unsafe revision name {revision!r}", "use a quant branch name from the profile")
    return models_dir / revision


def read_token_file(token_file: Path) -> str:
    """The token in --hf-token-file (checked whenever the flag is given, before any network)."""
    text = inputs.read_text(
        token_file, "--hf-token-file", inputs.KEY_FILE_BYTES, "pass a readable token file"
    )
    token = text.strip()
    redact.register(token)
    if not token:
        raise BadInput(f"the HF token file {token_file} is empty", "write the token into it")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise BadInput(
            f"the HF token in {token_file} holds characters an HTTP header cannot carry",
            "the file holds the token alone (hf_...)",
        )
    return token


def resolve_token(token_file: Path | None = None) -> str | None:
    """HF token: HF_TOKEN from the environment, else --hf-token-file, else huggingface_hub's saved token.

    Every token is registered for redaction: no output or written file ever shows it.
    """
    from_file = read_token_file(token_file) if token_file is not None else None
    from_env = os.environ.get("HF_TOKEN", "").strip()
    redact.register(from_env)
    if from_env:
        return from_env
    if from_file is not None:
        return from_file
    from huggingface_hub import get_token

    saved = get_token()
    redact.register(saved)
    return saved


def safe_file_name(name: object) -> bool:
    """A relative path inside the model folder: no absolute path, no '..' or empty segment, no control character
    or backslash, at most 512 characters."""
    if not isinstance(name, str) or not name or len(name) > 512 or name.startswith("/") or "\\" in name:
        return False
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def read_marker(target: Path, repo: str, revision: str) -> dict[str, Any] | None:
    """The completion marker if it belongs to this repo/revision and every recorded file still has its size."""
    try:
        text = inputs.read_text(target / MODEL_MARKER, "the completion marker")
        marker = inputs.parse_json(text, "the completion marker", target / MODEL_MARKER)
    except BadInput:
        return None
    if not isinstance(marker, dict) or marker.get("repo") != repo or marker.get("revision") != revision:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files or not isinstance(marker.get("commit"), str):
        return None
    for rel, size in files.items():
        if not safe_file_name(rel) or not isinstance(size, int) or isinstance(size, bool):
            return None
        local = target / rel
        if not local.is_file() or local.stat().st_size != size:
            return None
    return marker


def remote_snapshot(
    repo: str, revision: str, token: str | None, endpoint: str | None = None
) -> RemoteSnapshot:
    """Ask the hub which commit the branch points at and what its files are (one metadata request)."""
    if not REPO_PATTERN.fullmatch(repo):
        raise BadInput(f"not a repository id: {repo!r}", "use owner/name")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token or False)
    with _hub_errors(repo, revision):
        info = _within(
            METADATA_TIMEOUT_S,
            lambda: api.model_info(repo, revision=revision, files_metadata=True),
            f"the hub did not answer for {repo}@{revision} within {METADATA_TIMEOUT_S:.0f} s",
        )
    where = f"{repo}@{revision}"
    siblings = list(info.siblings or ())
    if len(siblings) > MAX_FILES:
        raise EnvironmentMissing(
            f"the hub lists {len(siblings)} files for {where}, more than the {MAX_FILES} a model has",
            "check HF_ENDPOINT: this is not a model repository",
        )
    files = []
    for sibling in siblings:
        if not safe_file_name(sibling.rfilename):
            raise EnvironmentMissing(
                f"the hub lists an unsafe file name {printable(repr(sibling.rfilename), 120)} for {where} "
                "(absolute, '..', or control characters)",
                "nothing was written; check HF_ENDPOINT and the repository",
            )
        size = sibling.size or 0
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**50:
            raise EnvironmentMissing(
                f"the hub reports size {size!r:.40} for a file of {where}", "check HF_ENDPOINT"
            )
        files.append(RemoteFile(sibling.rfilename, size, sibling.lfs.sha256 if sibling.lfs else None))
    if not isinstance(info.sha, str) or not validate.FULL_SHA.fullmatch(info.sha) or not files:
        raise EnvironmentMissing(
            f"the hub returned no files (or no commit) for {where}",
            "check the repository and branch on the hub",
        )
    return RemoteSnapshot(repo=repo, revision=revision, commit=info.sha, files=tuple(files))


def _within(seconds: float, call: Callable[[], Any], message: str) -> Any:
    """call() in a daemon thread, waited on for at most `seconds` (a stalled hub cannot hold the command)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="hub metadata", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise EnvironmentMissing(message, "check the network (or HF_ENDPOINT) and run again")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def missing_bytes(snapshot: RemoteSnapshot, target: Path) -> int:
    """Bytes still to download: files that are absent or have the wrong size."""
    missing = 0
    for remote in snapshot.files:
        local = target / remote.path
        if not (local.is_file() and local.stat().st_size == remote.size):
            missing += remote.size
    return missing


def fetch_model(
    repo: str,
    revision: str,
    models_dir: Path,
    token: str | None,
    *,
    endpoint: str | None = None,
    progress: bool = True,
    note: Callable[[str], None] = lambda _: None,
) -> ModelFetch:
    """Download (or reuse) repo@revision into models_dir/<revision>, verify it, and mark it complete."""
    target = model_path(models_dir, revision)
    marker = read_marker(target, repo, revision)
    if marker is not None:
        note(f"reusing {target} ({repo}@{revision}, commit {marker['commit'][:12]})")
        return ModelFetch(
            str(target),
            repo,
            revision,
            marker["commit"],
            sum(marker["files"].values()),
            len(marker["files"]),
            reused=True,
        )
    snapshot = remote_snapshot(repo, revision, token, endpoint)
    check_disk(target, missing_bytes(snapshot, target))
    for attempt in (1, 2):
        todo = missing_bytes(snapshot, target)
        note(
            f"fetching {repo}@{revision} (commit {snapshot.commit[:12]}): {len(snapshot.files)} files, "
            f"{_gib(snapshot.total_bytes)} GiB, {_gib(todo)} GiB to download into {target}"
        )
        _download(snapshot, target, token, endpoint, progress)
        note(f"verifying sizes and sha256 of {len(snapshot.files)} files")
        bad = verify_files(snapshot, target)
        if not bad:
            break
        for rel in bad:
            _discard(target, rel)
        if attempt == 2:
            raise EnvironmentMissing(
                f"downloaded files do not match the hub's hashes: {', '.join(bad[:3])}",
                "check the disk and network, then run `deploy fetch-model` again",
            )
        note(f"integrity check failed for {', '.join(bad[:3])}; downloading them again")
    marker_data = {
        "repo": repo,
        "revision": revision,
        "commit": snapshot.commit,
        "files": {f.path: f.size for f in snapshot.files},
    }
    write_text(target / MODEL_MARKER, json.dumps(marker_data, indent=2) + "\n")
    return ModelFetch(
        str(target), repo, revision, snapshot.commit, snapshot.total_bytes, len(snapshot.files), reused=False
    )


@dataclass(frozen=True)
class FetchedFile:
    """One file of a branch, pinned to the branch's commit, in the model folder fetch-model fills."""

    path: str
    repo: str
    revision: str
    commit: str
    size: int
    reused: bool  # taken from a complete model folder without asking the hub

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def fetch_file(
    repo: str,
    revision: str,
    models_dir: Path,
    token: str | None,
    *,
    filename: str,
    limit: int,
    endpoint: str | None = None,
    progress: bool = True,
) -> FetchedFile:
    """One file of repo@revision (a quant's quantization_config.json) into models_dir/<revision>/, the folder
    fetch-model fills. A complete model folder's copy (completion marker) is used without the network; otherwise
    the hub names the branch's commit and the file's size (refused above `limit` before a byte is fetched), that
    commit's file is downloaded (huggingface_hub's local-dir metadata lets a later fetch-model keep it) and its size
    and, for an LFS file, sha256 are checked."""
    target = model_path(models_dir, revision)
    if not safe_file_name(filename):
        raise BadInput(f"unsafe file name {filename!r}", "name a file of the branch")
    marker = read_marker(target, repo, revision)
    if marker is not None and isinstance(marker["files"].get(filename), int):
        return FetchedFile(
            str(target / filename), repo, revision, marker["commit"], marker["files"][filename], reused=True
        )
    snapshot = remote_snapshot(repo, revision, token, endpoint)
    where = f"{repo}@{revision}"
    remote = next((f for f in snapshot.files if f.path == filename), None)
    if remote is None:
        raise BadInput(f"{where} has no {filename}", "choose a branch that holds an EXL3 quant")
    if remote.size > limit:
        raise EnvironmentMissing(
            f"the hub lists {filename} of {where} at {_gib(remote.size)} GiB, more than the "
            f"{limit / 2**20:.0f} MiB such a file has",
            "check HF_ENDPOINT and the branch",
        )
    check_disk(target, remote.size)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    target.mkdir(parents=True, exist_ok=True)
    (enable_progress_bars if progress else disable_progress_bars)()
    with _hub_errors(repo, revision):
        hf_hub_download(
            repo,
            filename,
            revision=snapshot.commit,
            local_dir=target,
            token=token or False,
            endpoint=endpoint,
        )
    local = target / filename
    pinned = RemoteSnapshot(repo, revision, snapshot.commit, (remote,))
    if verify_files(pinned, target):
        _discard(target, filename)
        raise EnvironmentMissing(
            f"{filename} of {where} does not match the hub's size or sha256", "run the command again"
        )
    return FetchedFile(str(local), repo, revision, snapshot.commit, remote.size, reused=False)


def verify_files(snapshot: RemoteSnapshot, target: Path) -> list[str]:
    """Paths whose size or sha256 differs from the hub's report (hashing runs in threads: hashlib frees the GIL)."""
    bad = [
        f.path
        for f in snapshot.files
        if not (target / f.path).is_file() or (target / f.path).stat().st_size != f.size
    ]
    to_hash = [f for f in snapshot.files if f.sha256 and f.path not in bad]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda f: _sha256(target / f.path), to_hash)
        bad += [f.path for f, digest in zip(to_hash, digests) if digest != f.sha256]
    return sorted(bad)


def check_disk(target: Path, need_bytes: int) -> None:
    """Free space at the models folder must cover what is left to download plus a margin (exit 4 otherwise)."""
    disk.check_free(target, need_bytes, "the model", "free disk space or pass --models-dir on a larger disk")


def _download(
    snapshot: RemoteSnapshot, target: Path, token: str | None, endpoint: str | None, progress: bool
) -> None:
    """snapshot_download pinned to the resolved commit (no branch race); progress bars go to stderr."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    target.mkdir(parents=True, exist_ok=True)
    (enable_progress_bars if progress else disable_progress_bars)()
    with _hub_errors(snapshot.repo, snapshot.revision):
        snapshot_download(
            snapshot.repo, revision=snapshot.commit, local_dir=target, token=token or False, endpoint=endpoint
        )


def _discard(target: Path, rel: str) -> None:
    """Forget a bad file and huggingface_hub's metadata for it, so the next download fetches it again."""
    (target / rel).unlink(missing_ok=True)
    (target / ".cache" / "huggingface" / "download" / f"{rel}.metadata").unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


@contextmanager
def _hub_errors(repo: str, revision: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line toolkit errors (never showing the token)."""
    from huggingface_hub import errors

    where = f"{repo}@{revision}"
    try:
        yield
    except ToolkitError:
        raise
    except errors.RevisionNotFoundError:
        raise BadInput(
            f"branch not found on the hub: {where}", "choose a quant listed by `deploy plan`"
        ) from None
    except errors.GatedRepoError:
        raise EnvironmentMissing(
            f"{where} is gated", "accept its terms on the hub and set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise EnvironmentMissing(
            f"repository not found or not accessible: {where}",
            "check the name; for a private repo set HF_TOKEN or --hf-token-file",
        ) from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise EnvironmentMissing(
            f"the hub answered HTTP {status} for {where}", "retry later; run again to resume"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # huggingface_hub parsing an answer that is not the hub's (a redirect elsewhere, a hostile server)
        raise EnvironmentMissing(
            f"the hub's answer for {where} is not what a hub sends ({type(exc).__name__})",
            "check HF_ENDPOINT (it must point at a Hugging Face hub)",
        ) from None
    except Exception as exc:
        xet = type(exc) is RuntimeError  # how hf_xet reports a failed Xet transfer
        if not (isinstance(exc, OSError) or xet or "httpx" in type(exc).__module__):
            raise
        first_line = (str(exc).splitlines() or [""])[0][:160]
        xet_hint = " (or set HF_HUB_DISABLE_XET=1 to skip Xet storage)" if xet else ""
        raise EnvironmentMissing(
            f"download of {where} failed ({type(exc).__name__}: {first_line})",
            f"check the network (or HF_ENDPOINT); run again to resume{xet_hint}",
        ) from None
