"""The deploy steps over one rendered out dir: fetch-model, build, up (with the retry policy), status, down.

Each step is a function over a Deployment (what `deploy render` wrote into the out dir), so the single-step
commands and `deploy auto` run the same code. Heavy imports (docker, httpx, huggingface_hub) stay inside
functions: `deploy plan` starts fast.
"""

from __future__ import annotations

import os
import shutil
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing, ToolkitError
from ..facts.layout import MODEL_MARKER
from ..output import Progress
from ..plan.plan import Plan
from .deployment import Deployment
from .retry import replan, smaller_context


def fetch_step(dep: Deployment, progress: Progress, token_file: Path | None = None) -> Any:
    """Download (or reuse) the planned quant into the models folder the compose file mounts; for a mix, both of
    its branches, checked first (mix_step.fetch_sources)."""
    from . import hub

    token = hub.resolve_token(token_file)
    if dep.plan.mix is not None:
        from .mix_step import fetch_sources

        return fetch_sources(dep, progress, token)
    return hub.fetch_model(
        dep.plan.hf_repo,
        dep.plan.quant,
        dep.models_dir,
        token,
        progress=not progress.quiet,
        note=progress.note,
    )


def build_step(dep: Deployment, client: Any, progress: Progress, force: bool = False) -> Any:
    """Build the rendered image (streamed), or reuse the one whose label holds this Dockerfile's hash."""
    from . import engine

    with progress.status(f"building {dep.manifest['image']}") as update:
        built = engine.build_image(
            client,
            dep.out_dir,
            str(dep.manifest["image"]),
            content_sha256=str(dep.manifest["dockerfile_sha256"]),
            on_line=update,
            force=force,
            labels={"io.glm-deploy.plan-sha256": dep.plan.digest()},
        )
    progress.note(f"image {built.tag} {'reused (same Dockerfile hash)' if built.reused else 'built'}")
    return built


@dataclass(frozen=True)
class UpResult:
    """A running, ready deployment."""

    state: Any
    action: str
    ready_s: float
    model: dict[str, Any]
    retried_context: int | None = None


def up_step(
    dep: Deployment,
    client: Any,
    progress: Progress,
    *,
    gpu: bool,
    ready_timeout_s: float | None = None,
    retry_smaller: bool = False,
) -> UpResult:
    """Preflight, converge the container, wait for readiness; an OOM load may be re-planned smaller once."""
    from .diagnose import DiagnosedFailure

    try:
        return _up_once(dep, client, progress, gpu=gpu, ready_timeout_s=ready_timeout_s)
    except DiagnosedFailure as failure:
        if not (retry_smaller and failure.diagnosis.kind == "oom"):
            raise
        smaller = smaller_context(dep.plan.context, _profile_min_context(dep.plan))
        if smaller is None:
            raise
        progress.warn(
            f"out of GPU memory at context {dep.plan.context}; re-planning with context {smaller} and "
            "retrying once (--retry-smaller)"
        )
        dep = replan(dep, smaller)
        if not _image_present(client, str(dep.manifest["image"])):
            build_step(dep, client, progress)  # the image labels carry the plan hash: a new plan, a new tag
        result = _up_once(dep, client, progress, gpu=gpu, ready_timeout_s=ready_timeout_s)
        return UpResult(result.state, result.action, result.ready_s, result.model, retried_context=smaller)


