"""Files the command line is handed, read defensively: regular files only, size-capped, UTF-8, bounded nesting.

Every file a user (or a server, or an earlier run) put where the CLI reads it goes through here: key and token
files, plans, references, prompt sets, fleets, detect JSON, profiles, and the files of a rendered out folder. A
FIFO would block forever, a device or an 8 GiB sparse file would exhaust memory, a gzip bomb would inflate to
gigabytes, and deeply nested JSON/YAML would exhaust the parser's stack: each is one BadInput line (exit 2)
naming the file. Output paths are checked before any work is done, so that a run never ends by failing to write.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import zlib
from pathlib import Path
from typing import Any

import yaml

from .errors import BadInput

KIB = 1 << 10
MIB = 1 << 20
# Caps per kind of input: generous for what glm-deploy writes, small against what could exhaust a host.
KEY_FILE_BYTES = 64 * KIB  # an API key, api_tokens.yml, an HF token
SMALL_FILE_BYTES = 4 * MIB  # plans, manifests, state, fleets, detect JSON, profiles, prompt sets
REFERENCE_BYTES = 128 * MIB  # a reference file, compressed and (separately) inflated
MAX_DEPTH = 64  # JSON/YAML nesting: glm-deploy's own files nest fewer than 10 levels


def _refuse(what: str, path: object, problem: str, hint: str) -> BadInput:
    return BadInput(f"{what} {path} {problem}", hint)


def read_bytes(path: Path | str, what: str, limit: int, hint: str = "pass a regular file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FIFOs, devices and folders refused unopened)."""
    name = str(path)
    if not name or "\x00" in name:
        raise _refuse(what, repr(name), "is not a file name", hint)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below then refuses it.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise BadInput(f"cannot read {what} {name}: {error.strerror}", hint) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
            )
            raise _refuse(what, name, f"is {kind}", hint)
        if info.st_size > limit:
            raise _refuse(what, name, f"is larger than {_size(limit)} ({_size(info.st_size)})", hint)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as error:
        raise BadInput(f"cannot read {what} {name}: {error.strerror}", hint) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _refuse(what, name, f"is larger than {_size(limit)}", hint)
    return data


def read_text(
    path: Path | str, what: str, limit: int = SMALL_FILE_BYTES, hint: str = "pass a regular file"
) -> str:
    """A regular UTF-8 text file of at most `limit` bytes."""
    return decode(read_bytes(path, what, limit, hint), what, path, hint)


def read_stdin(what: str, limit: int = SMALL_FILE_BYTES) -> str:
    """Standard input as UTF-8 text, at most `limit` bytes."""
    try:
        data = sys.stdin.buffer.read(limit + 1)
    except (OSError, AttributeError, ValueError) as error:
        raise BadInput(f"cannot read {what} from stdin ({error})", "pass a file instead of -") from None
    if len(data) > limit:
        raise BadInput(f"{what} on stdin is larger than {_size(limit)}", "pass the file itself")
    return decode(data, what, "on stdin", "pass UTF-8 text")


def decode(data: bytes, what: str, path: Path | str, hint: str = "pass UTF-8 text") -> str:
    """UTF-8 text, or one line naming the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(what, path, "is not UTF-8 text", hint) from None


def inflate(data: bytes, what: str, path: Path | str, limit: int) -> bytes:
    """gzip data inflated as a stream that stops at `limit` bytes (a 4 MB bomb never becomes 4 GB)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    chunks: list[bytes] = []
    size = 0
    pending = data
    try:
        while pending and not inflater.eof:
            chunk = inflater.decompress(pending, limit + 1 - size)
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                raise _refuse(what, path, f"inflates to more than {_size(limit)}", "pass an honest file")
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise _refuse(what, path, "is not valid gzip", "pass a .json or .json.gz file") from None
    if not inflater.eof:
        raise _refuse(what, path, "is truncated gzip", "pass a complete file")
    return b"".join(chunks)


def parse_json(
    text: str | bytes, what: str, path: Path | str, hint: str = "fix the file", constants: bool = False
) -> Any:
    """JSON nested at most MAX_DEPTH levels; NaN and Infinity literals are refused (they are not numbers) unless
    `constants` (then the caller checks every number, and can say where the bad one is)."""
    try:
        value = json.loads(text, parse_constant=float if constants else _no_constant)
    except _Constant as error:
        raise _refuse(what, path, str(error), hint) from None
    except (ValueError, RecursionError):
        raise _refuse(what, path, "is not JSON", hint) from None
    check_depth(value, what, path, hint)
    return value


def parse_yaml(text: str, what: str, path: Path | str, hint: str = "fix the file") -> Any:
    """YAML through the safe loader, nested at most MAX_DEPTH levels (aliases are followed once each)."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        raise _refuse(what, path, "is not valid YAML", hint) from None
    check_depth(value, what, path, hint)
    return value


class _Constant(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Constant(f"holds {name}, which is not a number")


def check_depth(value: Any, what: str, path: Path | str, hint: str) -> None:
    """Walk the parsed value without recursion: deeper than MAX_DEPTH, or a value reached twice (a YAML alias, which
    can make a structure refer to itself or expand without bound), is refused."""
    seen: set[int] = set()
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise _refuse(what, path, f"nests deeper than {MAX_DEPTH} levels", hint)
        if id(item) in seen:
            raise _refuse(what, path, "refers to one value twice (a YAML alias)", "write the value out")
        seen.add(id(item))
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _size(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB" if n >= KIB else f"{n} bytes"


def output_file(path: str, what: str) -> Path:
    """An output file path checked before any work: a name, not a folder/FIFO/device, in a folder that exists or
    is created now (so that a run never ends by failing to write its report)."""
    if not path or "\x00" in path:
        raise BadInput(f"{what} {path!r} is not a file name", f"give {what} a file path, e.g. report.xml")
    target = Path(path)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(
            f"{what} {path}: cannot create the folder {parent} ({error.strerror})", "choose another path"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {path}: the folder {parent} is not writable", "choose a writable folder")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise BadInput(f"{what} {path} exists and is not a regular file", "give a new or regular file path")
    return target


def output_folder(path: str, what: str = "--out") -> Path:
    """An output folder path checked before any work: a name, not an existing non-folder, under a folder."""
    if not path or "\x00" in path:
        raise BadInput(
            f"{what} {path!r} is not a folder name", f"give {what} a folder path, e.g. {what} deploy-out"
        )
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_dir():
        raise BadInput(f"{what} {target} exists and is not a folder", f"choose another {what}")
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"{what} {target}: {ancestor} is not a folder", f"choose another {what}")
    return target
