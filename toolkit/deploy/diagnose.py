"""Turn a failed container's log (or the engine's start error) into one clear message, a fix and an exit code.

Pure: text and container state in, a Diagnosis out. Patterns come from the messages the stack really prints
(../shared/facts/exllamav3.md: autosplit's "Insufficient VRAM in split for model and cache"; tabbyapi.md:
nvidia-container-cli's "unsatisfied condition: cuda>=12.8" when the host driver is older than the image's CUDA).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import EXIT_ENVIRONMENT, EXIT_NO_FIT, EXIT_VERIFY_FAILED, ToolkitError

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CRASH_LOOP_RESTARTS = 3


@dataclass(frozen=True)
class Diagnosis:
    """What went wrong, the log line that shows it, what to do, and the exit code."""

    kind: str  # oom | cuda-driver | no-gpu-runtime | missing-model | ulimit-denied | port-conflict | host-oom
    #            | crash-loop | exited
    message: str
    hint: str
    exit_code: int
    evidence: str

    def error(self) -> DiagnosedFailure:
        """The diagnosis as the error the CLI prints (one line) and exits with."""
        return DiagnosedFailure(self)


class DiagnosedFailure(ToolkitError):
    """A failure explained from the container's log; keeps the diagnosis (e.g. for --retry-smaller on "oom")."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        evidence = f" (log: {diagnosis.evidence})" if diagnosis.evidence else ""
        super().__init__(diagnosis.message + evidence, diagnosis.hint)
        self.diagnosis = diagnosis
        self.exit_code = diagnosis.exit_code


# (kind, pattern, message, hint, exit code), first match wins; checked against every log line, newest first.
RULES: tuple[tuple[str, re.Pattern[str], str, str, int], ...] = (
    (
        "oom",
        re.compile(r"Insufficient VRAM|CUDA out of memory|OutOfMemoryError|CUDA error: out of memory"),
        "the model and cache did not fit in GPU memory while loading",
        "plan a smaller --context or --cache, a smaller quant, or pass --retry-smaller",
        EXIT_NO_FIT,
    ),
    (
        "cuda-driver",
        re.compile(
            r"unsatisfied condition: cuda>=|CUDA driver version is insufficient|"
            r"forward compatibility was attempted on non supported HW"
        ),
        "the host's NVIDIA driver is too old for the image's CUDA",
        "upgrade the driver (nvidia-smi shows its CUDA version) or render an image with an older CUDA",
        EXIT_ENVIRONMENT,
    ),
    (
        "no-gpu-runtime",
        re.compile(
            r'could not select device driver "nvidia"|nvidia-container-cli: initialization error|'
            r"no CUDA-capable device is detected"
        ),
        "the container got no GPU",
        "install nvidia-container-toolkit, run `nvidia-ctk runtime configure --runtime=docker`, restart docker",
        EXIT_ENVIRONMENT,
    ),
    # TabbyAPI e632af4 on a missing folder (seen on the GPU machine): "ValueError: Failed to load config.json from
    # /app/models/<folder>"; older releases: "model_path does not exist".
    (
        "missing-model",
        re.compile(
            r"Failed to load config\.json from|No such file or directory: '?/app/models|"
            r"model_path does not exist|"
            r"(?:config\.json|safetensors).*(?:not found|No such file)|"
            r"Model (?:directory|path).*(?:does not exist|not found)",
            re.IGNORECASE,
        ),
        "the model files are missing inside the container",
        "run `deploy fetch-model` for this out dir, then `deploy up`",
        EXIT_ENVIRONMENT,
    ),
    (
        "ulimit-denied",
        re.compile(r"error setting rlimit|setrlimit.*operation not permitted"),
        "the Docker engine may not raise the container's ulimits (memlock/nofile from compose.yaml)",
        "run dockerd as root with LimitMEMLOCK=infinity and LimitNOFILE=1048576 (systemd unit), then retry",
        EXIT_ENVIRONMENT,
    ),
    (
        "port-conflict",
        re.compile(r"address already in use|port is already allocated|\[Errno 98\]"),
        "the port is already in use",
        "stop what holds it (ss -ltnp) or choose another with --port",
        EXIT_ENVIRONMENT,
    ),
)


def clean_lines(log_text: str) -> list[str]:
    """Log lines without colour codes; a carriage return (progress bar redraw) keeps the last frame only."""
    lines = []
    for raw in ANSI.sub("", log_text).split("\n"):
        line = raw.rstrip("\r").rsplit("\r", 1)[-1].strip()
        if line:
            lines.append(line)
    return lines


def last_line(log_text: str) -> str:
    """The newest non-empty log line (what load progress looks like right now)."""
    lines = clean_lines(log_text)
    return lines[-1] if lines else ""


def diagnose(
    log_text: str, *, exit_code: int | None = None, restart_count: int = 0, oom_killed: bool = False
) -> Diagnosis | None:
    """The most specific explanation of a failure, or None when the text shows none and the container is fine."""
    lines = clean_lines(log_text)
    for kind, pattern, message, hint, code in RULES:
        for line in reversed(lines):
            if pattern.search(line):
                return Diagnosis(kind, message, hint, code, line[:240])
    evidence = _last_error_line(lines)
    if oom_killed:
        return Diagnosis(
            "host-oom",
            "the kernel killed the server for lack of host RAM",
            "free system memory (the embedding and load buffers live in RAM) or add swap",
            EXIT_ENVIRONMENT,
            evidence,
        )
    if restart_count >= CRASH_LOOP_RESTARTS:
        return Diagnosis(
            "crash-loop",
            f"the server keeps crashing ({restart_count} restarts)",
            "read `deploy logs` for the first error",
            EXIT_VERIFY_FAILED,
            evidence,
        )
    if exit_code not in (None, 0):
        return Diagnosis(
            "exited",
            f"the server exited with code {exit_code}",
            "read `deploy logs` for the first error",
            EXIT_VERIFY_FAILED,
            evidence,
        )
    return None


def _last_error_line(lines: list[str]) -> str:
    """The newest line that looks like an error, else the newest line."""
    for line in reversed(lines):
        if re.search(r"error|exception|traceback|fatal", line, re.IGNORECASE):
            return line[:240]
    return lines[-1][:240] if lines else ""
