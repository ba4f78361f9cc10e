"""Validators for every value that reaches a Dockerfile, shell line, YAML or compose: reject, never escape."""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re

from .errors import BadInput

HEX_REF = re.compile(r"^[0-9a-f]{7,40}\Z")
FULL_SHA = re.compile(r"^[0-9a-f]{40}\Z")
# A tag or branch as git check-ref-format would accept it, narrowed to characters that are inert in sh and
# YAML.
SAFE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}\Z")
# Quant branches, model folders, profile names: one path segment, no shell or YAML metacharacters.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z")
# NVML UUIDs ("GPU-8c1f...", "MIG-...") or an index.
DEVICE_ID = re.compile(r"^(?:(?:GPU|MIG)-[A-Za-z0-9-]{1,100}|[0-9]{1,3})\Z")
COMPUTE_CAPABILITY = re.compile(r"^[0-9]{1,2}\.[0-9]\Z")
CUDA_VERSION = re.compile(r"^([0-9]{1,3})\.([0-9]{1,3})\Z")
# Image references: [host[:port]/]path[:tag][@sha256:digest], lower-case path as Docker requires.
IMAGE_REF = re.compile(
    r"^(?:[A-Za-z0-9.-]+(?::[0-9]{1,5})?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?\Z"
)
GIT_URL = re.compile(r"^(?:https://|file:///|/)[A-Za-z0-9._~/:@+-]{1,300}\Z")
# Absolute host paths: printable ASCII without quotes, backslash, `$`, backtick or anything a
# dotenv/YAML/shell parser treats specially. Spaces are allowed (values are single-quoted in .env).
HOST_PATH = re.compile(r"^/[A-Za-z0-9._/+@,=~ -]{0,4000}\Z")
CACHE_MODE = re.compile(r"^([2-8]),([2-8])\Z")
# A released package version as pip reports it ("1.6.5", "2.9.0+cu128"): digits, dots, one local label.
PACKAGE_VERSION = re.compile(r"^[0-9]{1,4}(?:\.[0-9]{1,4}){1,3}(?:\+[a-z0-9]{1,20})?\Z")
# https URLs of package indexes and wheels: no quotes, spaces, '$' or anything a shell or YAML would act on.
HTTPS_URL = re.compile(r"^https://[A-Za-z0-9.-]{1,253}(?:/[A-Za-z0-9._~%+-]{1,200}){0,20}/?\Z")
# A requirement as pip takes it on a command line: a name with an optional lower bound ("numpy>=2.1.0").
REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(?:>=[0-9][0-9.]{0,30})?\Z")


def _shown(value: object) -> str:
    """The value as it may be echoed in an error: repr, shortened (repr escapes control characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def git_ref(value: str, what: str = "--tabby-ref") -> str:
    """A commit (7-40 hex) or a plain tag/branch name that cannot be read as an option or a path trick."""
    if not isinstance(value, str) or not (HEX_REF.match(value) or SAFE_REF.match(value)):
        raise BadInput(
            f"{what} {_shown(value)} is not a commit SHA or a safe ref name",
            "give 7-40 hex digits, or a tag/branch of letters, digits, '.', '_', '-', '/'",
        )
    if ".." in value or "//" in value or value.endswith(("/", ".", ".lock")) or "/." in value:
        raise BadInput(f"{what} {_shown(value)} is not a valid git ref name", "give a commit SHA or a tag")
    return value


def full_sha(value: str, what: str) -> str:
    """A full 40-hex commit id (pins in data files must not be abbreviated)."""
    if not isinstance(value, str) or not FULL_SHA.match(value):
        raise BadInput(f"{what} {_shown(value)} is not a full 40-hex commit SHA", "fix the data file")
    return value


def safe_name(value: str, what: str) -> str:
    """One path segment of letters, digits, '.', '_', '-' (quant branches, folder names, profile names)."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or value in (".", ".."):
        raise BadInput(f"{what} {_shown(value)} is not a safe name", "use letters, digits, '.', '_' and '-'")
    return value


def repo_id(value: str, what: str = "hf_repo") -> str:
    """A Hugging Face owner/name repository id."""
    if not isinstance(value, str) or not REPO_ID.match(value):
        raise BadInput(
            f"{what} {_shown(value)} is not an owner/name repository id", "fix the plan or profile"
        )
    return value


def device_id(value: str) -> str:
    """An NVML GPU UUID or an index, as compose's device_ids takes it."""
    if not isinstance(value, str) or not DEVICE_ID.match(value):
        raise BadInput(f"GPU id {_shown(value)} is not an NVML UUID or an index", "re-run `deploy detect`")
    return value


