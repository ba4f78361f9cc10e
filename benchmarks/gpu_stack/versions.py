"""Print the versions every GPU record carries (JSON): TabbyAPI commit, exllamav3, torch/CUDA, driver, GPU, wheels."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = (
    "exllamav3",
    "torch",
    "triton",
    "tokenizers",
    "safetensors",
    "numpy",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "uvicorn",
    "sse-starlette",
    "httpx",
    "llguidance",
    "marisa-trie",
    "nvidia-ml-py",
    "typing-extensions",
    "loguru",
    "ruamel.yaml",
    "jinja2",
)


def main() -> None:
    """One JSON object on stdout."""
    root = Path.cwd()
    out: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        from exllamav3.version import __version__

        out["exllamav3_runtime"] = __version__
        import exllamav3_ext  # the prebuilt extension, when present

        out["exllamav3_ext"] = exllamav3_ext.__file__
    except Exception as error:  # noqa: BLE001 - record what is missing
        out["import_error"] = f"{type(error).__name__}: {error}"
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    out["nvidia_smi"] = smi.stdout.strip()
    for key, path in (
        ("tabbyapi_commit", root / ".dev/tabby-commit.txt"),
        ("glm_deploy_snapshot", root / ".dev/snap/COMMIT"),
    ):
        out[key] = path.read_text().strip() if path.exists() else None
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
