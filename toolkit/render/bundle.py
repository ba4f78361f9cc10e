"""Plan -> the files of a deployment: Dockerfile, config.yml, api_tokens.yml, compose.yaml, .env, render.json.

Public, stable names: RenderOptions, Bundle, render_bundle(plan, out_dir, options), render_files (the pure
part), tabby_config(plan) (the TabbyAPI config as a dict) and config_yaml(config, plan_digest) (its text).
Everything is computed in memory first, then written atomically: a new --out appears whole (temp dir beside
it, then one rename); an existing one has each file replaced by rename with render.json last, so a reader
never sees a manifest describing files that are not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import __version__, inputs, validate
from ..atomic import write_text
from ..errors import BadInput
from ..facts import layout
from ..facts.layout import API_TOKENS, MANIFEST
from ..facts.profiles import Serving
from ..facts.runtime import CONTAINER_PORT, DEFAULT_HOST_PORT
from ..facts.tabby_pin import CudaVariant, TabbyPin, choose_cuda, load_tabby_pin
from ..plan.plan import Plan
from .compose import ComposeInputs, compose_yaml, env_text
from .config import config_yaml, model_folder, serving_for, tabby_config
from .dockerfile import (
    CHECK_STACK_SCRIPT,
    HEALTHCHECK_SCRIPT,
    PR295_SCRIPT,
    DockerfileInputs,
    arch_list,
    dockerfile_sha256,
    render_dockerfile,
    script_text,
    start_period_s,
)

__all__ = [
    "IMAGE_REPOSITORY",
    "IMAGE_USER_ID",
    "Bundle",
    "RenderOptions",
    "config_yaml",
    "dockerfile_sha256",
    "model_folder",
    "render_bundle",
    "render_files",
    "tabby_config",
]

IMAGE_REPOSITORY = "glm-deploy/tabbyapi"
IMAGE_USER_ID = 10001  # the image's non-root user (dockerfiles/tabbyapi.Dockerfile.j2)
# All the build is sent (never the keys or config).
BUILD_CONTEXT = (layout.DOCKERFILE, layout.PR295_SCRIPT, layout.CHECK_STACK_SCRIPT, layout.HEALTHCHECK_SCRIPT)
SECRET_MODE = 0o600
_KEY_ALPHABET = set("0123456789abcdefABCDEF-_" + "ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class RenderOptions:
    """How to render: everything the user may choose besides the plan."""

    bind: str = "127.0.0.1"
    port: int = DEFAULT_HOST_PORT
    models_dir: str | None = None  # absolute; None: <out>/models
    force: bool = False  # replace an --out whose rendered files differ
    gpu_reservation: bool = True  # False only for CPU-only test engines (--no-gpu-reservation)
    run_as: tuple[int, int] | None = (
        None  # uid:gid the container runs as; None: the key file's owner (see below)
    )
    serving: Serving | None = None  # None: the plan's profile's serving settings
    pin: TabbyPin | None = None  # None: profiles/tabbyapi.yaml (must hold the plan's stack)


@dataclass(frozen=True)
class Bundle:
    """Where the rendered files are, and what the deploy helper needs to know about them."""

    out_dir: Path
    dockerfile: Path
    pr295_script: Path
    config: Path
    compose: Path
    env: Path
    api_tokens: Path
    manifest: Path
    plan: Path
    image: str
    dockerfile_sha256: str
    cuda: str
    tabby_ref: str
    models_dir: str
    model_folder: str
    changed: bool
    manifest_data: dict = field(default_factory=dict, compare=False)


def check_options(options: RenderOptions) -> RenderOptions:
    """Every user choice that does not depend on the plan, checked before any plan is made (exit 2)."""
    validate.bind_address(options.bind)
    validate.port(options.port)
    if options.models_dir is not None:
        validate.host_path(options.models_dir)
    return options


def load_or_make_api_tokens(out_dir: Path) -> str:
    """The existing key file's text when valid (re-rendering keeps the key), else new keys from `secrets`.

    Only a regular file in the out folder counts: a symlink (to a key file elsewhere) is not read as this
    deployment's key.
    """
    path = out_dir / API_TOKENS
    if path.is_symlink():
        raise BadInput(f"{path} is a symlink", "remove it: the key file of a deployment is a file of its own")
    if path.is_file():
        text = inputs.read_text(
            path, "the key file", inputs.KEY_FILE_BYTES, "render as the user who rendered it"
        )
        try:
            data = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError):
            data = None
        if isinstance(data, dict) and all(
            isinstance(data.get(k), str) and 16 <= len(data[k]) <= 256 and set(data[k]) <= _KEY_ALPHABET
            for k in ("api_key", "admin_key")
        ):
            return text
        raise BadInput(f"{path} is not a valid TabbyAPI key file", "remove it to have new keys generated")
    return yaml.safe_dump(
        {"api_key": secrets.token_hex(32), "admin_key": secrets.token_hex(32)}, sort_keys=False
    )


def _run_as(options: RenderOptions) -> tuple[int, int]:
    """The container's uid:gid: the renderer's ids (who own the 0600 key file), or the image user as root."""
    if options.run_as is not None:
        uid, gid = options.run_as
    elif os.getuid() == 0:
        uid, gid = IMAGE_USER_ID, IMAGE_USER_ID
    else:
        uid, gid = os.getuid(), os.getgid()
    for value in (uid, gid):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise BadInput(f"container user id {value!r} must be a non-root id", "render as a normal user")
    return uid, gid


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stack_variant(plan: Plan, pin: TabbyPin) -> CudaVariant:
    """The CUDA variant of the plan's stack, checked against the pin: the image installs only what is pinned."""
    stack = plan.stack
    variant = choose_cuda(pin, plan.inventory.cuda_driver_version, stack.cuda)
    if stack.exllamav3 != pin.exllamav3:
        raise BadInput(
            f"the plan is for exllamav3 {stack.exllamav3!r}, but the image installs exactly the pinned "
            f"{pin.exllamav3} (profiles/tabbyapi.yaml)",
            "re-plan without --exllamav3, or pin that version's wheels in profiles/tabbyapi.yaml",
        )
    if (stack.torch, stack.python) != (variant.torch, pin.python):
        raise BadInput(
            f"the plan's stack (torch {stack.torch!r}, Python {stack.python!r}) is not the pinned CUDA "
            f"{variant.name} stack (torch {variant.torch}, Python {pin.python})",
            "re-run `deploy plan` with this version of glm-deploy",
        )
    validate.package_version(stack.calibration, "plan stack.calibration")
    return variant


