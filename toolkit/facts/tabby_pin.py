"""The pinned serving stack (profiles/tabbyapi.yaml): TabbyAPI, exllamav3, torch per CUDA variant; the variant's choice."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import validate
from ..errors import BadInput, EnvironmentMissing
from .paths import PROFILES_DIR

TABBY_PIN_FILE = PROFILES_DIR / "tabbyapi.yaml"
CUDA_CHOICES = ("auto", "13", "12")


@dataclass(frozen=True)
class CudaVariant:
    """One CUDA build of the stack: base image, the driver CUDA it needs, its torch and its exllamav3 wheel."""

    name: str  # "13" | "12"
    base_image: str
    min_driver_cuda: tuple[int, int]
    min_driver_hint: str
    torch: str  # "2.9.0+cu128": the version the image must report
    torch_index: str  # PyTorch's index for that CUDA build
    exllamav3_wheel: str  # the release wheel of the pinned exllamav3 for that torch
    exllamav3_wheel_sha256: str | None  # None: no hash was taken (see profiles/tabbyapi.yaml)


@dataclass(frozen=True)
class TabbyPin:
    """The serving stack: TabbyAPI's repository and pinned commit, PR #295, exllamav3 and the CUDA variants."""

    repo: str
    ref: str
    pr295_number: int
    pr295_head: str
    pr295_merged_by: str
    exllamav3: str  # the version every measurement ran ("1.6.5")
    exllamav3_requires: tuple[str, ...]  # its runtime dependencies (the wheel goes in with --no-deps)
    python: str  # "3.12"
    cuda: tuple[CudaVariant, ...]  # newest first

    def variant(self, name: str) -> CudaVariant:
        """The CUDA variant of that name."""
        for variant in self.cuda:
            if variant.name == name:
                return variant
        raise BadInput(f"--cuda {name!r} is not one of {', '.join(CUDA_CHOICES)}", "use auto, 13 or 12")


def _variant(data: dict[str, Any]) -> CudaVariant:
    sha256 = data["exllamav3_wheel_sha256"]
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
        raise ValueError(f"cuda.exllamav3_wheel_sha256 {sha256!r} is not null or 64 hex digits")
    return CudaVariant(
        name=validate.safe_name(str(data["name"]), "cuda.name"),
        base_image=validate.image_ref(data["base_image"], "cuda.base_image"),
        min_driver_cuda=validate.cuda_version(str(data["min_driver_cuda"]), "cuda.min_driver_cuda"),
        min_driver_hint=str(data["min_driver_hint"]),
        torch=validate.package_version(str(data["torch"]), "cuda.torch"),
        torch_index=validate.https_url(data["torch_index"], "cuda.torch_index"),
        exllamav3_wheel=validate.https_url(data["exllamav3_wheel"], "cuda.exllamav3_wheel"),
        exllamav3_wheel_sha256=sha256,
    )


def load_tabby_pin(path: Path = TABBY_PIN_FILE) -> TabbyPin:
    """Read and validate the pin file (every value in it ends up in a Dockerfile)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        pr = data["pr295"]
        pin = TabbyPin(
            repo=validate.git_url(data["repo"], "repo"),
            ref=validate.git_ref(data["ref"], "ref"),
            pr295_number=int(pr["number"]),
            pr295_head=validate.full_sha(pr["head"], "pr295.head"),
            pr295_merged_by=validate.full_sha(pr["merged_by"], "pr295.merged_by"),
            exllamav3=validate.package_version(str(data["exllamav3"]["version"]), "exllamav3.version"),
            exllamav3_requires=tuple(
                validate.requirement(item, "exllamav3.requires") for item in data["exllamav3"]["requires"]
            ),
            python=validate.package_version(str(data["python"]), "python"),
            cuda=tuple(_variant(item) for item in data["cuda"]),
        )
        for variant in pin.cuda:
            if f"/exllamav3-{pin.exllamav3}+" not in variant.exllamav3_wheel:
                raise ValueError(f"the CUDA {variant.name} wheel is not exllamav3 {pin.exllamav3}")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, BadInput) as exc:
        raise BadInput(
            f"TabbyAPI pin file {path} is unreadable or malformed ({type(exc).__name__}: {exc})",
            "restore profiles/tabbyapi.yaml",
        ) from None
    return pin


def choose_cuda(pin: TabbyPin, driver_cuda: str | None, requested: str = "auto") -> CudaVariant:
    """The newest variant the host driver runs; an unknown driver (a plan for another host) gets CUDA 12.8.

    An explicit --cuda is honoured unless the detected driver is known to be too old for it (the container
    would refuse to start: "unsatisfied condition: cuda>=X").
    """
    if requested not in CUDA_CHOICES:
        raise BadInput(f"--cuda {requested!r} is not one of {', '.join(CUDA_CHOICES)}", "use auto, 13 or 12")
    driver = None if driver_cuda is None else validate.cuda_version(driver_cuda, "CUDA driver version")
    oldest = min(pin.cuda, key=lambda v: v.min_driver_cuda)
    if requested != "auto":
        variant = pin.variant(requested)
        if driver is not None and driver < variant.min_driver_cuda:
            raise EnvironmentMissing(
                f"the NVIDIA driver supports CUDA {driver_cuda}, but --cuda {requested} needs CUDA "
                f"{_version(variant.min_driver_cuda)}",
                f"install {variant.min_driver_hint}, or use --cuda auto",
            )
        return variant
    if driver is None:
        return oldest
    for variant in sorted(pin.cuda, key=lambda v: v.min_driver_cuda, reverse=True):
        if driver >= variant.min_driver_cuda:
            return variant
    raise EnvironmentMissing(
        f"the NVIDIA driver supports CUDA {driver_cuda}; TabbyAPI's images need CUDA "
        f"{_version(oldest.min_driver_cuda)} or newer",
        f"install {oldest.min_driver_hint}",
    )


def _version(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"
