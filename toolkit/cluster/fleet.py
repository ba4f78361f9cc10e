"""fleet.yaml: the nodes of a Swarm fleet, their GPUs, the serving requirements, replicas and the endpoint.

    name: glm                      # stack name (docker stack deploy ... NAME), default glm
    profile: glm-4.7               # model profile, default glm-4.7
    image: registry:5000/glm-deploy/tabbyapi:v1   # optional: one image for every node (default: built per class)
    gateway_image: haproxy:2.8     # the endpoint's load balancer image (default haproxy:2.8)
    models_dir: /srv/glm-deploy/models            # the same absolute path on every node
    nodes:
      - name: gpu-a                # the Swarm node's hostname
        gpus: 8x24GiB              # a --gpus spec, a `deploy detect --json` file (path), or that JSON inline
        labels: {rack: r1}         # extra node labels (applied by the printed `docker node update` commands)
        replicas: 1                # replicas on this node (default: the top-level replicas)
        url: http://10.0.0.5:5000  # optional: this node's replica, for `cluster verify` without engine access
    requirements: {context: 65536, cache: auto, quant: null}
    replicas: 1                    # replicas per node
    endpoint: {port: 5000, bind: 127.0.0.1, mode: host}

endpoint.mode: `host` publishes the endpoint on every node's own port (no IPVS needed), `ingress` through the
routing mesh (needs IPVS). endpoint.bind applies to the per-host compose files (Swarm cannot bind an address).
A node's gpus are what ONE replica gets; with replicas: N the node advertises N times as many (node-config).

Every value is validated here; an error names the file, line and field (exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import inputs, validate
from ..detect.gpu_spec import parse_gpu_spec
from ..detect.inventory import GpuInventory, inventory_from_json
from ..errors import BadInput, ToolkitError
from ..facts.runtime import DEFAULT_HOST_PORT
from ..plan.memory import parse_cache_mode
from ..plan.plan import PlanRequest
from .yaml_lines import MAX_FILE_BYTES, Located, Path_, load_located

STACK_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}\Z")
# RFC 1123 host names (what `docker node ls` shows), one or more dot-separated labels.
NODE_NAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
LABEL_KEY = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?\Z")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{0,63}\Z")
URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]{1,255}(?::[0-9]{1,5})?/?\Z")
RESERVED_LABEL_PREFIX = "glm-deploy."
MAX_NODES = 256
MAX_REPLICAS_PER_NODE = 16
TOP_KEYS = {
    "name",
    "profile",
    "image",
    "gateway_image",
    "models_dir",
    "nodes",
    "requirements",
    "replicas",
    "endpoint",
}
NODE_KEYS = {"name", "gpus", "labels", "replicas", "url"}
REQUIREMENT_KEYS = {"context", "cache", "quant"}
ENDPOINT_KEYS = {"port", "bind", "mode"}
ENDPOINT_MODES = ("host", "ingress")
DEFAULT_GATEWAY_IMAGE = "haproxy:2.8"
DEFAULT_MODELS_DIR = "/srv/glm-deploy/models"


@dataclass(frozen=True)
class FleetNode:
    """One Swarm node: its host name, GPUs, extra labels, replica count and optional direct URL."""

    name: str
    inventory: GpuInventory
    labels: tuple[tuple[str, str], ...]
    replicas: int
    url: str | None


@dataclass(frozen=True)
class Fleet:
    """A validated fleet.yaml."""

    name: str
    profile: str
    image: str | None
    gateway_image: str
    models_dir: str
    nodes: tuple[FleetNode, ...]
    request: PlanRequest
    port: int
    bind: str
    endpoint_mode: str
    source: str


def load_fleet(path: Path | str) -> Fleet:
    """Read and validate fleet.yaml (BadInput, exit 2, naming line and field on any problem)."""
    path = Path(path)
    text = inputs.read_text(path, "--inventory", MAX_FILE_BYTES, "give the fleet.yaml path")
    return parse_fleet(load_located(text, str(path)), path.parent)


def _mapping(doc: Located, path: Path_, value: Any, allowed: set[str]) -> dict[str, Any]:
    """A mapping with only known keys (a typo is an error, not a silently ignored setting)."""
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise doc.error(path + (unknown[0],), "unknown field", f"known fields: {', '.join(sorted(allowed))}")
    return value


def _int(doc: Located, path: Path_, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise doc.error(path, f"must be a whole number in {low}..{high}, got {value!r}")
    return value


def _text(doc: Located, path: Path_, value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise doc.error(path, f"{shown} is not {what}")
    return value


def _checked(doc: Located, path: Path_, check: Any, *args: Any) -> Any:
    """Run a shared validator (toolkit.validate, gpu_spec, cache modes); re-raise its error at this line."""
    try:
        return check(*args)
    except ToolkitError as exc:
        raise doc.error(path, exc.message, exc.hint) from None


def parse_fleet(doc: Located, base_dir: Path) -> Fleet:
    """Validate the parsed document; relative detect-JSON paths resolve against base_dir."""
    top = _mapping(doc, (), doc.value if doc.value is not None else {}, TOP_KEYS)
    name = _text(
        doc,
        ("name",),
        top.get("name", "glm"),
        STACK_NAME,
        "a stack name (lower-case letters, digits and '-', up to 20, starting with a letter)",
    )
    profile = _checked(doc, ("profile",), validate.safe_name, top.get("profile", "glm-4.7"), "profile")
    image = top.get("image")
    if image is not None:
        image = _checked(doc, ("image",), validate.image_ref, image, "image")
    gateway_image = _checked(
        doc,
        ("gateway_image",),
        validate.image_ref,
        top.get("gateway_image", DEFAULT_GATEWAY_IMAGE),
        "gateway_image",
    )
    models_dir = _checked(
        doc, ("models_dir",), validate.host_path, top.get("models_dir", DEFAULT_MODELS_DIR), "models_dir"
    )
    default_replicas = _int(doc, ("replicas",), top.get("replicas", 1), 1, MAX_REPLICAS_PER_NODE)
    request = _requirements(doc, top.get("requirements", {}))
    endpoint = _mapping(doc, ("endpoint",), top.get("endpoint", {}), ENDPOINT_KEYS)
    port = _checked(
        doc, ("endpoint", "port"), validate.port, endpoint.get("port", DEFAULT_HOST_PORT), "endpoint.port"
    )
    bind = _checked(doc, ("endpoint", "bind"), validate.bind_address, endpoint.get("bind", "127.0.0.1"))
    endpoint_mode = endpoint.get("mode", "host")
    if endpoint_mode not in ENDPOINT_MODES:
        raise doc.error(
            ("endpoint", "mode"),
            f"{endpoint_mode!r} is not host or ingress",
            "host: on every node (no IPVS needed); ingress: Swarm's routing mesh",
        )
    raw_nodes = top.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise doc.error(
            ("nodes",), "must be a non-empty list of nodes", "e.g. nodes: [{name: gpu-a, gpus: 8x24GiB}]"
        )
    if len(raw_nodes) > MAX_NODES:
        raise doc.error(("nodes",), f"has {len(raw_nodes)} nodes, at most {MAX_NODES} are supported")
    nodes: list[FleetNode] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_nodes):
        node = _node(doc, ("nodes", index), raw, default_replicas, base_dir)
        if node.name.lower() in seen:
            raise doc.error(("nodes", index, "name"), f"node {node.name!r} is listed twice")
        seen.add(node.name.lower())
        nodes.append(node)
    return Fleet(
        name=name,
        profile=profile,
        image=image,
        gateway_image=gateway_image,
        models_dir=models_dir,
        nodes=tuple(nodes),
        request=request,
        port=port,
        bind=bind,
        endpoint_mode=endpoint_mode,
        source=doc.source,
    )


def _requirements(doc: Located, raw: Any) -> PlanRequest:
    """requirements: context (tokens or "max"), cache (auto | FP16 | K,V), quant (a branch, optional)."""
    values = _mapping(doc, ("requirements",), raw, REQUIREMENT_KEYS)
    context = values.get("context")
    context_max = context == "max"
    if context is not None and not context_max:
        context = _int(doc, ("requirements", "context"), context, 1, 10**7)
    cache = values.get("cache", "auto")
    if not isinstance(cache, str):
        raise doc.error(("requirements", "cache"), f"must be auto, FP16 or K,V such as 6,5, got {cache!r}")
    if cache.strip().lower() == "auto":
        cache = "auto"
    else:
        cache = _checked(doc, ("requirements", "cache"), parse_cache_mode, cache).label
    quant = values.get("quant")
    if quant is not None:
        quant = _checked(doc, ("requirements", "quant"), validate.safe_name, quant, "requirements.quant")
    return PlanRequest(
        context=None if context_max else context, context_max=context_max, cache=cache, quant=quant
    )


def _node(doc: Located, path: Path_, raw: Any, default_replicas: int, base_dir: Path) -> FleetNode:
    """One entry of nodes:."""
    values = _mapping(doc, path, raw, NODE_KEYS)
    if "name" not in values or "gpus" not in values:
        raise doc.error(path, "needs name and gpus", "e.g. {name: gpu-a, gpus: 8x24GiB}")
    name = _text(doc, path + ("name",), values["name"], NODE_NAME, "a host name (letters, digits, '-', '.')")
    labels_raw = values.get("labels", {})
    if not isinstance(labels_raw, dict):
        raise doc.error(path + ("labels",), "must be a mapping of label: value")
    labels: list[tuple[str, str]] = []
    for key, value in labels_raw.items():
        label_path = path + ("labels", key)
        _text(doc, label_path, key, LABEL_KEY, "a label key (lower-case letters, digits, '.', '_', '-')")
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise doc.error(
                label_path, f"labels starting with {RESERVED_LABEL_PREFIX!r} are set by glm-deploy"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        labels.append(
            (
                key,
                _text(
                    doc,
                    label_path,
                    value,
                    LABEL_VALUE,
                    "a label value (letters, digits, '.', '_', '-', up to 63)",
                ),
            )
        )
    replicas = _int(
        doc, path + ("replicas",), values.get("replicas", default_replicas), 1, MAX_REPLICAS_PER_NODE
    )
    url = values.get("url")
    if url is not None:
        if isinstance(url, str) and "@" in url:
            raise doc.error(
                path + ("url",), "carries credentials (user:password@)", "pass the key with --api-key-file"
            )
        url = _text(doc, path + ("url",), url, URL, "an http(s)://host:port URL").rstrip("/")
        if replicas != 1:
            raise doc.error(
                path + ("url",),
                f"names one replica, but the node runs {replicas}",
                "drop url (cluster verify finds replicas through the Swarm manager)",
            )
    inventory = _gpus(doc, path + ("gpus",), values["gpus"], base_dir)
    return FleetNode(name=name, inventory=inventory, labels=tuple(sorted(labels)), replicas=replicas, url=url)


def _gpus(doc: Located, path: Path_, raw: Any, base_dir: Path) -> GpuInventory:
    """A spec string, a path to `deploy detect --json` output, or that JSON inline as a mapping."""
    if isinstance(raw, dict):
        return inventory_from_json(
            raw,
            lambda problem: doc.error(
                path, problem, "give `deploy detect --json` output or a spec like 8x24GiB"
            ),
        )
    if not isinstance(raw, str) or not raw.strip():
        raise doc.error(path, "must be a GPU spec (8x24GiB), a detect JSON file, or that JSON inline")
    if raw.endswith(".json") or "/" in raw:
        file = (base_dir / raw) if not Path(raw).is_absolute() else Path(raw)
        try:
            data = inputs.parse_json(inputs.read_text(file, "detect JSON"), "detect JSON", file)
        except BadInput as error:
            raise doc.error(path, error.message, "run `deploy detect --json > FILE` on that node") from None
        return inventory_from_json(
            data, lambda problem: doc.error(path, f"{file}: {problem}", "give `deploy detect --json` output")
        )
    return _checked(doc, path, parse_gpu_spec, raw)
