"""Free disk space before a large write (a download, a mix): one margin rule, one refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import EnvironmentMissing

GIB = 2**30


def margin_bytes(need_bytes: int) -> int:
    """Headroom kept free beside what is written: 2 GiB plus 2 % (logs, temp files, filesystem slack)."""
    return 2 * GIB + need_bytes // 50


def check_free(where: Path, need_bytes: int, what: str, hint: str, digits: int = 1) -> None:
    """The filesystem that will hold `where` (its nearest existing folder) has need_bytes plus the margin free;
    else exit 4 saying how much `what` needs."""
    if need_bytes <= 0:
        return
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = need_bytes + margin_bytes(need_bytes)
    if free < want:

        def gib(n: int) -> str:
            return f"{n / GIB:.{digits}f}"

        raise EnvironmentMissing(
            f"not enough disk at {probe}: {gib(free)} GiB free, {what} needs {gib(want)} GiB "
            f"({gib(need_bytes)} GiB + margin)",
            hint,
        )
