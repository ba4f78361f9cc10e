"""Entry point: `python3 -m tabby_test_server` (image) or `python3 -m tests.tabby_test_server` (checkout)."""

import sys

from .app import main

sys.exit(main(sys.argv[1:]))
