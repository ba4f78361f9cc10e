"""scripts/apt_mirror.py: the debootstrap mirror comes from the host's own apt sources, in either format."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "apt_mirror.py"
_spec = importlib.util.spec_from_file_location("apt_mirror", SCRIPT)
assert _spec is not None and _spec.loader is not None
apt_mirror = importlib.util.module_from_spec(_spec)
sys.modules["apt_mirror"] = apt_mirror  # dataclasses look their module up
_spec.loader.exec_module(apt_mirror)


def _host(
    tmp_path: Path, files: dict[str, str], os_release: str = "ID=debian\nVERSION_CODENAME=bookworm\n"
) -> Path:
    """A fake filesystem root with /etc/os-release and the given files under /etc/apt."""
    (tmp_path / "etc" / "apt" / "sources.list.d").mkdir(parents=True)
    (tmp_path / "etc" / "os-release").write_text(os_release)
    for name, text in files.items():
        (tmp_path / "etc" / "apt" / name).write_text(text)
    return tmp_path


DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_sources_give_the_uri_of_the_stanza_that_carries_the_suite(tmp_path: Path) -> None:
    root = _host(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert apt_mirror.mirror_for("bookworm", "debian", root) == "http://mirror.example/debian"
    assert (
        apt_mirror.mirror_for("bookworm-security", "debian", root) == "http://mirror.example/debian-security"
    )


def test_one_line_sources_with_options_and_comments(tmp_path: Path) -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian/ bookworm main\n"
    )
    root = _host(tmp_path, {"sources.list": text})
    assert apt_mirror.mirror_for("bookworm", "debian", root) == "http://mirror.example/debian"


def test_another_release_of_the_hosts_distribution_uses_the_hosts_mirror(tmp_path: Path) -> None:
    root = _host(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert apt_mirror.mirror_for("trixie", "debian", root) == "http://mirror.example/debian"


def test_no_mirror_of_another_distribution_is_made_up(tmp_path: Path) -> None:
    root = _host(tmp_path, {"sources.list.d/debian.sources": DEB822})
    with pytest.raises(LookupError, match="no ubuntu mirror for noble"):
        apt_mirror.mirror_for("noble", "ubuntu", root)
    ubuntu = _host(
        tmp_path / "u",
        {"sources.list": "deb http://archive.example/ubuntu noble main\n"},
        "ID=ubuntu\nVERSION_CODENAME=noble\n",
    )
    assert apt_mirror.mirror_for("noble", "ubuntu", ubuntu) == "http://archive.example/ubuntu"


def test_disabled_entries_and_files_are_ignored(tmp_path: Path) -> None:
    root = _host(
        tmp_path,
        {
            "sources.list.d/old.list.disabled": "deb http://disabled-file.example/debian bookworm main\n",
            "sources.list.d/off.sources": DEB822.replace("Types: deb\n", "Types: deb\nEnabled: no\n", 1),
            "sources.list.d/other.list": "deb https://vendor.example/apt stable main\n",
        },
    )
    with pytest.raises(LookupError):
        apt_mirror.mirror_for("bookworm", "debian", root)


def test_command_line_prints_the_mirror_or_one_line_and_exit_1(tmp_path: Path) -> None:
    root = _host(tmp_path, {"sources.list.d/debian.sources": DEB822})
    found = subprocess.run(
        [sys.executable, str(SCRIPT), "bookworm", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (found.returncode, found.stdout) == (0, "http://mirror.example/debian\n")
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), "noble", "--distro", "ubuntu", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and missing.stdout == "" and len(missing.stderr.splitlines()) == 1


def test_no_host_name_is_hard_coded_in_the_set_up_scripts() -> None:
    for script in ("make-test-base-image.sh", "setup-dev.sh", "install.sh", "apt_mirror.py"):
        assert not re.search(r"(https?|ftp)://[A-Za-z0-9-]+\.", (ROOT / "scripts" / script).read_text()), (
            script
        )
