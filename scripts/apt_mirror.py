#!/usr/bin/env python3
"""Print the package mirror the host's own apt configuration names, so debootstrap uses no hard-coded host.

Usage: python3 scripts/apt_mirror.py SUITE [--distro debian|ubuntu] [--root /]

Reads /etc/apt/sources.list, /etc/apt/sources.list.d/*.list (one-line format) and *.sources (deb822, `URIs:`),
`deb` entries only, enabled ones only. The answer is the URI of an entry that lists SUITE itself; failing that,
when the host runs DISTRO, the URI of the entry for the host's own release (the same mirror carries the other
releases of its distribution). Exit 1 with one line on stderr when the host's sources name no such mirror.
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry: where it points and which suites it carries."""

    uri: str
    suites: tuple[str, ...]
    origin: str  # the file it came from, for messages


def _one_line_entries(path: Path) -> list[AptSource]:
    """`deb [options] URI SUITE [COMPONENT...]` lines of a .list file."""
    entries = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb ") and not line.startswith("deb\t"):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            entries.append(AptSource(words[0].rstrip("/"), (words[1],), str(path)))
    return entries


def _deb822_entries(path: Path) -> list[AptSource]:
    """Stanzas of a .sources file with `Types: deb`, `URIs:` and `Suites:` (and not `Enabled: no`)."""
    entries = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key is not None:
                fields[key] += " " + raw.strip()
                continue
            name, _, value = raw.partition(":")
            key = name.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        entries.extend(
            AptSource(uri.rstrip("/"), suites, str(path)) for uri in fields.get("uris", "").split()
        )
    return entries


def apt_sources(root: Path) -> list[AptSource]:
    """Every enabled `deb` entry of the host's apt configuration, in apt's reading order."""
    apt = root / "etc" / "apt"
    entries: list[AptSource] = []
    if (apt / "sources.list").is_file():
        entries += _one_line_entries(apt / "sources.list")
    folder = apt / "sources.list.d"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix == ".list":
            entries += _one_line_entries(path)
        elif path.suffix == ".sources":
            entries += _deb822_entries(path)
    return entries


def os_release(root: Path) -> dict[str, str]:
    """ID and VERSION_CODENAME of the host (os-release)."""
    for path in (root / "etc" / "os-release", root / "usr" / "lib" / "os-release"):
        if path.is_file():
            pairs = (line.partition("=") for line in path.read_text(encoding="utf-8").splitlines())
            return {k.strip(): v.strip().strip('"') for k, _, v in pairs if k.strip()}
    return {}


def mirror_for(suite: str, distro: str, root: Path = Path("/")) -> str:
    """The mirror URI for `suite` of `distro` according to the host's apt sources; LookupError when none."""
    entries = [e for e in apt_sources(root) if e.uri.startswith(("http://", "https://", "file:/"))]
    for entry in entries:
        if suite in entry.suites:
            return entry.uri
    release = os_release(root)
    if release.get("ID") == distro and release.get("VERSION_CODENAME"):
        for entry in entries:
            if release["VERSION_CODENAME"] in entry.suites:
                return entry.uri
    raise LookupError(
        f"the host's apt sources name no {distro} mirror for {suite} "
        f"(read {root / 'etc/apt/sources.list'} and sources.list.d/*.list, *.sources)"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the mirror, or one line saying why there is none (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite")
    parser.add_argument("--distro", default="debian", choices=["debian", "ubuntu"])
    parser.add_argument("--root", default="/", type=Path, help="filesystem root to read (for tests)")
    args = parser.parse_args(argv)
    try:
        print(mirror_for(args.suite, args.distro, args.root))
    except (LookupError, OSError) as error:
        print(f"apt_mirror: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
