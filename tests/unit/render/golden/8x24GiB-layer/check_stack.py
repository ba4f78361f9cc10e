"""Build step of the TabbyAPI image: fail unless the installed packages are exactly the pinned stack's versions.

Usage (the rendered Dockerfile runs it after the pip steps; stdlib only):
    python3 check_stack.py exllamav3=1.6.5 torch=2.9.0+cu128
"""

from __future__ import annotations

import sys
from importlib import metadata


def installed(name: str) -> str | None:
    """The version pip installed, as importlib.metadata reads it (what `deploy status` reads too)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    """Print each package's version against the stack's; exit 1 on any difference."""
    wrong = []
    for pair in argv:
        name, _, want = pair.partition("=")
        have = installed(name)
        print(f"check_stack: {name} {have or 'not installed'} (stack: {want})", flush=True)
        if have != want:
            wrong.append(f"{name} {have or 'not installed'} instead of {want}")
    if not argv or wrong:
        print(
            "check_stack: the image does not hold the pinned stack: "
            + ("; ".join(wrong) or "nothing to check"),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
