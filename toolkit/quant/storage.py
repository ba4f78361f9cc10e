"""Exact VRAM bytes of an EXL3 quant from its quantization_config.json: per module, tensor group and layer.

exllamav3 writes `quantization_config.json` next to every quant (conversion/quant_config.py): config.json's
quantization_config {quant_method: exl3, version, bits, head_bits, [calibration], [codebook]} plus `tensor_storage`,
which maps every leaf module to the tensors it stores ({shape, n_bytes, dtype} each) and, for an EXL3 linear,
quant_format "exl3", bits_per_weight (the trellis depth / 16) and its codebook multiplier (mcg_multiplier -> "mcg",
mul1_multiplier -> "mul1", neither -> "3inst"). VRAM weight bytes are the sum of every stored tensor's bytes except
the embedding's, which exllamav3 keeps in system RAM (../shared/facts/glm-4.7.md).

The file is read through toolkit.inputs (regular file, size cap, UTF-8, nesting) and checked: every number a byte
count, every n_bytes the product of its shape and dtype width, every EXL3 module's bits its trellis depth, no
tensor listed twice, one codebook over the whole model (exllamav3's fused MoE kernel needs one; a file mixing them
is refused, naming the codebooks and a module of each). Anything else is one BadInput line (exit 2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import inputs
from ..errors import BadInput
from ..redact import printable

QUANT_CONFIG = "quantization_config.json"
CONFIG = "config.json"
# GLM-4.7's file is ~51 MiB (43,824 leaf modules written with indent 4; tests/unit/quant/glm47_storage.py) and
# parses into ~170 MiB of Python objects: 128 MiB holds any such model, and bounds what a hostile file can cost.
QUANT_CONFIG_BYTES = 128 * inputs.MIB
MAX_TENSOR_BYTES = 1 << 40  # one stored tensor of a TiB is no quant's
MAX_DIMS = 8
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
RAM_GROUPS = frozenset({"embedding"})  # exllamav3 keeps the embedding table in system memory
CODEBOOK_KEYS = {"mcg_multiplier": "mcg", "mul1_multiplier": "mul1"}
CODEBOOKS = ("mcg", "mul1", "3inst")
DTYPE_BYTES = {
    "torch.float16": 2,
    "torch.bfloat16": 2,
    "torch.float32": 4,
    "torch.float64": 8,
    "torch.float8_e4m3fn": 1,
    "torch.float8_e5m2": 1,
    "torch.int8": 1,
    "torch.uint8": 1,
    "torch.int16": 2,
    "torch.uint16": 2,
    "torch.int32": 4,
    "torch.uint32": 4,
    "torch.int64": 8,
    "torch.bool": 1,
}
NAME = re.compile(r"^[A-Za-z0-9_]{1,64}(?:\.[A-Za-z0-9_]{1,64}){0,15}\Z")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,39}\Z")
_LAYER = re.compile(r"^model\.layers\.(\d{1,6})\.(.+)\Z")
_ROUTED_GATE_UP = re.compile(r"^mlp\.experts\.\d+\.(?:gate_proj|up_proj)\Z")
_ROUTED_DOWN = re.compile(r"^mlp\.experts\.\d+\.down_proj\Z")
_DENSE_MLP = re.compile(r"^mlp\.(?:gate_proj|up_proj|down_proj)\Z")
HINT = "use the quantization_config.json exllamav3 wrote for the quant (download the branch again)"


def classify(key: str) -> tuple[str, int | None]:
    """(group, layer index) of a module key; the layer is None outside `model.layers.<n>.` (head, embedding, final
    norm). A norm is a norm wherever it sits (a q/k norm inside self_attn too)."""
    if key == "lm_head":
        return "head", None
    if key == "model.embed_tokens":
        return "embedding", None
    match = _LAYER.match(key)
    if match is None:
        return ("norms" if key.rsplit(".", 1)[-1].endswith("norm") else "other"), None
    layer, rest = int(match.group(1)), match.group(2)
    if rest.rsplit(".", 1)[-1].endswith("norm"):
        return "norms", layer
    if rest.startswith("self_attn."):
        return "attention", layer
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts", layer
    if _ROUTED_GATE_UP.match(rest):
        return "routed_gate_up", layer
    if _ROUTED_DOWN.match(rest):
        return "routed_down", layer
    if _DENSE_MLP.match(rest):
        return "dense_mlp", layer
    if rest == "mlp.gate":
        return "router", layer
    return "other", layer


@dataclass(frozen=True)
class ModuleStorage:
    """One leaf module's stored tensors: bytes, and for an EXL3 linear its bits and codebook."""

    key: str
    group: str
    layer: int | None
    n_bytes: int
    bits: float | None  # bits_per_weight of an EXL3 linear (trellis depth / 16); None for unquantized modules
    codebook: str | None  # "mcg" | "mul1" | "3inst" for an EXL3 linear, else None
    shapes: Mapping[str, tuple[int, ...]]  # stored tensor name ("<key>.trellis", "<key>.suh") -> shape

    @property
    def weights(self) -> int:
        """Weights an EXL3 linear encodes (padded in x out features, from the trellis); 0 for other modules."""
        trellis = self.shapes.get(f"{self.key}.trellis")
        return trellis[0] * trellis[1] * 256 if self.bits is not None and trellis else 0


