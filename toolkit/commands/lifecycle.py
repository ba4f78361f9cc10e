"""`deploy fetch-model | build | up | status | logs | down`: one rendered out dir, driven step by step.

Each step is a function over a Deployment (what `deploy render` wrote into the out dir) so `deploy auto` runs the
same code. Heavy imports (docker, httpx, huggingface_hub) stay inside functions: `deploy plan` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing, ToolkitError
from ..output import emit_json, status_console
from ..plan import Plan

NO_GPU_ENV = "GLM_DEPLOY_NO_GPU"


@dataclass(frozen=True)
class Deployment:
    """A rendered out dir: its manifest (render.json), plan and file paths."""

    out_dir: Path
    manifest: dict[str, Any]
    plan: Plan

    @property
    def compose(self) -> Path:
        return self.out_dir / "compose.yaml"

    @property
    def api_tokens(self) -> Path:
        return self.out_dir / str(self.manifest.get("api_tokens", "api_tokens.yml"))

    @property
    def models_dir(self) -> Path:
        return Path(self.manifest["models_dir"])

    @property
    def model_folder(self) -> str:
        return str(self.manifest["model_folder"])

    @property
    def model_dir(self) -> Path:
        return self.models_dir / self.model_folder

    @property
    def url(self) -> str:
        bind = str(self.manifest.get("bind", "127.0.0.1"))
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        return f"http://{'[' + host + ']' if ':' in host else host}:{int(self.manifest['port'])}"


def load_deployment(out_dir: Path) -> Deployment:
    """Read what `deploy render` wrote; a missing or foreign out dir is bad input with the fix."""
    out_dir = Path(os.path.abspath(out_dir))
    try:
        manifest = json.loads((out_dir / "render.json").read_text(encoding="utf-8"))
        plan = Plan.from_dict(json.loads((out_dir / "plan.json").read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise BadInput(f"{out_dir} holds no rendered deployment",
                       "run `deploy render --out DIR` (or `deploy auto --out DIR`) first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{out_dir} holds an unreadable rendering ({type(exc).__name__})",
                       "run `deploy render --force` again") from None
    return Deployment(out_dir=out_dir, manifest=manifest, plan=plan)


class Progress:
    """Notes and a live status line on stderr (plain lines when stderr is not a terminal, nothing with --quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = status_console()
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._status: Any = None
        self._last = ""

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        """A note that is always shown (stderr), --json or not: something changed from what was asked."""
        self.console.print(text, markup=False, highlight=False)

    @contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner line that update() rewrites; in logs, each distinct update once."""
        self.note(text)
        if not self.live:
            yield self._plain_update
            return
        with self.console.status(text) as status:
            yield lambda line: status.update(f"{text}  {line[-150:]}")

    def _plain_update(self, line: str) -> None:
        if line != self._last and not self.quiet:
            self._last = line
            self.console.print(f"  {line[-200:]}", markup=False, highlight=False)


def no_gpu(args: argparse.Namespace) -> bool:
    """The explicit CPU-only switch (--no-gpu or GLM_DEPLOY_NO_GPU=1): no GPU requests, no NVIDIA runtime check."""
    return bool(getattr(args, "no_gpu", False)) or os.environ.get(NO_GPU_ENV) == "1"


# ----------------------------------------------------------------------------------------------- steps


def fetch_step(dep: Deployment, progress: Progress, token_file: Path | None = None) -> Any:
    """Download (or reuse) the planned quant into the models folder the compose file mounts."""
    from .. import hub

    token = hub.resolve_token(token_file)
    return hub.fetch_model(dep.plan.hf_repo, dep.plan.quant, dep.models_dir, token, progress=not progress.quiet,
                           note=progress.note)


def build_step(dep: Deployment, client: Any, progress: Progress, force: bool = False) -> Any:
    """Build the rendered image (streamed), or reuse the one whose label holds this Dockerfile's hash."""
    from .. import engine

    with progress.status(f"building {dep.manifest['image']}") as update:
        built = engine.build_image(client, dep.out_dir, str(dep.manifest["image"]),
                                   content_sha256=str(dep.manifest["dockerfile_sha256"]), on_line=update,
                                   force=force, labels={"io.glm-deploy.plan-sha256": dep.plan.digest()})
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


def up_step(dep: Deployment, client: Any, progress: Progress, *, gpu: bool, ready_timeout_s: float | None = None,
            retry_smaller: bool = False) -> UpResult:
    """Preflight, converge the container, wait for readiness; an OOM load may be re-planned smaller once."""
    from ..diagnose import DiagnosedFailure

    try:
        return _up_once(dep, client, progress, gpu=gpu, ready_timeout_s=ready_timeout_s)
    except DiagnosedFailure as failure:
        if not (retry_smaller and failure.diagnosis.kind == "oom"):
            raise
        smaller = smaller_context(dep.plan.context, _profile_min_context(dep.plan))
        if smaller is None:
            raise
        progress.warn(f"out of GPU memory at context {dep.plan.context}; re-planning with context {smaller} and "
                      "retrying once (--retry-smaller)")
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


def smaller_context(context: int, minimum: int) -> int | None:
    """Half the context rounded down to TabbyAPI's 256-token pages, never below the profile minimum (None: no room)."""
    half = (context // 2) // 256 * 256
    candidate = max(half, minimum)
    return candidate if candidate < context else None


def replan(dep: Deployment, context: int) -> Deployment:
    """Plan again for the same GPUs, quant and cache mode with a smaller required context, and re-render in place."""
    from ..plan import PlanRequest
    from ..planner import make_plan
    from ..profiles import load_profile
    from ..render import RenderOptions, render_bundle

    plan = dep.plan
    request = PlanRequest(context=context, quant=plan.quant, cache=plan.cache_mode,
                          split=plan.split if plan.split != "single" else "auto")
    new_plan = make_plan(load_profile(plan.profile), plan.inventory, request)
    new_plan = _with_context(new_plan, context)
    manifest = dep.manifest
    render_bundle(new_plan, dep.out_dir, RenderOptions(
        tabby_ref=manifest.get("tabby_ref"), cuda=str(manifest.get("cuda", "auto")),
        bind=str(manifest["bind"]), port=int(manifest["port"]), models_dir=str(manifest["models_dir"]),
        gpu_reservation=bool(manifest.get("gpu_reservation", True)), force=True))
    return load_deployment(dep.out_dir)


def _with_context(plan: Plan, context: int) -> Plan:
    """The planner maximises context; a retry after an OOM must run at the smaller context it asked for."""
    from dataclasses import replace

    if plan.context <= context:
        return plan
    cache_size = -(-context // 256) * 256
    return replace(plan, context=context, cache_size=cache_size)


def _profile_min_context(plan: Plan) -> int:
    from ..profiles import load_profile

    return load_profile(plan.profile).serving.default_min_context


def _up_once(dep: Deployment, client: Any, progress: Progress, *, gpu: bool,
             ready_timeout_s: float | None) -> UpResult:
    from .. import engine, hub, readiness, state
    from ..preflight import PreflightRequest, run_preflight
    from ..verify.client import read_api_key

    gpu = gpu and bool(dep.manifest.get("gpu_reservation", True))
    if hub.read_marker(dep.model_dir, dep.plan.hf_repo, dep.plan.quant) is None:
        raise EnvironmentMissing(f"the model is not downloaded completely into {dep.model_dir}",
                                 f"run `deploy fetch-model --out {dep.out_dir}`")
    spec = engine.spec_from_compose(dep.compose, name=state.default_container_name(dep.out_dir), gpu=gpu)
    existing = engine.find_container(client, spec.name)
    published = spec.published or ("127.0.0.1", int(dep.manifest["port"]))
    model_bytes = _model_bytes(dep)
    notes = run_preflight(client, PreflightRequest(
        gpu=gpu, bind=published[0], port=published[1], models_dir=dep.models_dir, model_dir_name=dep.model_folder,
        model_bytes=model_bytes, image_cuda=_image_cuda(dep), driver_cuda=dep.plan.inventory.cuda_driver_version,
        port_held_by_us=publishes(existing, published[1])))
    for note in notes:
        progress.note(note)
    api_key = read_api_key(str(dep.api_tokens))
    container, action = engine.converge(client, spec, dep.out_dir)
    record = state.DeploymentState(
        out_dir=str(dep.out_dir), container_name=container.name, container_id=container.id, image=spec.image,
        image_id=container.attrs.get("Image", ""), config_sha256=container.labels.get(engine.LABEL_CONFIG, ""),
        bind=published[0], port=published[1], model_id=dep.model_folder, gpu=gpu, plan_sha256=dep.plan.digest())
    state.save_state(dep.out_dir, record)
    progress.note(f"container {container.name} {action}")
    timeout = ready_timeout_s or readiness.ready_timeout_s(model_bytes)
    expect = readiness.Expectation(model_id=dep.model_folder, cache_mode=dep.plan.cache_mode,
                                   context=dep.plan.context)
    with progress.status(f"waiting for {dep.url} to serve {dep.model_folder} (timeout {int(timeout)} s)") as update:
        try:
            ready = readiness.wait_ready(dep.url, api_key, expect, timeout_s=timeout, container=container,
                                         on_progress=lambda stage, line: update(f"[{stage}] {line}"))
        except ToolkitError:
            engine.stop(container)  # no endless restarts; the log stays for `deploy logs`
            raise
    progress.note(f"ready after {ready.seconds:.1f} s: {dep.url} serves {dep.model_folder}")
    return UpResult(record, action, ready.seconds, ready.model)


def publishes(container: Any, port: int) -> bool:
    """Whether our running container already holds that host port (then the port check must not count it)."""
    if container is None or container.status != "running":
        return False
    bindings = (container.attrs.get("HostConfig") or {}).get("PortBindings") or {}
    return any(str(port) == b.get("HostPort") for values in bindings.values() for b in values or ())


def _model_bytes(dep: Deployment) -> int:
    """Bytes of the model on disk: the completed download's, else the plan's weights plus the RAM-side embedding."""
    marker_path = dep.model_dir / ".glm-deploy-complete.json"
    try:
        return int(sum(json.loads(marker_path.read_text(encoding="utf-8"))["files"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        from ..profiles import load_profile

        embedding = load_profile(dep.plan.profile).architecture.embedding_bytes
        return int(dep.plan.weights_gib * 2**30) + embedding


def _image_cuda(dep: Deployment) -> str | None:
    """The lowest driver CUDA the rendered image accepts (from the TabbyAPI pin's variant), when known."""
    try:
        from ..tabby_ref import load_tabby_pin

        major, minor = load_tabby_pin().variant(str(dep.manifest["cuda"])).min_driver_cuda
        return f"{major}.{minor}"
    except (ToolkitError, KeyError, OSError, ValueError):
        return None


def status_data(dep: Deployment, client: Any) -> dict[str, Any]:
    """Container state, health, the served model, and GPU memory per device (NVML) against the plan."""
    from .. import engine, state
    from ..diagnose import diagnose
    from ..verify.client import ServerError, TabbyClient, read_api_key

    record = state.load_state(dep.out_dir)
    name = record.container_name if record else state.default_container_name(dep.out_dir)
    container = engine.find_container(client, name)
    data: dict[str, Any] = {"out_dir": str(dep.out_dir), "url": dep.url, "container": None, "health": None,
                            "model": None, "gpus": None, "nvml": None}
    if container is None:
        data["state"] = "not deployed"
    else:
        current = engine.status(container)
        data["state"] = current.status
        data["container"] = {"name": current.name, "id": current.id[:12], "status": current.status,
                             "restart_count": current.restart_count, "health": current.health,
                             "exit_code": current.exit_code}
        if not current.running or current.restart_count:
            found = diagnose(engine.read_logs(container, tail=400), exit_code=current.exit_code,
                             restart_count=current.restart_count, oom_killed=current.oom_killed)
            if found is not None:
                data["diagnosis"] = {"kind": found.kind, "message": found.message, "hint": found.hint,
                                     "evidence": found.evidence}
        if current.running:
            with closing(TabbyClient(dep.url, read_api_key(str(dep.api_tokens)), timeout_s=5.0)) as tabby:
                try:
                    data["health"] = tabby.health().status_code
                    model = tabby.model()
                    params = model.get("parameters") or {}
                    data["model"] = {"id": model.get("id"), "max_seq_len": params.get("max_seq_len"),
                                     "cache_mode": params.get("cache_mode"), "cache_size": params.get("cache_size")}
                except ServerError as error:
                    data["model"] = {"error": str(error)}
    data["gpus"], data["nvml"] = _gpu_memory(dep.plan)
    return data


def _gpu_memory(plan: Plan) -> tuple[list[dict[str, Any]] | None, str]:
    """Per planned GPU: NVML's used MiB now vs the plan's weights + cache + overhead."""
    from ..inventory import detect_nvml

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
        gpu = by_uuid.get(planned_gpu.uuid) if planned_gpu and planned_gpu.uuid else by_index.get(allocation.index)
        rows.append({"index": allocation.index, "name": gpu.name if gpu else None,
                     "used_mib": gpu.used_mib if gpu else None, "total_mib": gpu.total_mib if gpu else None,
                     "planned_mib": allocation.weights_mib + allocation.cache_mib + allocation.overhead_mib})
    return rows, "ok"


def down_step(dep: Deployment, client: Any, purge: bool, progress: Progress) -> dict[str, Any]:
    """Remove the container; keep models and keys unless purge (then the model folder and key file go too)."""
    from .. import engine, state

    record = state.load_state(dep.out_dir)
    name = record.container_name if record else state.default_container_name(dep.out_dir)
    container = engine.find_container(client, name)
    removed = None
    if container is not None:
        if container.labels.get(engine.LABEL_OUT_DIR) != str(dep.out_dir):
            raise EnvironmentMissing(f"container {name} does not belong to {dep.out_dir}", "remove it by hand")
        engine.remove(container)
        removed = name
        progress.note(f"removed container {name}")
    state.clear_state(dep.out_dir)
    purged = []
    if purge:
        if dep.model_dir.is_dir():
            shutil.rmtree(dep.model_dir)
            purged.append(str(dep.model_dir))
        if dep.api_tokens.is_file():
            dep.api_tokens.unlink()
            purged.append(str(dep.api_tokens))
        for path in purged:
            progress.note(f"purged {path}")
    else:
        progress.note(f"kept the model ({dep.model_dir}) and the API key ({dep.api_tokens}); --purge removes them")
    return {"removed": removed, "purged": purged}


# ----------------------------------------------------------------------------------------------- commands


def register(subparsers: Any) -> None:
    """Add fetch-model, build, up, status, logs and down."""
    def common(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=description)
        parser.add_argument("--out", default="deploy-out", type=Path,
                            help="the rendered deployment folder (default ./deploy-out)")
        return parser

    fetch = common("fetch-model", "download the planned quant (resumable, verified)",
                   "Download repo@branch of the plan into the models folder with huggingface_hub: progress on "
                   "stderr, resume, sizes and sha256 checked; a complete download is reused. HF_TOKEN is read from "
                   "the environment, --hf-token-file or huggingface_hub's saved token. Exit 4 on disk/network.")
    fetch.add_argument("--hf-token-file", type=Path, help="file holding a Hugging Face token (never printed)")
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(run=run_fetch)

    build = common("build", "build the rendered image (reused when unchanged)",
                   "Build the rendered Dockerfile with the Docker engine, streaming progress; an image labelled with "
                   "the same Dockerfile hash is reused. Exit 4 when the engine is unreachable or the build fails.")
    build.add_argument("--force", action="store_true", help="build even when a matching image exists")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(run=run_build)

    up = common("up", "start (or converge) the container and wait until it serves the model",
                "Preflight (engine, NVIDIA runtime, driver vs image CUDA, disk, port), then start the container or "
                "keep/replace the existing one, and wait until /v1/model reports the planned model, cache mode and "
                "context. Exit 3 on out-of-memory, 4 environment, 5 not ready.")
    _up_options(up)
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(run=run_up)

    status = common("status", "container state, health, served model, GPU memory vs plan",
                    "Show the deployment's container, /health, /v1/model and per-GPU memory from NVML against the "
                    "plan's prediction.")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(run=run_status)

    logs = common("logs", "print the container's log", "Print the server's log (stdout and stderr).")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", default="200", help="lines from the end (a number or 'all', default 200)")
    logs.set_defaults(run=run_logs)

    down = common("down", "stop and remove the container (models and keys kept)",
                  "Remove the deployment's container. The model folder and api_tokens.yml stay unless --purge.")
    down.add_argument("--purge", action="store_true", help="also delete the model folder and the API key file")
    down.add_argument("--json", action="store_true", help="print the result as JSON")
    down.set_defaults(run=run_down)


def _up_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-gpu", action="store_true",
                        help=f"CPU-only engine (tests): no GPU device requests, no NVIDIA runtime check "
                             f"(also {NO_GPU_ENV}=1)")
    parser.add_argument("--ready-timeout", type=float, metavar="S",
                        help="seconds to wait for the model to load (default: 300 + 4 per GiB on disk)")
    parser.add_argument("--retry-smaller", action="store_true",
                        help="after an out-of-memory load, re-plan with half the context (>= the profile minimum) "
                             "and retry once")


def run_fetch(args: argparse.Namespace) -> int:
    dep = load_deployment(args.out)
    result = fetch_step(dep, Progress(quiet=args.json), args.hf_token_file)
    if args.json:
        emit_json(result.to_dict())
    else:
        print(f"model ready at {result.path} ({result.repo}@{result.revision}, commit {result.commit[:12]}, "
              f"{result.total_bytes / 2**30:.1f} GiB{', reused' if result.reused else ''})")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from .. import engine

    dep = load_deployment(args.out)
    built = build_step(dep, engine.connect(), Progress(quiet=args.json), force=args.force)
    if args.json:
        emit_json({"image": built.tag, "id": built.id, "reused": built.reused})
    else:
        print(f"image {built.tag} ({built.id[:19]}){' reused' if built.reused else ''}")
    return 0


def run_up(args: argparse.Namespace) -> int:
    from .. import engine

    dep = load_deployment(args.out)
    client = engine.connect()
    result = up_step(dep, client, Progress(quiet=args.json), gpu=not no_gpu(args),
                     ready_timeout_s=args.ready_timeout, retry_smaller=args.retry_smaller)
    dep = load_deployment(args.out)
    if args.json:
        emit_json({"ok": True, "url": dep.url, "container": result.state.container_name, "action": result.action,
                   "ready_s": round(result.ready_s, 1), "model": result.model, "api_key_file": str(dep.api_tokens),
                   "retried_context": result.retried_context})
    else:
        print(endpoint_summary(dep))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from .. import engine

    dep = load_deployment(args.out)
    data = status_data(dep, engine.connect())
    if args.json:
        emit_json(data)
        return 0
    container = data["container"]
    print(f"deployment {dep.out_dir}: {data['state']}"
          + (f" (container {container['name']}, restarts {container['restart_count']}, health "
             f"{container['health'] or '-'})" if container else ""))
    if data.get("diagnosis"):
        print(f"  problem: {data['diagnosis']['message']} (log: {data['diagnosis']['evidence']}) -- "
              f"{data['diagnosis']['hint']}")
    if data["health"] is not None:
        print(f"  {dep.url}/health: {data['health']}")
    if data["model"]:
        print(f"  model: {json.dumps(data['model'])}")
    if data["gpus"] is None:
        print(f"  GPU memory: NVML {data['nvml']}")
    else:
        for row in data["gpus"]:
            print(f"  GPU {row['index']} {row['name'] or '?'}: {row['used_mib']} MiB used now, "
                  f"{row['planned_mib']} MiB planned")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from .. import engine, state

    dep = load_deployment(args.out)
    client = engine.connect()
    record = state.load_state(dep.out_dir)
    name = record.container_name if record else state.default_container_name(dep.out_dir)
    container = engine.find_container(client, name)
    if container is None:
        raise EnvironmentMissing(f"no container for {dep.out_dir}", "run `deploy up` first")
    tail: int | str = "all" if args.tail == "all" else _positive(args.tail, "--tail")
    for chunk in engine.stream_logs(container, tail=tail, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def run_down(args: argparse.Namespace) -> int:
    from .. import engine

    dep = load_deployment(args.out)
    result = down_step(dep, engine.connect(), args.purge, Progress(quiet=args.json))
    if args.json:
        emit_json(result)
    return 0


def _positive(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadInput(f"{option} {text!r} is not a number", f"e.g. {option} 100 or {option} all") from None
    if value < 0:
        raise BadInput(f"{option} must not be negative", f"e.g. {option} 100")
    return value


def endpoint_summary(dep: Deployment) -> str:
    """Where the endpoint is, where the key is, and one curl line that reads the key from its file."""
    import shlex

    body = json.dumps({"model": dep.model_folder, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64})
    key = f"$(sed -n 's/^api_key: *//p' {shlex.quote(str(dep.api_tokens))})"
    return (f"endpoint: {dep.url}/v1 (model {dep.model_folder})\n"
            f"API key: in {dep.api_tokens} (api_key; mode 0600, never printed)\n"
            f"try: curl -s {dep.url}/v1/chat/completions -H \"X-API-Key: {key}\" "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
