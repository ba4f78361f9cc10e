"""Keys never leave their files, and text from elsewhere is shown as the characters it is.

Every secret the CLI reads (an API key, an HF token) is registered here when it is read; the CLI's output streams
and every report it writes (JSON, JUnit, references) pass through redact(), so a server or a library that echoes
a key back (in an error, a model id, an exception) never gets it printed or stored. printable() turns text from
servers and files into one inert line: control characters (newlines, carriage returns, terminal escapes, bidi
overrides) are shown as escapes, so they cannot forge lines or drive the terminal.
"""

from __future__ import annotations

import unicodedata
from typing import Any, TextIO

REDACTED = "[redacted]"
# Shorter strings are not treated as secrets: redacting "a" would garble every line.
MIN_SECRET_CHARS = 8

_secrets: set[str] = set()


def register(secret: str | None) -> None:
    """Remember a secret so that redact() removes it from everything printed or reported from now on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        _secrets.add(secret)


def redact(text: str) -> str:
    """The text with every registered secret replaced by [redacted]."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_data(value: Any) -> Any:
    """A JSON-like value with every string redacted (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


def printable(text: object, limit: int = 500) -> str:
    """Text from a server or a file as one inert line: control and format characters escaped, at most `limit`."""
    out = []
    for char in str(text):
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(
                {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
                or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
            )
        else:
            out.append(char)
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class RedactingStream:
    """A text stream that redacts registered secrets from everything written to it (stdout, stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
