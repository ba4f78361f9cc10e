"""TEST DOUBLE of the Hugging Face Hub boundary: a local HTTP server speaking the endpoints huggingface_hub uses."""

from .server import FakeHub, FakeRepo

__all__ = ["FakeHub", "FakeRepo"]
