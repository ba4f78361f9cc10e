"""Build the test server image (used by every Docker test that needs "a TabbyAPI" without a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONTEXT_DIR = Path(__file__).resolve().parent
# The image's non-root user: mounted secrets (0600) must be owned by it, or run the container as their owner.
TEST_SERVER_UID = 10001


def build_test_server_image(client: Any, tag: str, base: str) -> str:
    """Build tests/tabby_test_server/Dockerfile FROM `base` as `tag`; returns the image id.

    The caller owns the tag and removes it (client.images.remove(tag)) when done.
    """
    image, _logs = client.images.build(
        path=str(CONTEXT_DIR), tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True, pull=False
    )
    return str(image.id)
