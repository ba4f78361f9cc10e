"""Container-log diagnosis: each failure a user can hit maps to one message, a fix and its exit code."""

from __future__ import annotations

import pytest

from toolkit.deploy.diagnose import clean_lines, diagnose, last_line

LOADING = "\x1b[36mINFO\x1b[0m:     Loading model modules \r Loading model modules 12/96\r Loading model modules 40/96\n"


@pytest.mark.parametrize(
    ("log", "kind", "code"),
    [
        (
            LOADING + "Traceback (most recent call last):\n  ...\n"
            "RuntimeError: Insufficient VRAM in split for model and cache\n",
            "oom",
            3,
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", "oom", 3),
        (
            "nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.8, please update your driver\n",
            "cuda-driver",
            4,
        ),
        ("RuntimeError: CUDA driver version is insufficient for CUDA runtime version\n", "cuda-driver", 4),
        ('could not select device driver "nvidia" with capabilities: [[gpu]]', "no-gpu-runtime", 4),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/app/models/3.84bpw-tuned/config.json'\n",
            "missing-model",
            4,
        ),
        # the lines below were printed by real TabbyAPI e632af4 + exllamav3 1.6.5 on an H200 (see the report)
        (
            (
                '  File "/tmp/site/exllamav3/model/model_ls.py", line 311, in _load_autosplit\n'
                '    raise RuntimeError("Insufficient VRAM in split for model and cache")\n'
                "RuntimeError: Insufficient VRAM in split for model and cache\n"
            ),
            "oom",
            3,
        ),
        (
            (
                '    raise ValueError(f"Failed to load config.json from {model_directory}") from exc\n'
                "ValueError: Failed to load config.json from /app/models/3bpw_H6\n"
            ),
            "missing-model",
            4,
        ),
        (
            "ERROR:    [Errno 98] error while attempting to bind on address ('0.0.0.0', 5000): address already in use\n",
            "port-conflict",
            4,
        ),
        (
            "driver failed programming external connectivity: Bind for 127.0.0.1:5000 failed: port is already allocated",
            "port-conflict",
            4,
        ),
    ],
)
def test_known_failures_are_named(log: str, kind: str, code: int) -> None:
    found = diagnose(log, exit_code=1)
    assert found is not None and found.kind == kind and found.exit_code == code
    assert found.evidence and "\x1b" not in found.evidence
    assert found.error().exit_code == code and found.hint in found.error().line()


def test_oom_wins_over_the_generic_exit() -> None:
    found = diagnose(
        "loading\nRuntimeError: Insufficient VRAM in split for model and cache\n",
        exit_code=1,
        restart_count=5,
    )
    assert found is not None and found.kind == "oom"


def test_crash_loop_reports_restarts_and_last_error() -> None:
    log = "starting\nValueError: bad tool_format\nstarting\n"
    found = diagnose(log, restart_count=4)
    assert found is not None and found.kind == "crash-loop" and "4 restarts" in found.message
    assert found.evidence == "ValueError: bad tool_format" and found.exit_code == 5


def test_kernel_oom_kill_is_host_ram() -> None:
    found = diagnose("Loading model modules 80/96\n", exit_code=137, oom_killed=True)
    assert found is not None and found.kind == "host-oom" and found.exit_code == 4


def test_unknown_exit_is_still_a_failure_with_evidence() -> None:
    found = diagnose("hello\nsomething odd happened\n", exit_code=2)
    assert found is not None and found.kind == "exited" and found.evidence == "something odd happened"


def test_healthy_log_has_no_diagnosis() -> None:
    assert diagnose(LOADING + "INFO:     Uvicorn running on http://0.0.0.0:5000\n") is None


def test_progress_redraws_keep_the_last_frame() -> None:
    assert clean_lines(LOADING) == ["Loading model modules 40/96"]
    assert last_line(LOADING + "\n\n") == "Loading model modules 40/96"