@dataclass(frozen=True)
class QuantStorage:
    """A quant's tensor_storage: every leaf module, and the quant's own settings."""

    modules: Mapping[str, ModuleStorage]
    bits: float  # the quant's nominal bits (config: a mix's final bits)
    head_bits: float
    codebook: str  # the one codebook of every EXL3 module
    architecture: str | None  # config.json's architectures[0] when the folder has config.json
    version: str  # the exllamav3 version that wrote it
    source: str = field(default="", compare=False)

    @property
    def vram_bytes(self) -> int:
        """Weights in VRAM: every stored tensor except the embedding's (system RAM)."""
        return sum(m.n_bytes for m in self.modules.values() if m.group not in RAM_GROUPS)

    @property
    def embedding_bytes(self) -> int:
        """The embedding table, which exllamav3 keeps in system RAM."""
        return sum(m.n_bytes for m in self.modules.values() if m.group in RAM_GROUPS)

    def by_group(self) -> dict[str, int]:
        """Bytes per tensor group (embedding included: it is in RAM, not in vram_bytes), in GROUPS order."""
        return _sum_by(self.modules.values(), lambda m: m.group, GROUPS)

    def by_layer(self) -> dict[int, int]:
        """VRAM bytes per layer index (modules outside the layers -- head, final norm -- are not in it)."""
        totals: dict[int, int] = {}
        for module in self.modules.values():
            if module.layer is not None and module.group not in RAM_GROUPS:
                totals[module.layer] = totals.get(module.layer, 0) + module.n_bytes
        return dict(sorted(totals.items()))

    def by_layer_group(self) -> dict[int, dict[str, int]]:
        """Bytes per layer, per tensor group within it."""
        layers: dict[int, list[ModuleStorage]] = {}
        for module in self.modules.values():
            if module.layer is not None:
                layers.setdefault(module.layer, []).append(module)
        return {
            layer: _sum_by(modules, lambda m: m.group, GROUPS) for layer, modules in sorted(layers.items())
        }

    def group_bits(self) -> dict[str, float]:
        """Bits per weight of each group's EXL3 linears, weighted by their weights (groups without one left out)."""
        return _bits_by(self.modules.values(), lambda m: m.group)

    def layer_group_bits(self) -> dict[int, dict[str, float]]:
        """group_bits() per layer."""
        layers: dict[int, list[ModuleStorage]] = {}
        for module in self.modules.values():
            if module.layer is not None:
                layers.setdefault(module.layer, []).append(module)
        return {layer: _bits_by(modules, lambda m: m.group) for layer, modules in sorted(layers.items())}


