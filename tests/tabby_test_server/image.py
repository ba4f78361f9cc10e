"""Build the test server image (used by every Docker test that needs "a TabbyAPI" without a GPU).

The image carries what the rendered compose file and `deploy status` use in a real TabbyAPI image: the health
probe (dockerfiles/healthcheck.py, at the same path), package metadata for exllamav3 and torch (TEST DOUBLES: a
dist-info folder each, no code) and the TabbyAPI commit file the rendered Dockerfile writes; and, for the mix step
of a deployment (`deploy mix-model`, which runs toolkit.quant.mix_entry in the built image), the exllamav3 TEST
DOUBLE of the mix assembly (tests/exllamav3_double) on its PYTHONPATH.
Their versions default to the pinned stack (profiles/tabbyapi.yaml, CUDA 12: what a plan for --gpus gets), so a
test can build an image that matches its plan or one that differs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.facts import layout
from toolkit.facts.paths import DOCKERFILES_DIR
from toolkit.facts.tabby_pin import load_tabby_pin

CONTEXT_DIR = Path(__file__).resolve().parent
# The image's non-root user: mounted secrets (0600) must be owned by it, or run the container as their owner.
TEST_SERVER_UID = 10001
DOUBLES_DIR = "test-double-dists"  # on the image's PYTHONPATH (Dockerfile)
MIX_DOUBLE_DIR = "exllamav3-double"  # the exllamav3 TEST DOUBLE of the mix assembly, on the PYTHONPATH too
EXLLAMAV3_DOUBLE = CONTEXT_DIR.parent / "exllamav3_double" / "exllamav3"


@dataclass(frozen=True)
class ImageStack:
    """What the image reports as its serving stack."""

    tabbyapi: str
    exllamav3: str
    torch: str


def pinned_stack(cuda: str = "12") -> ImageStack:
    """The pinned stack of profiles/tabbyapi.yaml in one CUDA variant."""
    pin = load_tabby_pin()
    return ImageStack(pin.ref, pin.exllamav3, pin.variant(cuda).torch)


def write_stack_doubles(folder: Path, packages: dict[str, str]) -> Path:
    """Metadata-only dist-info folders (TEST DOUBLES, no code) so importlib.metadata reports these versions."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in packages.items():
        info = folder / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: glm-deploy TEST DOUBLE: package metadata only, no code\n",
            encoding="utf-8",
        )
    return folder


def prepare_context(dest: Path, stack: ImageStack | None = None) -> Path:
    """A build context: the test server's files, the image's health probe, the stack's test doubles and the mix
    assembly's exllamav3 double (dest must not exist)."""
    stack = stack or pinned_stack()
    shutil.copytree(CONTEXT_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "glm-deploy").mkdir()
    shutil.copy(DOCKERFILES_DIR / layout.HEALTHCHECK_SCRIPT, dest / "glm-deploy" / layout.HEALTHCHECK_SCRIPT)
    write_stack_doubles(dest / DOUBLES_DIR, {"exllamav3": stack.exllamav3, "torch": stack.torch})
    shutil.copytree(
        EXLLAMAV3_DOUBLE,
        dest / MIX_DOUBLE_DIR / "exllamav3",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    # What the rendered Dockerfile writes at build: the ref built, its commit, the tree's HEAD.
    record = {"ref": stack.tabbyapi, "commit": stack.tabbyapi, "head": stack.tabbyapi}
    (dest / ".glm-deploy-tabby.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return dest


def build_test_server_image(
    client: Any, tag: str, base: str, workdir: Path, stack: ImageStack | None = None
) -> str:
    """Build tests/tabby_test_server/Dockerfile FROM `base` as `tag` (context assembled under workdir); returns
    the image id. The caller owns the tag and removes it (client.images.remove(tag)) when done."""
    context = prepare_context(workdir / f"context-{tag.replace(':', '-').replace('/', '-')}", stack)
    image, _logs = client.images.build(
        path=str(context), tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True, pull=False
    )
    return str(image.id)
