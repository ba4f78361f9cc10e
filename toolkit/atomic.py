"""Write files so that a failure never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Write text to a temp file in the same folder (0600 from the start), fsync, chmod/chown, rename over path."""
    write_bytes(path, text.encode("utf-8"), mode, owner)


def write_bytes(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """write_text for bytes. A path that is a folder, FIFO or device is refused (a rename would replace it)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        from .errors import BadInput

        raise BadInput(f"{path} exists and is not a regular file", "remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