def _image_present(client: Any, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


def _profile_min_context(plan: Plan) -> int:
    from ..facts.profiles import load_profile

    return load_profile(plan.profile).serving.default_min_context


def _up_once(
    dep: Deployment, client: Any, progress: Progress, *, gpu: bool, ready_timeout_s: float | None
) -> UpResult:
    from ..verify.client import read_api_key
    from ..verify.readiness import Expectations
    from . import compose_spec, engine, readiness, state
    from .preflight import PreflightRequest, run_preflight

    gpu = gpu and bool(dep.manifest.get("gpu_reservation", True))
    check_model_in_place(dep)
    spec = compose_spec.spec_from_compose(
        dep.compose, name=state.default_container_name(dep.out_dir), gpu=gpu
    )
    existing = engine.find_container(client, spec.name)
    published = spec.published or ("127.0.0.1", int(dep.manifest["port"]))
    model_bytes = _model_bytes(dep)
    notes = run_preflight(
        client,
        PreflightRequest(
            gpu=gpu,
            bind=published[0],
            port=published[1],
            models_dir=dep.models_dir,
            model_dir_name=dep.model_folder,
            model_bytes=model_bytes,
            image_cuda=_image_cuda(dep),
            driver_cuda=dep.plan.inventory.cuda_driver_version,
            port_held_by_us=publishes(existing, published[1]),
        ),
    )
    for note in notes:
        progress.note(note)
    api_key = read_api_key(str(dep.api_tokens))
    container, action = engine.converge(client, spec, dep.out_dir)
    record = state.DeploymentState(
        out_dir=str(dep.out_dir),
        container_name=container.name,
        container_id=container.id,
        image=spec.image,
        image_id=container.attrs.get("Image", ""),
        config_sha256=container.labels.get(engine.LABEL_CONFIG, ""),
        bind=published[0],
        port=published[1],
        model_id=dep.model_folder,
        gpu=gpu,
        plan_sha256=dep.plan.digest(),
    )
    state.save_state(dep.out_dir, record)
    progress.note(f"container {container.name} {action}")
    timeout = ready_timeout_s or readiness.ready_timeout_s(model_bytes)
    expect = Expectations(model_id=dep.model_folder, cache_mode=dep.plan.cache_mode, context=dep.plan.context)
    with progress.status(
        f"waiting for {dep.url} to serve {dep.model_folder} (timeout {int(timeout)} s)"
    ) as update:
        try:
            ready = readiness.wait_ready(
                dep.url,
                api_key,
                expect,
                timeout_s=timeout,
                container=container,
                on_progress=lambda stage, line: update(f"[{stage}] {line}"),
            )
        except ToolkitError:
            engine.stop(container)  # no endless restarts; the log stays for `deploy logs`
            raise
    progress.note(f"ready after {ready.seconds:.1f} s: {dep.url} serves {dep.model_folder}")
    return UpResult(record, action, ready.seconds, ready.model)


def check_model_in_place(dep: Deployment) -> dict[str, Any]:
    """The model folder's marker (mix_step.model_marker), or exit 4 saying which step makes it."""
    from .mix_step import model_marker

    marker = model_marker(dep)
    if marker is not None:
        return marker
    if dep.plan.mix is not None:
        raise EnvironmentMissing(
            f"the mix {dep.plan.mix.name} is not assembled in {dep.model_dir}",
            f"run `deploy fetch-model --out {dep.out_dir}` and `deploy mix-model --out {dep.out_dir}`",
        )
    raise EnvironmentMissing(
        f"the model is not downloaded completely into {dep.model_dir}",
        f"run `deploy fetch-model --out {dep.out_dir}`",
    )


def publishes(container: Any, port: int) -> bool:
    """Whether our running container already holds that host port (then the port check must not count it)."""
    if container is None or container.status != "running":
        return False
    bindings = (container.attrs.get("HostConfig") or {}).get("PortBindings") or {}
    return any(str(port) == b.get("HostPort") for values in bindings.values() for b in values or ())


def _model_bytes(dep: Deployment) -> int:
    """Bytes of the model on disk: the completed download's (or mix's), else the plan's weights plus the RAM-side
    embedding."""
    from .mix_step import model_marker

    try:
        return int(sum((model_marker(dep) or {})["files"].values()))
    except (BadInput, ValueError, KeyError, TypeError, AttributeError):
        from ..facts.profiles import load_profile

        embedding = load_profile(dep.plan.profile).architecture.embedding_bytes
        return int(dep.plan.weights_gib * 2**30) + embedding


def _image_cuda(dep: Deployment) -> str | None:
    """The lowest driver CUDA the rendered image accepts (from the TabbyAPI pin's variant), when known."""
    try:
        from ..facts.tabby_pin import load_tabby_pin

        major, minor = load_tabby_pin().variant(str(dep.manifest["cuda"])).min_driver_cuda
        return f"{major}.{minor}"
    except (ToolkitError, KeyError, OSError, ValueError):
        return None


def verify_step(dep: Deployment, reference: Any = None, wait_s: float = 0.0) -> Any:
    """The verify checks against the planned model; with a reference also the tokenizer and KL checks, whose
    threshold for the deployment reference is the serving-path bound of the planned cache mode and split (and for a
    full-precision reference the quant's expected KL: a mix's is its estimate)."""
    from ..verify.checks import VerifyRequest, run_verify
    from ..verify.client import read_api_key
    from ..verify.readiness import Expectations

    expect = Expectations(
        model_id=dep.model_folder,
        cache_mode=dep.plan.cache_mode,
        context=dep.plan.context,
        quant=None if dep.plan.mix else dep.plan.quant,
    )
    return run_verify(
        VerifyRequest(
            url=dep.url,
            api_key=read_api_key(str(dep.api_tokens)),
            expect=expect,
            reference=reference,
            expected_kl=expected_kl(dep.plan),
            profile=dep.plan.profile,
            split=dep.plan.split,
            wait_s=wait_s,
        )
    )


def expected_kl(plan: Plan) -> Any:
    """A mix's expected KL(FP16||quant) and its basis, for verify's threshold against a full-precision reference
    (None for a branch: verify reads the profile's measured KL)."""
    from ..verify.checks import ExpectedKl

    if plan.mix is None:
        return None
    return ExpectedKl(
        plan.mix.expected_kl,
        f"{plan.mix.name}: expected KL {plan.mix.expected_kl:.4f}, an {plan.mix.kl_basis}",
    )


def container_name(dep: Deployment) -> str:
    """The deployment's container: the one `up` recorded, else the name `up` would give it."""
    from . import state

    record = state.load_state(dep.out_dir)
    return record.container_name if record else state.default_container_name(dep.out_dir)


def status_data(dep: Deployment, client: Any, kl: bool = False) -> dict[str, Any]:
    """Container state, health, the served model, the stack inside the container and GPU memory per device (NVML)
    against the plan, the stored reference; with kl, the KL spot-check of the running server against that
    reference (drift)."""
    from ..verify.client import ServerError, TabbyClient, read_api_key
    from ..verify.report import report_dict
    from . import engine
    from .diagnose import diagnose
    from .reference_step import reference_status, stored_reference
    from .versions import stack_status

    name = container_name(dep)
    container = engine.find_container(client, name)
    data: dict[str, Any] = {
        "out_dir": str(dep.out_dir),
        "url": dep.url,
        "container": None,
        "health": None,
        "model": None,
        "stack": None,
        "gpus": None,
        "nvml": None,
    }
    if container is None:
        data["state"] = "not deployed"
    else:
        current = engine.status(container)
        data["state"] = current.status
        data["container"] = {
            "name": current.name,
            "id": current.id[:12],
            "status": current.status,
            "restart_count": current.restart_count,
            "health": current.health,
            "exit_code": current.exit_code,
        }
        if not current.running or current.restart_count:
            found = diagnose(
                engine.read_logs(container, tail=400),
                exit_code=current.exit_code,
                restart_count=current.restart_count,
                oom_killed=current.oom_killed,
            )
            if found is not None:
                data["diagnosis"] = {
                    "kind": found.kind,
                    "message": found.message,
                    "hint": found.hint,
                    "evidence": found.evidence,
                }
        if current.running:
            data["stack"] = stack_status(dep.plan.stack, container)
            with closing(TabbyClient(dep.url, read_api_key(str(dep.api_tokens)), timeout_s=5.0)) as tabby:
                try:
                    data["health"] = tabby.health().status_code
                    model = tabby.model()
                    params = model.get("parameters") or {}
                    data["model"] = {
                        "id": model.get("id"),
                        "max_seq_len": params.get("max_seq_len"),
                        "cache_mode": params.get("cache_mode"),
                        "cache_size": params.get("cache_size"),
                    }
                except ServerError as error:
                    data["model"] = {"error": str(error)}
    data["gpus"], data["nvml"] = _gpu_memory(dep.plan)
    data["reference"] = reference_status(dep, client)
    data["kl"] = None
    reference = stored_reference(dep) if kl else None
    if reference is not None and container is not None and data["state"] == "running":
        report = verify_step(dep, reference)
        kl_check = next((c for c in report.checks if c.name == "kl"), None)
        data["kl"] = {
            **(report_dict(report)["kl"] or {}),
            "passed": bool(kl_check and kl_check.passed),
            "detail": kl_check.detail if kl_check else "not run",
        }
    return data


def _gpu_memory(plan: Plan) -> tuple[list[dict[str, Any]] | None, str]:
    """Per planned GPU: NVML's used MiB now vs the plan's weights + cache + overhead."""
    from ..detect.inventory import detect_nvml

    try:
        live = detect_nvml()
    except ToolkitError as error:
        return None, f"unavailable ({error.message}); GPU memory cannot be shown"
    by_uuid = {g.uuid: g for g in live.gpus if g.uuid}
    by_index = {g.index: g for g in live.gpus}
    planned_by_index = {g.index: g for g in plan.inventory.gpus}
    rows = []
    for allocation in plan.per_gpu:
        planned_gpu = planned_by_index.get(allocation.index)
        gpu = (
            by_uuid.get(planned_gpu.uuid)
            if planned_gpu and planned_gpu.uuid
            else by_index.get(allocation.index)
        )
        rows.append(
            {
                "index": allocation.index,
                "name": gpu.name if gpu else None,
                "used_mib": gpu.used_mib if gpu else None,
                "total_mib": gpu.total_mib if gpu else None,
                "planned_mib": allocation.weights_mib + allocation.cache_mib + allocation.overhead_mib,
            }
        )
    return rows, "ok"


def model_folders(dep: Deployment) -> list[Path]:
    """The folders `down --purge` removes: the model's, and a mix's two branches."""
    from .mix_step import source_dir

    mix = dep.plan.mix
    return [dep.model_dir] + ([source_dir(dep, mix.lower), source_dir(dep, mix.upper)] if mix else [])


def check_purgeable(model_dir: Path) -> None:
    """Only a real folder glm-deploy downloaded into may be deleted: it holds the completion marker or
    huggingface_hub's download metadata. Anything else at that path (a symlink, a file, a folder of other data)
    is left alone (exit 2)."""
    from ..quant.mix import read_manifest

    hint = "remove it by hand if it is really the model; glm-deploy deletes only its own downloads"
    if model_dir.is_symlink() or not model_dir.is_dir():
        raise BadInput(f"{model_dir} is not a folder glm-deploy downloaded (a symlink or a file)", hint)
    if not (
        (model_dir / MODEL_MARKER).is_file()
        or (model_dir / ".cache" / "huggingface").is_dir()
        or read_manifest(model_dir) is not None
    ):
        raise BadInput(f"{model_dir} holds no glm-deploy download (no {MODEL_MARKER}) or mix", hint)


def down_step(dep: Deployment, client: Any, purge: bool, progress: Progress) -> dict[str, Any]:
    """Remove the container; keep models (a mix's branches too), keys and the reference unless purge (then they
    go too)."""
    from . import engine, state
    from .reference_step import reference_path

    folders = model_folders(dep)
    for folder in folders if purge else []:
        if os.path.lexists(folder):
            check_purgeable(folder)  # before anything is removed
    name = container_name(dep)
    container = engine.find_container(client, name)
    removed = None
    if container is not None:
        if container.labels.get(engine.LABEL_OUT_DIR) != str(dep.out_dir):
            raise EnvironmentMissing(
                f"container {name} does not belong to {dep.out_dir}", "remove it by hand"
            )
        engine.remove(container)
        removed = name
        progress.note(f"removed container {name}")
    state.clear_state(dep.out_dir)
    purged = []
    if purge:
        for folder in folders:
            if os.path.lexists(folder):
                shutil.rmtree(folder)
                purged.append(str(folder))
        for key_file in (dep.api_tokens, dep.key_header, reference_path(dep)):
            if key_file.is_file() and not key_file.is_symlink():
                key_file.unlink()
                purged.append(str(key_file))
        for path in purged:
            progress.note(f"purged {path}")
    else:
        progress.note(
            f"kept the model ({dep.model_dir}), the API key ({dep.api_tokens}) and the deployment reference; "
            "--purge removes them"
        )
    return {"removed": removed, "purged": purged}
