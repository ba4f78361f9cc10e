"""A TabbyAPI-compatible test server backed by a tiny numpy language model: a test double for "a GPU host"."""
