"""Build the test image carrying the exllamav3 TEST DOUBLE (used by the Docker test of `deploy quant mix`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONTEXT_DIR = Path(__file__).resolve().parent


def build_double_image(client: Any, tag: str, base: str) -> str:
    """Build Dockerfile FROM `base` as `tag`; returns the image id. The caller owns the tag and removes it."""
    image, _logs = client.images.build(
        path=str(CONTEXT_DIR), tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True, pull=False
    )
    return str(image.id)
