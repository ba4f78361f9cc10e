"""Start TabbyAPI on the GPU machine the way the rendered image does (there is no Docker engine there).

From the rendered Dockerfile's final stage it takes ENV, WORKDIR, USER and CMD; from the rendering it takes
config.yml and api_tokens.yml byte for byte (compose mounts them read-only at WORKDIR); the model folder is
mounted at `model_dir/model_name` of that config.yml (compose binds the host folder there), here a symlink.
What cannot be reproduced without the image: the venv (/opt/venv: the device's Python 3.12 + torch 2.11+cu130
with the pinned wheels on PYTHONPATH instead, so PATH/VIRTUAL_ENV are not applied) and the base image's system
libraries (the device image's CUDA 13 userland instead of nvidia/cuda:13.2.1-runtime).

Used by run.sh of this folder and of ../serving_path; import it, or `python3 image_launch.py spec DOCKERFILE`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

SKIPPED_ENV = ("PATH", "VIRTUAL_ENV")  # point into the image's venv, which does not exist here


@dataclass
class ImageSpec:
    """What the rendered Dockerfile's final stage sets for the server process."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    cmd: list[str] = field(default_factory=list)
    skipped_env: dict[str, str] = field(default_factory=dict)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def image_spec(dockerfile: Path) -> ImageSpec:
    """ENV / WORKDIR / USER / CMD of the last stage (after the last FROM)."""
    steps = _instructions(dockerfile.read_text(encoding="utf-8"))
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    spec = ImageSpec()
    for word, args in steps[last_from + 1 :]:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                if key in SKIPPED_ENV:
                    spec.skipped_env[key] = value
                else:
                    spec.env[key] = value
        elif word == "WORKDIR":
            spec.workdir = args
        elif word == "USER":
            spec.user = args
        elif word == "CMD":
            spec.cmd = json.loads(args)
    return spec


def prepare_app(spec: ImageSpec, tabby_src: Path, render_dir: Path, model_dir: Path) -> dict[str, Any]:
    """WORKDIR = TabbyAPI source + the rendering's config.yml and api_tokens.yml; the model where config.yml says."""
    app = Path(spec.workdir)
    if app.exists():
        shutil.rmtree(app)
    shutil.copytree(tabby_src, app, symlinks=True)
    for name in ("config.yml", "api_tokens.yml"):
        shutil.copyfile(render_dir / name, app / name)  # the bytes as rendered
    config = yaml.safe_load((app / "config.yml").read_text(encoding="utf-8"))
    uid, gid = _ids(spec.user)
    keys = app / "api_tokens.yml"
    os.chmod(keys, 0o600)
    if uid is not None and os.geteuid() == 0:
        os.chown(keys, uid, gid if gid is not None else uid)  # compose runs as the key file's owner
    logs = app / "logs"
    logs.mkdir(exist_ok=True)
    os.chmod(logs, 0o1777)  # the Dockerfile's `chmod 1777 /app/logs /home/tabby`
    home = spec.env.get("HOME")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o1777)
    link_model(model_dir, Path(config["model"]["model_dir"]) / config["model"]["model_name"])
    return config


def link_model(model_dir: Path, dest: Path) -> None:
    """A real folder named like the mount point, holding links to the model's files.

    Not a symlink to the folder: TabbyAPI resolves the model path and reports the resolved folder's name as the
    model id, while compose bind-mounts the host folder AT /app/models/<model_name>, so the image reports that name.
    """
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in sorted(model_dir.resolve().iterdir()):
        (dest / item.name).symlink_to(item, target_is_directory=item.is_dir())


def _ids(user: str | None) -> tuple[int | None, int | None]:
    if not user:
        return None, None
    uid, _, gid = user.partition(":")
    return int(uid), int(gid) if gid else None


def api_key(spec: ImageSpec) -> str:
    """The api_key of the rendered api_tokens.yml (never printed)."""
    data = yaml.safe_load((Path(spec.workdir) / "api_tokens.yml").read_text(encoding="utf-8"))
    return str(data["api_key"])


def secrets(spec: ImageSpec, render_dir: Path | None = None) -> list[str]:
    """Every key value in api_tokens.yml (WORKDIR's, or a rendering's), for redaction."""
    folder = render_dir if render_dir is not None else Path(spec.workdir)
    data = yaml.safe_load((folder / "api_tokens.yml").read_text(encoding="utf-8")) or {}
    return [str(v) for v in data.values() if v]


def start(
    spec: ImageSpec, log_path: Path, extra_env: dict[str, str] | None = None, as_image_user: bool = True
) -> subprocess.Popen[bytes]:
    """CMD in WORKDIR with the image's ENV (on top of this process's, which carries PYTHONPATH), as USER."""
    env = dict(os.environ)
    env.update(spec.env)
    env.update(extra_env or {})
    uid, gid = _ids(spec.user) if as_image_user else (None, None)

    def drop() -> None:
        if uid is not None and os.geteuid() == 0:
            os.setgroups([])
            os.setgid(gid if gid is not None else uid)
            os.setuid(uid)

    log = open(log_path, "ab")  # noqa: SIM115 - the server writes it for its whole life
    log.write(
        f"\n===== start {time.strftime('%H:%M:%S')} cmd={spec.cmd} cwd={spec.workdir} "
        f"user={spec.user if uid is not None else 'root'} =====\n".encode()
    )
    log.flush()
    return subprocess.Popen(
        spec.cmd,
        cwd=spec.workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=drop,  # noqa: PLW1509 - only setgroups/setgid/setuid before exec, as the image's USER
    )


def wait_ready(base_url: str, key: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """Poll until /health and /v1/model answer 200 (the port is closed while the model loads)."""
    started = time.monotonic()
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=5, headers={"X-API-Key": key}) as client:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                return {
                    "ready": False,
                    "seconds": round(time.monotonic() - started, 1),
                    "error": f"server exited with {proc.returncode}",
                }
            try:
                health = client.get("/health")
                model = client.get("/v1/model")
                if health.status_code == 200 and model.status_code == 200:
                    return {
                        "ready": True,
                        "seconds": round(time.monotonic() - started, 1),
                        "model": model.json(),
                    }
                last = f"/health {health.status_code}, /v1/model {model.status_code}"
            except httpx.HTTPError as error:
                last = type(error).__name__
            time.sleep(0.5)
    return {"ready": False, "seconds": round(time.monotonic() - started, 1), "error": f"timeout: {last}"}


def start_and_wait(
    spec: ImageSpec, log_path: Path, base_url: str, key: str, timeout_s: float
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start as the image's USER; if that server exits before it is ready, once more as root (recorded in "as")."""
    proc = start(spec, log_path)
    ready = wait_ready(base_url, key, proc, timeout_s)
    ready["as"] = spec.user
    if not ready["ready"] and proc.poll() is not None:
        first = ready.get("error")
        proc = start(spec, log_path, as_image_user=False)
        ready = wait_ready(base_url, key, proc, timeout_s)
        ready["as"] = "root"
        ready["as_image_user_failed"] = first
    return proc, ready


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGINT the server's process group (what `docker stop` sends is SIGTERM; TabbyAPI handles both), then kill."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.poll()


def redact(text: str, keys: list[str]) -> str:
    """Replace every key value with a marker."""
    for key in keys:
        if key:
            text = text.replace(key, "<redacted>")
    return text


def file_mode(path: Path) -> str:
    """Octal permission bits and owner, for the record."""
    st = path.stat()
    return f"{stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "spec":
        print(json.dumps(image_spec(Path(sys.argv[2])).__dict__, indent=1))
    else:
        sys.exit("usage: image_launch.py spec DOCKERFILE")
