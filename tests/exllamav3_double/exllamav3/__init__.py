"""TEST DOUBLE of exllamav3 (mix assembly only): see tests/exllamav3_double/README.md."""

from .model import Config, Model
from .version import __version__

TEST_DOUBLE = True

__all__ = ["TEST_DOUBLE", "Config", "Model", "__version__"]
