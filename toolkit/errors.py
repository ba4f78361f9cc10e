"""One error type for everything a user can cause, carrying its exit code and a hint."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NO_FIT = 3
EXIT_ENVIRONMENT = 4
EXIT_VERIFY_FAILED = 5


class ToolkitError(Exception):
    """An expected failure: printed as one line (message, then hint), never as a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The single line shown to the user."""
        return f"{self.message} -- {self.hint}" if self.hint else self.message


class BadInput(ToolkitError):
    """The user's arguments or files are wrong (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class NoFit(ToolkitError):
    """Nothing fits on the given GPUs (exit 3)."""

    exit_code = EXIT_NO_FIT


class EnvironmentMissing(ToolkitError):
    """Something the host must provide is missing: NVML, Docker, the NVIDIA runtime, disk (exit 4)."""

    exit_code = EXIT_ENVIRONMENT


class VerificationFailed(ToolkitError):
    """The live server failed a check (exit 5)."""

    exit_code = EXIT_VERIFY_FAILED