def render_files(
    plan: Plan, out_dir: Path, options: RenderOptions, api_tokens_text: str
) -> dict[str, tuple[str, int]]:
    """Every file of the bundle as {name: (text, mode)}: the pure part of rendering (no disk writes)."""
    pin = options.pin or load_tabby_pin()
    serving = options.serving or serving_for(plan)
    cuda = stack_variant(plan, pin)
    tabby_ref = validate.git_ref(plan.stack.tabbyapi, "plan stack.tabbyapi")
    digest = plan.digest()
    folder = model_folder(plan)
    models_dir = (
        validate.host_path(options.models_dir)
        if options.models_dir is not None
        else validate.host_path(str(out_dir / layout.MODELS), f"models directory (<out>/{layout.MODELS})")
    )
    by_index = {gpu.index: gpu for gpu in plan.inventory.gpus}
    capabilities = [
        by_index[a.index].compute_capability if a.index in by_index else None for a in plan.per_gpu
    ]
    capabilities = [None if cc is None else validate.compute_capability(cc) for cc in capabilities]
    arch, arch_source = arch_list(capabilities)
    weights_gib = validate.finite_number(plan.weights_gib, "plan weights_gib", 0.0, 1e5)
    start_period = start_period_s(weights_gib)
    dockerfile = render_dockerfile(
        DockerfileInputs(
            model=validate.repo_id(plan.hf_repo),
            quant=validate.safe_name(plan.quant, "plan quant"),
            profile=validate.safe_name(plan.profile, "plan profile"),
            plan_digest=digest,
            cuda_name=cuda.name,
            min_driver_cuda=f"{cuda.min_driver_cuda[0]}.{cuda.min_driver_cuda[1]}",
            base_image=cuda.base_image,
            tabby_repo=pin.repo,
            tabby_ref=tabby_ref,
            pr295_head=pin.pr295_head,
            exllamav3=pin.exllamav3,
            exllamav3_wheel=cuda.exllamav3_wheel,
            exllamav3_requires=pin.exllamav3_requires,
            torch=cuda.torch,
            torch_index=cuda.torch_index,
            python=pin.python,
            calibration=plan.stack.calibration,
            arch_list=arch,
            arch_source=arch_source,
            weights_gib=round(weights_gib, 2),
            start_period_s=start_period,
        )
    )
    dockerfile_hash = dockerfile_sha256(dockerfile)
    uid, gid = _run_as(options)
    compose_inputs = ComposeInputs(
        image=f"{IMAGE_REPOSITORY}:{dockerfile_hash[:16]}",
        model_folder=folder,
        device_ids=tuple(plan.device_ids),
        gpu_reservation=options.gpu_reservation,
        start_period_s=start_period,
        bind=validate.bind_address(options.bind),
        port=validate.port(options.port),
        models_dir=models_dir,
        uid=uid,
        gid=gid,
    )
    files: dict[str, tuple[str, int]] = {
        layout.DOCKERFILE: (dockerfile, 0o644),
        layout.PR295_SCRIPT: (script_text(PR295_SCRIPT), 0o755),
        layout.CHECK_STACK_SCRIPT: (script_text(CHECK_STACK_SCRIPT), 0o644),
        layout.HEALTHCHECK_SCRIPT: (script_text(HEALTHCHECK_SCRIPT), 0o644),
        # The build context is this folder: send only what the build needs (never the keys or config).
        layout.DOCKERIGNORE: ("*\n" + "".join(f"!{name}\n" for name in BUILD_CONTEXT), 0o644),
        layout.CONFIG: (config_yaml(tabby_config(plan, serving), digest), 0o644),
        layout.COMPOSE: (compose_yaml(compose_inputs, digest), 0o644),
        layout.ENV: (env_text(compose_inputs), 0o644),
        API_TOKENS: (api_tokens_text, SECRET_MODE),
        layout.PLAN: (json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n", 0o644),
    }
    manifest = {
        "schema": 1,
        "glm_deploy_version": __version__,
        "plan_digest": digest,
        "profile": plan.profile,
        "quant": plan.quant,
        "hf_repo": plan.hf_repo,
        "model_folder": folder,
        "models_dir": models_dir,
        "tabby_repo": pin.repo,
        "tabby_ref": tabby_ref,
        "pr295_head": pin.pr295_head,
        "cuda": cuda.name,
        # What the image installs and the build checks (profiles/tabbyapi.yaml), and the calibration it was
        # sized with: the same as the plan's stack.
        "stack": {
            "tabbyapi": tabby_ref,
            "exllamav3": pin.exllamav3,
            "exllamav3_wheel": cuda.exllamav3_wheel,
            "exllamav3_wheel_sha256": cuda.exllamav3_wheel_sha256,
            "torch": cuda.torch,
            "torch_index": cuda.torch_index,
            "python": pin.python,
            "calibration": plan.stack.calibration,
            "calibrated": plan.stack.calibrated,
        },
        "base_image": cuda.base_image,
        "torch_cuda_arch_list": arch,
        "image": compose_inputs.image,
        "dockerfile_sha256": dockerfile_hash,
        "bind": compose_inputs.bind,
        "port": compose_inputs.port,
        "container_port": CONTAINER_PORT,
        "run_as": f"{uid}:{gid}",
        "gpu_reservation": options.gpu_reservation,
        "device_ids": list(compose_inputs.device_ids),
        "healthcheck_start_period_s": start_period,
        # Hashes of every file but the key file (whose hash is nobody's business).
        "files": {name: _sha256(text) for name, (text, _) in sorted(files.items()) if name != API_TOKENS},
        "api_tokens": API_TOKENS,
    }
    if plan.mix is not None:  # the model folder is assembled from two branches (`deploy mix-model`)
        manifest["mix"] = plan.mix.to_dict()
    files[MANIFEST] = (json.dumps(manifest, indent=2) + "\n", 0o644)
    return files


def _same_on_disk(out_dir: Path, files: dict[str, tuple[str, int]]) -> bool:
    """True when every rendered file already exists with the same bytes and mode."""
    for name, (text, mode) in files.items():
        path = out_dir / name
        try:
            if path.read_bytes() != text.encode() or (path.stat().st_mode & 0o777) != mode:
                return False
        except OSError:
            return False
    return True


def _stage(staging: Path, files: dict[str, tuple[str, int]], owner: tuple[int, ...] | None) -> None:
    """Write every file into the staging folder, fsynced, with its mode (the key file chowned when root)."""
    for name, (text, mode) in files.items():
        path = staging / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(path, mode)
        if name == API_TOKENS and owner is not None:
            os.chown(path, *owner)


def _check_occupied(out_dir: Path, names: list[str]) -> None:
    """Every path a re-render replaces must be a file (or absent): a folder or a FIFO there is refused before
    anything is written, so that the bundle is never half-replaced."""
    for name in names:
        path = out_dir / name
        if os.path.lexists(path) and not (path.is_symlink() or path.is_file()):
            raise BadInput(
                f"--out {out_dir}: {name} is {'a folder' if path.is_dir() else 'not a regular file'}",
                f"remove {path} and render again",
            )


def key_header_text(api_tokens_text: str) -> str:
    """The header file curl reads with `-H @file`: the API key off every command line."""
    data = yaml.safe_load(api_tokens_text)
    return f"X-API-Key: {data['api_key']}\n"


def write_key_header(out_dir: Path, api_tokens_text: str) -> Path:
    """Write (or keep) the 0600 header file beside api_tokens.yml."""
    path = out_dir / layout.API_KEY_HEADER
    text = key_header_text(api_tokens_text)
    try:
        unchanged = (
            not path.is_symlink()
            and path.read_text(encoding="utf-8") == text
            and (path.stat().st_mode & 0o777) == 0o600
        )
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:
        write_text(path, text, SECRET_MODE)
    return path


def _install(staging: Path, out_dir: Path, files: dict[str, tuple[str, int]]) -> None:
    """Move the staged files into place: one rename of the folder when --out is new, else file by file."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    for name in sorted(files, key=lambda n: n == MANIFEST):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


def render_bundle(plan: Plan, out_dir: Path | str, options: RenderOptions | None = None) -> Bundle:
    """Render a plan into out_dir atomically; unchanged input leaves every byte (and the key) as it was."""
    options = options or RenderOptions()
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} exists and is not a directory", "choose another --out")
    api_tokens_text = load_or_make_api_tokens(out_dir)
    files = render_files(plan, out_dir, options, api_tokens_text)
    manifest = json.loads(files[MANIFEST][0])
    changed = not (out_dir.is_dir() and _same_on_disk(out_dir, files))
    if changed and out_dir.is_dir() and any(out_dir.iterdir()) and not options.force:
        ours = (out_dir / MANIFEST).is_file()
        raise BadInput(
            f"--out {out_dir} already holds {'a different rendering' if ours else 'other files'}",
            "pass --force to replace the rendered files (the API key and other files are kept)",
        )
    _check_occupied(out_dir, [*files, layout.API_KEY_HEADER])
    try:
        if changed:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.render-", dir=out_dir.parent))
            try:
                # Root can hand the key file to the container's user; anyone else already owns it.
                owner = tuple(int(x) for x in manifest["run_as"].split(":")) if os.getuid() == 0 else None
                _stage(staging, files, owner)
                os.chmod(staging, 0o755)
                _install(staging, out_dir, files)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        write_key_header(out_dir, api_tokens_text)
    except OSError as error:
        raise BadInput(
            f"cannot write --out {out_dir} ({error.strerror or error})", "choose a writable --out"
        ) from None
    return Bundle(
        out_dir=out_dir,
        dockerfile=out_dir / layout.DOCKERFILE,
        pr295_script=out_dir / layout.PR295_SCRIPT,
        config=out_dir / layout.CONFIG,
        compose=out_dir / layout.COMPOSE,
        env=out_dir / layout.ENV,
        api_tokens=out_dir / API_TOKENS,
        manifest=out_dir / MANIFEST,
        plan=out_dir / layout.PLAN,
        image=manifest["image"],
        dockerfile_sha256=manifest["dockerfile_sha256"],
        cuda=manifest["cuda"],
        tabby_ref=manifest["tabby_ref"],
        models_dir=manifest["models_dir"],
        model_folder=manifest["model_folder"],
        changed=changed,
        manifest_data=manifest,
    )