def compute_capability(value: str) -> str:
    """A compute capability such as "9.0"."""
    if not isinstance(value, str) or not COMPUTE_CAPABILITY.match(value):
        raise BadInput(f"compute capability {_shown(value)} is not of the form N.M", "re-run `deploy detect`")
    return value


def cuda_version(value: str, what: str) -> tuple[int, int]:
    """A CUDA version "13.0" as (13, 0)."""
    match = CUDA_VERSION.match(value) if isinstance(value, str) else None
    if not match:
        raise BadInput(f"{what} {_shown(value)} is not a CUDA version like 12.8", "re-run `deploy detect`")
    return int(match.group(1)), int(match.group(2))


def image_ref(value: str, what: str) -> str:
    """A Docker image reference."""
    if not isinstance(value, str) or not IMAGE_REF.match(value):
        raise BadInput(f"{what} {_shown(value)} is not a Docker image reference", "fix the data file")
    return value


def git_url(value: str, what: str) -> str:
    """An https:// or file:// git URL (or an absolute path) with no shell-active characters."""
    if not isinstance(value, str) or not GIT_URL.match(value) or ".." in value:
        raise BadInput(f"{what} {_shown(value)} is not a safe git URL", "use https://... or file:///...")
    return value


def host_path(value: str, what: str = "--models-dir") -> str:
    """An absolute host path, normalised; no control characters, quotes, '$', backslashes or '..' segments."""
    if not isinstance(value, str) or not HOST_PATH.match(value):
        raise BadInput(
            f"{what} {_shown(value)} is not a safe absolute path",
            "use an absolute path of letters, digits, spaces and ._/+@,=~-",
        )
    if ".." in value.split("/"):
        raise BadInput(f"{what} {_shown(value)} contains a '..' segment", "give the resolved absolute path")
    normal = posixpath.normpath(value)
    return "/" + normal.lstrip("/") if normal != "/" else normal


def port(value: object, what: str = "--port") -> int:
    """A TCP port 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise BadInput(f"{what} {_shown(value)} is not a TCP port", "use 1-65535")
    return value


def bind_address(value: str) -> str:
    """An IPv4 or IPv6 literal (no host names: compose publishes on addresses)."""
    try:
        address = ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise BadInput(
            f"--bind {_shown(value)} is not an IP address", "use 127.0.0.1 (default), 0.0.0.0 or ::1"
        ) from None
    if getattr(address, "scope_id", None):
        raise BadInput(f"--bind {_shown(value)} has a zone id", "use a plain address")
    return str(address)


def cache_mode(value: str) -> str:
    """TabbyAPI's cache_mode spelling: "FP16" or "k,v" with 2 <= k, v <= 8."""
    if value != "FP16" and not (isinstance(value, str) and CACHE_MODE.match(value)):
        raise BadInput(f"cache mode {_shown(value)} is not FP16 or k,v", "use FP16 or e.g. 6,5")
    return value


def positive_int(value: object, what: str, high: int = 10**7) -> int:
    """An integer 1..high (token counts, chunk sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise BadInput(f"{what} {_shown(value)} is not an integer in 1..{high}", "fix the plan")
    return value


def finite_number(value: object, what: str, low: float = 0.0, high: float = 1e7) -> float:
    """A finite number in [low, high] (GiB figures, GB per GPU)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise BadInput(f"{what} {_shown(value)} is not a number in [{low}, {high}]", "fix the plan")
    return float(value)


def package_version(value: str, what: str) -> str:
    """A release version such as 1.6.5 or 2.9.0+cu128 (the stack's exllamav3 and torch)."""
    if not isinstance(value, str) or not PACKAGE_VERSION.match(value):
        raise BadInput(
            f"{what} {_shown(value)} is not a package version like 1.6.5", "give a released version"
        )
    return value


def https_url(value: str, what: str) -> str:
    """An https:// URL of a package index or a wheel, with no shell-active characters."""
    if not isinstance(value, str) or not HTTPS_URL.match(value) or ".." in value:
        raise BadInput(f"{what} {_shown(value)} is not a safe https URL", "fix the data file")
    return value


def requirement(value: str, what: str) -> str:
    """A pip requirement: a package name, optionally with a >= lower bound."""
    if not isinstance(value, str) or not REQUIREMENT.match(value):
        raise BadInput(f"{what} {_shown(value)} is not a package requirement", "e.g. numpy>=2.1.0")
    return value