def _sum_by(modules: Iterable[ModuleStorage], key: Any, order: tuple[str, ...]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for module in modules:
        name = key(module)
        totals[name] = totals.get(name, 0) + module.n_bytes
    return {name: totals[name] for name in order if name in totals}


def _bits_by(modules: Iterable[ModuleStorage], key: Any) -> dict[str, float]:
    bits: dict[str, float] = {}
    weights: dict[str, int] = {}
    for module in modules:
        if module.bits is not None and module.weights:
            name = key(module)
            bits[name] = bits.get(name, 0.0) + module.bits * module.weights
            weights[name] = weights.get(name, 0) + module.weights
    return {name: bits[name] / weights[name] for name in GROUPS if name in weights}


def read_storage(folder: Path | str) -> QuantStorage:
    """The quant in `folder` (its quantization_config.json, and config.json's architecture when present)."""
    folder = Path(folder)
    path = folder / QUANT_CONFIG
    text = inputs.read_text(path, "the quant's storage map", QUANT_CONFIG_BYTES, HINT)
    data = inputs.parse_json(text, "the quant's storage map", path, HINT)
    return parse_storage(data, str(path), _architecture(folder / CONFIG))


def _architecture(path: Path) -> str | None:
    """config.json's architectures[0], or None when the folder has no config.json."""
    if not path.exists():
        return None
    hint = "use the config.json exllamav3 wrote for the quant"
    config = inputs.parse_json(
        inputs.read_text(path, "the quant's config", hint=hint), "the quant's config", path
    )
    names = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(names, list) or not names or not isinstance(names[0], str) or not NAME.match(names[0]):
        raise BadInput(f"the quant's config {path} names no architecture (architectures: [...])", hint)
    return names[0]


def parse_storage(data: Any, source: str, architecture: str | None = None) -> QuantStorage:
    """A QuantStorage from a parsed quantization_config.json; BadInput naming the file and what is wrong."""

    def fail(problem: str) -> BadInput:
        return BadInput(f"the quant's storage map {source} {problem}", HINT)

    if not isinstance(data, dict):
        raise fail("is not a JSON object")
    if data.get("quant_method") != "exl3":
        raise fail(f"is not an EXL3 quant's (quant_method {printable(repr(data.get('quant_method')), 40)})")
    bits = _positive(data.get("bits"), 16, "bits", fail)
    head_bits = _positive(data.get("head_bits"), 16, "head_bits", fail)
    version = data.get("version")
    if not isinstance(version, str) or not VERSION.match(version):
        raise fail(f"has no exllamav3 version (version {printable(repr(version), 40)})")
    storage = data.get("tensor_storage")
    if not isinstance(storage, dict) or not storage:
        raise fail("has no tensor_storage (the map of every module's stored tensors)")
    seen: set[str] = set()
    modules = {key: _module(key, entry, seen, fail) for key, entry in storage.items()}
    return QuantStorage(
        modules=modules,
        bits=bits,
        head_bits=head_bits,
        codebook=_codebook(modules, data.get("codebook"), fail),
        architecture=architecture,
        version=version,
        source=source,
    )


def _positive(value: Any, limit: float, name: str, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= limit:
        raise fail(f"has {name} {printable(repr(value), 40)}, not a number of bits in (0, {limit:g}]")
    return float(value)


def _shown(name: Any) -> str:
    return printable(repr(name), 80)


def _count(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _module(key: Any, entry: Any, seen: set[str], fail: Any) -> ModuleStorage:
    """One tensor_storage entry, checked: names, shapes, byte counts, and an EXL3 linear's bits and codebook."""
    if not isinstance(key, str) or not NAME.match(key):
        raise fail(f"has a module named {printable(repr(key), 80)} (not a module key)")
    tensors = entry.get("stored_tensors") if isinstance(entry, dict) else None
    if not isinstance(tensors, dict):
        raise fail(f"module {key} has no stored_tensors map")
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for name, tensor in tensors.items():
        if (
            not isinstance(name, str)
            or not NAME.match(name)
            or not (name == key or name.startswith(key + "."))
        ):
            raise fail(f"module {key} tensor {_shown(name)} is not named after its module")
        if name in seen:
            raise fail(f"module {key} tensor {_shown(name)} is listed twice")
        seen.add(name)
        if not isinstance(tensor, dict):
            raise fail(f"module {key} tensor {_shown(name)} is not a {{shape, n_bytes, dtype}} object")
        shape, n_bytes, dtype = tensor.get("shape"), tensor.get("n_bytes"), tensor.get("dtype")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_count(d, 1 << 40) for d in shape):
            raise fail(
                f"module {key} tensor {_shown(name)} has shape {printable(repr(shape), 60)}, not a list of sizes"
            )
        if not _count(n_bytes, MAX_TENSOR_BYTES):
            raise fail(
                f"module {key} tensor {_shown(name)} has n_bytes {printable(repr(n_bytes), 40)}, not a byte count"
            )
        if dtype not in DTYPE_BYTES:
            raise fail(
                f"module {key} tensor {_shown(name)} has dtype {printable(repr(dtype), 40)}, not a torch dtype exllamav3 stores"
            )
        elements = 1
        for size in shape:
            elements *= size
        if elements * DTYPE_BYTES[dtype] != n_bytes:
            raise fail(
                f"module {key} tensor {_shown(name)}: n_bytes {n_bytes} is not its shape {shape} of {dtype}"
            )
        shapes[name] = tuple(shape)
        total += n_bytes
    group, layer = classify(key)
    bits, codebook = _exl3(key, entry, shapes, fail)
    return ModuleStorage(key, group, layer, total, bits, codebook, shapes)


def _exl3(
    key: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], fail: Any
) -> tuple[float | None, str | None]:
    """(bits, codebook) of an EXL3 linear, checked against its trellis; (None, None) for other modules."""
    quant_format = entry.get("quant_format")
    if quant_format is None:
        if "bits_per_weight" in entry or any(name in entry for name in CODEBOOK_KEYS):
            raise fail(f"module {key} has bits or a codebook but no quant_format")
        return None, None
    if quant_format != "exl3":
        raise fail(f"module {key} has quant_format {printable(repr(quant_format), 40)}, not exl3")
    trellis = shapes.get(f"{key}.trellis")
    if trellis is None or len(trellis) != 3 or trellis[2] == 0:
        raise fail(f"module {key} is exl3 but stores no trellis of shape (in/16, out/16, 16*bits)")
    bits = entry.get("bits_per_weight")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits != trellis[2] / 16:
        raise fail(
            f"module {key} has bits_per_weight {printable(repr(bits), 40)} but its trellis holds "
            f"{trellis[2] / 16:g} bits"
        )
    found = [CODEBOOK_KEYS[name] for name in CODEBOOK_KEYS if name in entry]
    for name in CODEBOOK_KEYS:
        if name in entry and not (_count(entry[name], 2**32 - 1) and entry[name]):
            raise fail(f"module {key} has {name} {printable(repr(entry[name]), 40)}, not a 32-bit multiplier")
    if len(found) > 1:
        raise fail(f"module {key} names two codebooks ({' and '.join(found)})")
    return float(bits), found[0] if found else "3inst"


def _codebook(modules: dict[str, ModuleStorage], declared: Any, fail: Any) -> str:
    """The one codebook of every EXL3 module (and of the file's own `codebook` field, when it has one)."""
    examples: dict[str, tuple[int, str]] = {}
    for module in modules.values():
        if module.codebook is not None:
            count, first = examples.get(module.codebook, (0, module.key))
            examples[module.codebook] = (count + 1, first)
    if not examples:
        raise fail("holds no EXL3 module (no quant_format exl3)")
    if len(examples) > 1:
        parts = ", ".join(
            f"{name} in {count} modules (e.g. {first})" for name, (count, first) in examples.items()
        )
        raise fail(f"mixes codebooks: {parts}; exllamav3's fused MoE kernel needs one codebook per model")
    (codebook,) = examples
    if declared is not None and declared != codebook:
        raise fail(f"declares codebook {printable(repr(declared), 40)} but its modules use {codebook}")
    return codebook
