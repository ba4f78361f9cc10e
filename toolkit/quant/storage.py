"""A downloaded EXL3 quant's exact storage, module by module, from its quantization_config.json.

exllamav3 writes `tensor_storage` next to the quantization settings: every leaf module's stored tensors with shape,
bytes and dtype, and for EXL3 linears the bits per weight and the codebook multiplier
(exllamav3 conversion/quant_config.py). That is the quant's VRAM footprint without loading anything: every stored
tensor except the embedding table's, which exllamav3 keeps in system RAM (facts: glm-4.7.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import inputs
from ..errors import BadInput

QUANT_CONFIG = "quantization_config.json"
CONFIG = "config.json"
# GLM-4.7's file lists ~45,000 leaf modules (92 layers x 160 experts x 3 linears): tens of MB of JSON.
QUANT_CONFIG_BYTES = 256 * inputs.MIB
GROUPS = (
    "attention",
    "shared_experts",
    "routed_gate_up",
    "routed_down",
    "dense_mlp",
    "router",
    "norms",
    "head",
    "embedding",
    "other",
)
_LAYER = re.compile(r"^model\.layers\.([0-9]{1,4})\.")
_ROUTED = re.compile(r"\.mlp\.experts\.[0-9]{1,5}\.(gate_proj|up_proj|down_proj)\Z")
_DENSE = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\Z")
_HINT = "download the quant again (`deploy fetch-model`) or pass an EXL3 model folder"


@dataclass(frozen=True)
class ModuleStorage:
    """One leaf module as stored: its tensor group, layer, bytes and (for EXL3 linears) bits and codebook."""

    key: str
    group: str
    layer: int | None
    n_bytes: int
    bits: float | None
    codebook: str | None
    shapes: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class QuantStorage:
    """Every leaf module of one quant, with the quant's settings."""

    modules: dict[str, ModuleStorage]
    bits: float
    head_bits: float | None
    codebook: str | None
    architecture: str
    version: str | None

    @property
    def vram_bytes(self) -> int:
        """Weights exllamav3 puts in VRAM: every stored tensor but the embedding table."""
        return sum(m.n_bytes for m in self.modules.values() if m.group != "embedding")

    @property
    def embedding_bytes(self) -> int:
        """The embedding table (system RAM)."""
        return sum(m.n_bytes for m in self.modules.values() if m.group == "embedding")

    def by_group(self) -> dict[str, int]:
        """Bytes per tensor group."""
        totals: dict[str, int] = {}
        for module in self.modules.values():
            totals[module.group] = totals.get(module.group, 0) + module.n_bytes
        return totals

    def by_layer(self) -> dict[int, int]:
        """VRAM bytes per layer index."""
        totals: dict[int, int] = {}
        for module in self.modules.values():
            if module.layer is not None:
                totals[module.layer] = totals.get(module.layer, 0) + module.n_bytes
        return totals


def classify(key: str) -> tuple[str, int | None]:
    """The tensor group and layer index of a leaf module key (GLM-4 MoE naming)."""
    found = _LAYER.match(key)
    layer = int(found.group(1)) if found else None
    if key.startswith("model.embed_tokens"):
        return "embedding", None
    if key == "lm_head":
        return "head", None
    if ".self_attn." in key:
        return "attention", layer
    if ".mlp.shared_experts." in key:
        return "shared_experts", layer
    routed = _ROUTED.search(key)
    if routed:
        return ("routed_down" if routed.group(1) == "down_proj" else "routed_gate_up"), layer
    if _DENSE.search(key):
        return "dense_mlp", layer
    if key.endswith(".mlp.gate"):
        return "router", layer
    if key.endswith("norm"):
        return "norms", layer
    return "other", layer


def read_storage(folder: Path) -> QuantStorage:
    """The quant in folder, module by module (exit 2, one line, on a missing or malformed file)."""
    path = folder / QUANT_CONFIG
    document = inputs.parse_json(
        inputs.read_text(path, "the quant settings", QUANT_CONFIG_BYTES, _HINT), QUANT_CONFIG, path, _HINT
    )
    config_path = folder / CONFIG
    config = inputs.parse_json(
        inputs.read_text(config_path, "the model config", hint=_HINT), CONFIG, config_path
    )
    if not isinstance(document, dict) or document.get("quant_method") != "exl3":
        raise BadInput(f"{path} does not describe an EXL3 quant (quant_method exl3)", _HINT)
    storage = document.get("tensor_storage")
    if not isinstance(storage, dict) or not storage:
        raise BadInput(f"{path} has no tensor_storage (written by exllamav3 0.0.7 and later)", _HINT)
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise BadInput(f"{config_path} names no architecture", _HINT)
    modules = {key: _module(key, entry, path) for key, entry in storage.items()}
    codebooks = {m.codebook for m in modules.values() if m.codebook is not None}
    if len(codebooks) > 1:
        raise BadInput(
            f"{path} mixes codebooks ({', '.join(sorted(codebooks))})", "pass a quant of one codebook"
        )
    return QuantStorage(
        modules=modules,
        bits=_number(document.get("bits"), "bits", path),
        head_bits=None
        if document.get("head_bits") is None
        else _number(document["head_bits"], "head_bits", path),
        codebook=next(iter(codebooks), None),
        architecture=architectures[0],
        version=str(document["version"]) if isinstance(document.get("version"), str) else None,
    )


def _module(key: object, entry: object, path: Path) -> ModuleStorage:
    """One tensor_storage entry, checked: tensor shapes and byte counts are whole numbers."""
    if (
        not isinstance(key, str)
        or not isinstance(entry, dict)
        or not isinstance(entry.get("stored_tensors"), dict)
    ):
        raise BadInput(f"{path}: tensor_storage entry {str(key)[:80]!r} is malformed", _HINT)
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name, tensor in entry["stored_tensors"].items():
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        n_bytes = tensor.get("n_bytes") if isinstance(tensor, dict) else None
        if (
            not isinstance(shape, list)
            or not all(_whole(s) for s in shape)
            or not _whole(n_bytes)
            or not isinstance(tensor.get("dtype"), str)
        ):
            raise BadInput(f"{path}: stored tensor {str(name)[:80]!r} of {key} is malformed", _HINT)
        shapes[name] = tuple(shape)
        total += n_bytes
    group, layer = classify(key)
    exl3 = entry.get("quant_format") == "exl3"
    bits = _number(entry.get("bits_per_weight"), f"bits_per_weight of {key}", path) if exl3 else None
    codebook = None
    if exl3:
        codebook = (
            "mcg" if entry.get("mcg_multiplier") else "mul1" if entry.get("mul1_multiplier") else "3inst"
        )
    return ModuleStorage(key, group, layer, total, bits, codebook, shapes)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 64:
        raise BadInput(f"{path}: {what} {str(value)[:40]!r} is not a bit width", _HINT)
    return float(value)
