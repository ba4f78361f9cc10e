"""Load and validate model profiles (profiles/*.yaml): what is true of a model is data, not code."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .. import inputs
from ..errors import BadInput
from .paths import PROFILES_DIR

# A quant branch doubles as a git revision, a folder name and a Docker label value: keep it boring.
# Counts in a profile (parameters, bytes, tokens) stay below this: larger is a typo, and would overflow the
# floating-point memory model.
MAX_PROFILE_INT = 10**15
BRANCH_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NOT_MODELS = ("gpus", "tabbyapi", "bench_ceiling")  # the other data files of profiles/
CACHE_FLOOR_PATTERN = re.compile(r"^[2-8],[2-8]\Z")  # a quantized K,V cache mode in TabbyAPI's spelling
REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class Architecture:
    """The numbers of the transformer that decide memory."""

    arch: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    vocab_size: int
    max_position_embeddings: int
    linear_params: int
    head_params: int
    embedding_bytes: int
    attention_bias: bool = False  # q/k/v store a bias (GLM-4.x MoE: true)
    use_qk_norm: bool = False  # per-head q/k RMS norms (GLM-4.x MoE: true; GLM-4.5-Air: none)


@dataclass(frozen=True)
class Quant:
    """One EXL3 quant (one git branch of the model repo) with its measured quality."""

    branch: str
    bpw: float
    head_bits: int
    size_gib: float
    kl_quant_ref: float
    kl_ref_quant: float
    ppl: float
    top_k_agreement: tuple[float, ...]
    # "trellis": bpw is the bits of every linear's trellis (the uniform branches, named after it); "storage": bpw is
    # exllamav3's reported layer bitrate, which already counts each linear's scales, biases and multiplier (the
    # tuned branches: their names are optimize's "New estimated model bitrate").
    bpw_basis: str = "trellis"

    @property
    def top1(self) -> float:
        """Fraction of positions where the quant's argmax equals FP16's."""
        return self.top_k_agreement[0]


@dataclass(frozen=True)
class Serving:
    """TabbyAPI settings that belong to the model rather than to the host."""

    chunk_size: int
    reasoning: bool
    reasoning_start_token: str
    reasoning_end_token: str
    tool_format: str
    default_min_context: int
    cache_floor: str  # the lowest K,V cache mode the model card recommends ("5,4"): the planner's floor
    chunk_fallbacks: tuple[ChunkFallback, ...] = ()  # smaller chunk sizes the planner may use, in order


@dataclass(frozen=True)
class ChunkFallback:
    """A chunk_size below the default that the planner may use when the required context does not fit, where the
    memory model is calibrated for it, and its measured prefill speed relative to the default chunk_size."""

    chunk_size: int
    calibrated_splits: tuple[str, ...]  # "single", "tp", "layer": where the overhead terms were checked at it
    prefill_vs_default: tuple[float, ...]  # measured ratios (one per run); () when not measured


@dataclass(frozen=True)
class MemoryOverhead:
    """Per-GPU VRAM beyond weights and cache, in MiB; fitted on real exllamav3 loads (benchmarks/memory_calibration)."""

    base_mib: float  # CUDA context, cuBLAS, kernels: outside torch's allocator (and gpu_split)
    resident_mib: float  # exllamav3 static buffers + the chunk-independent part of the transient
    chunk_mib_per_token: float  # transient of the chunk_size dummy forward, per token of chunk_size
    quant_cache_staging_mib: float  # quantized-cache staging scratch (only with a quantized cache)
    output_gpu_mib: float  # extra on the GPU holding the lm_head (single, last of a layer split)
    tensor_parallel_mib: float  # extra on every GPU under tensor parallel (its worker processes)
    layer_spill_mib: float  # extra on each GPU of a layer split but the last (module that did not fit)


@dataclass(frozen=True)
class Calibration:
    """The memory terms measured with one exllamav3 version, through one TabbyAPI commit."""

    exllamav3: str  # the version the loads ran ("1.6.5")
    tabbyapi: str  # the TabbyAPI commit they ran through (full SHA)
    source: str  # where the measurement and its fit are
    terms: MemoryOverhead


@dataclass(frozen=True)
class UncalibratedMargin:
    """What a plan for a stack without calibration keeps free per GPU: max(min_mib, fraction x the GPU's memory)."""

    min_mib: int
    fraction: float
    source: str

    def mib(self, total_mib: int) -> int:
        """The margin on a GPU of total_mib."""
        return max(self.min_mib, math.ceil(total_mib * self.fraction))


@dataclass(frozen=True)
class MixPolicy:
    """When the planner proposes a mix of two published branches (profile `mix:`; toolkit/plan/gap.py)."""

    codebook: (
        str  # the codebook every branch of the repository uses: only branches of one codebook can be mixed
    )
    min_gap_gib: float  # propose only when at least this much of the weights budget is left unused
    margin_gib: float  # the target is the budget rounded down to whole GiB, minus this
    source: str  # why these numbers


@dataclass(frozen=True)
class ModelProfile:
    """A model, its quant catalog and its serving settings, as read from a profile file."""

    name: str
    display_name: str
    hf_repo: str
    architecture: Architecture
    quants: tuple[Quant, ...]
    serving: Serving
    reference_ppl: float
    source: Path
    calibrations: tuple[Calibration, ...]  # by exllamav3 version, oldest first
    uncalibrated_margin: UncalibratedMargin
    # The terms memory.py applies, and the exllamav3 version they were measured with: the newest calibration as
    # loaded; the planner switches to its stack's (with_calibration).
    memory_overhead: MemoryOverhead
    calibration: str
    mix: MixPolicy | None = None  # None: the profile proposes no mixes

    def calibration_for(self, exllamav3: str) -> Calibration | None:
        """The calibration measured with that exllamav3 version, if any."""
        return next((c for c in self.calibrations if c.exllamav3 == exllamav3), None)

    def with_calibration(self, exllamav3: str) -> ModelProfile:
        """This profile with the memory terms of that exllamav3 version (which must be calibrated)."""
        found = self.calibration_for(exllamav3)
        if found is None:
            known = ", ".join(c.exllamav3 for c in self.calibrations)
            raise BadInput(
                f"{self.name} has no memory calibration for exllamav3 {exllamav3}", f"calibrated: {known}"
            )
        return replace(self, memory_overhead=found.terms, calibration=exllamav3)

    def quant(self, branch: str) -> Quant:
        """The quant of that branch, or a clear error listing the known ones."""
        for quant in self.quants:
            if quant.branch == branch:
                return quant
        known = ", ".join(q.branch for q in self.quants)
        raise BadInput(f"unknown quant {branch!r} for {self.name}", f"choose one of: {known}")


class _Reader:
    """Typed field access that names the file and the field in every error."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> BadInput:
        return BadInput(f"profile {self.source}: field {field!r} {problem}", "fix the profile file")

    def mapping(self, data: Any, field: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(field, "must be a mapping")
        return data

    def get(self, data: dict[str, Any], key: str, kind: type | tuple[type, ...], field: str) -> Any:
        if key not in data:
            raise self.fail(f"{field}{key}", "is missing")
        value = data[key]
        if (
            isinstance(value, bool)
            and kind is not bool
            and bool not in (kind if isinstance(kind, tuple) else ())
        ):
            raise self.fail(f"{field}{key}", f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise self.fail(f"{field}{key}", f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def positive_int(self, data: dict[str, Any], key: str, field: str) -> int:
        value = self.get(data, key, int, field)
        if not 0 < value <= MAX_PROFILE_INT:
            raise self.fail(
                f"{field}{key}", f"must be between 1 and {MAX_PROFILE_INT:.0e}, got {str(value)[:20]}"
            )
        return value

    def number(self, data: dict[str, Any], key: str, field: str, low: float, high: float) -> float:
        raw = self.get(data, key, (int, float), field)
        value = float(raw) if not isinstance(raw, int) or abs(raw) <= MAX_PROFILE_INT else math.inf
        if not low <= value <= high:
            raise self.fail(f"{field}{key}", f"must be between {low} and {high}, got {value:.6g}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


FLAGS = ("attention_bias", "use_qk_norm")  # optional architecture booleans (default false)


def _architecture(reader: _Reader, data: dict[str, Any]) -> Architecture:
    fields = {
        name: reader.positive_int(data, name, "architecture.")
        for name in Architecture.__dataclass_fields__
        if name not in ("arch", *FLAGS)
    }
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise reader.fail("architecture.num_key_value_heads", "must divide num_attention_heads")
    flags = {name: reader.get(data, name, bool, "architecture.") for name in FLAGS if name in data}
    return Architecture(arch=reader.get(data, "arch", str, "architecture."), **fields, **flags)


def _quant(reader: _Reader, data: Any, index: int) -> Quant:
    field = f"quants[{index}]."
    data = reader.mapping(data, field.rstrip("."))
    branch = reader.get(data, "branch", str, field)
    if not BRANCH_PATTERN.match(branch):
        raise reader.fail(f"{field}branch", f"is not a safe branch name: {branch!r}")
    agreement = reader.get(data, "top_k_agreement", list, field)
    if not agreement or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in agreement):
        raise reader.fail(f"{field}top_k_agreement", "must be a non-empty list of fractions in [0, 1]")
    head_bits = reader.get(data, "head_bits", int, field)
    if not 2 <= head_bits <= 16:
        raise reader.fail(f"{field}head_bits", f"must be between 2 and 16, got {head_bits}")
    return Quant(
        branch=branch,
        bpw=reader.number(data, "bpw", field, 1.0, 16.0),
        head_bits=head_bits,
        size_gib=reader.number(data, "size_gib", field, 0.0, 1e6),
        kl_quant_ref=reader.number(data, "kl_quant_ref", field, 0.0, 100.0),
        kl_ref_quant=reader.number(data, "kl_ref_quant", field, 0.0, 100.0),
        ppl=reader.number(data, "ppl", field, 1.0, 1e6),
        top_k_agreement=tuple(float(x) for x in agreement),
        bpw_basis=_bpw_basis(reader, data, field),
    )


BPW_BASES = ("trellis", "storage")


def _bpw_basis(reader: _Reader, data: dict[str, Any], field: str) -> str:
    """What a quant's bpw counts (optional; "trellis" unless the profile says "storage")."""
    basis = reader.get(data, "bpw_basis", str, field) if "bpw_basis" in data else "trellis"
    if basis not in BPW_BASES:
        raise reader.fail(f"{field}bpw_basis", f"must be one of {', '.join(BPW_BASES)}, got {basis!r}")
    return basis


def _check_size(reader: _Reader, arch: Architecture, quant: Quant, index: int) -> None:
    """The card's size must match the weight formula, or the profile's numbers are inconsistent."""
    formula_gib = (quant.bpw * arch.linear_params + quant.head_bits * arch.head_params) / 8 / 2**30
    if abs(formula_gib - quant.size_gib) > 1.0:
        raise reader.fail(
            f"quants[{index}].size_gib", f"is {quant.size_gib} but bpw/head_bits give {formula_gib:.2f} GiB"
        )


SPLIT_NAMES = ("single", "tp", "layer")


def _chunk_fallbacks(reader: _Reader, serving: dict[str, Any]) -> tuple[ChunkFallback, ...]:
    """serving.chunk_fallbacks (optional): [{chunk_size, calibrated_splits, prefill_vs_default}], each smaller
    than the one before, all below serving.chunk_size."""
    raw = serving.get("chunk_fallbacks", [])
    if not isinstance(raw, list):
        raise reader.fail("serving.chunk_fallbacks", "must be a list")
    fallbacks: list[ChunkFallback] = []
    above = serving.get("chunk_size")
    for index, item in enumerate(raw):
        field = f"serving.chunk_fallbacks[{index}]."
        item = reader.mapping(item, field.rstrip("."))
        size = reader.positive_int(item, "chunk_size", field)
        if not isinstance(above, int) or size >= above:
            raise reader.fail(
                f"{field}chunk_size", f"must be below {above} (the default or the previous one)"
            )
        splits = reader.get(item, "calibrated_splits", list, field)
        if not splits or not all(split in SPLIT_NAMES for split in splits):
            raise reader.fail(f"{field}calibrated_splits", f"must list some of {', '.join(SPLIT_NAMES)}")
        ratios = reader.get(item, "prefill_vs_default", list, field)
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios):
            raise reader.fail(f"{field}prefill_vs_default", "must be a list of positive ratios")
        fallbacks.append(ChunkFallback(size, tuple(splits), tuple(float(r) for r in ratios)))
        above = size
    return tuple(fallbacks)


VERSION_PATTERN = re.compile(r"^[0-9]{1,4}(?:\.[0-9]{1,4}){1,3}$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")


def _calibrations(reader: _Reader, data: dict[str, Any]) -> tuple[Calibration, ...]:
    """memory_overhead: {exllamav3 version: {source, tabbyapi, every MemoryOverhead term}}, all fields required."""
    if not data:
        raise reader.fail("memory_overhead", "must hold at least one exllamav3 version's terms")
    found = []
    for version, raw in data.items():
        field = f"memory_overhead.{version}."
        if not isinstance(version, str) or not VERSION_PATTERN.match(version):
            raise reader.fail(
                f"memory_overhead.{version}", 'must be keyed by an exllamav3 version in quotes ("1.6.5")'
            )
        entry = reader.mapping(raw, field.rstrip("."))
        tabbyapi = reader.get(entry, "tabbyapi", str, field)
        if not SHA_PATTERN.match(tabbyapi):
            raise reader.fail(f"{field}tabbyapi", f"must be a full 40-hex TabbyAPI commit, got {tabbyapi!r}")
        terms = MemoryOverhead(
            **{
                name: reader.number(entry, name, field, 0.0, 1e6)
                for name in MemoryOverhead.__dataclass_fields__
            }
        )
        found.append(Calibration(version, tabbyapi, reader.get(entry, "source", str, field), terms))
    return tuple(sorted(found, key=lambda c: tuple(int(p) for p in c.exllamav3.split("."))))


def _margin(reader: _Reader, data: dict[str, Any]) -> UncalibratedMargin:
    field = "uncalibrated_margin."
    return UncalibratedMargin(
        min_mib=int(reader.number(data, "min_mib", field, 0, 1e6)),
        fraction=reader.number(data, "fraction", field, 0.0, 0.5),
        source=reader.get(data, "source", str, field),
    )


CODEBOOKS = ("mcg", "mul1", "3inst")  # exllamav3's EXL3 codebooks (toolkit/quant/storage.py)


def _mix(reader: _Reader, data: Any) -> MixPolicy | None:
    """mix: (optional) {codebook, min_gap_gib, margin_gib, source}."""
    if data is None:
        return None
    data = reader.mapping(data, "mix")
    codebook = reader.get(data, "codebook", str, "mix.")
    if codebook not in CODEBOOKS:
        raise reader.fail("mix.codebook", f"must be one of {', '.join(CODEBOOKS)}, got {codebook!r}")
    return MixPolicy(
        codebook=codebook,
        min_gap_gib=reader.number(data, "min_gap_gib", "mix.", 0.0, 1e4),
        margin_gib=reader.number(data, "margin_gib", "mix.", 0.0, 1e3),
        source=reader.get(data, "source", str, "mix."),
    )


def parse_profile(data: Any, source: Path) -> ModelProfile:
    """Validate a profile's parsed YAML into a ModelProfile."""
    reader = _Reader(source)
    data = reader.mapping(data, "(top level)")
    if data.get("schema") != 1:
        raise reader.fail("schema", f"must be 1, got {data.get('schema')!r}")
    arch = _architecture(reader, reader.mapping(data.get("architecture"), "architecture"))
    raw_quants = reader.get(data, "quants", list, "")
    if not raw_quants:
        raise reader.fail("quants", "must list at least one quant")
    quants = tuple(_quant(reader, item, i) for i, item in enumerate(raw_quants))
    for i, quant in enumerate(quants):
        _check_size(reader, arch, quant, i)
    branches = [q.branch for q in quants]
    if len(set(branches)) != len(branches):
        raise reader.fail("quants", "has a duplicate branch")
    serving_data = reader.mapping(data.get("serving"), "serving")
    serving = Serving(
        chunk_size=reader.positive_int(serving_data, "chunk_size", "serving."),
        reasoning=reader.get(serving_data, "reasoning", bool, "serving."),
        reasoning_start_token=reader.get(serving_data, "reasoning_start_token", str, "serving."),
        reasoning_end_token=reader.get(serving_data, "reasoning_end_token", str, "serving."),
        tool_format=reader.get(serving_data, "tool_format", str, "serving."),
        default_min_context=reader.positive_int(serving_data, "default_min_context", "serving."),
        cache_floor=reader.get(serving_data, "cache_floor", str, "serving."),
        chunk_fallbacks=_chunk_fallbacks(reader, serving_data),
    )
    if not CACHE_FLOOR_PATTERN.match(serving.cache_floor):
        raise reader.fail(
            "serving.cache_floor", f'must be K,V bits such as "5,4", got {serving.cache_floor!r}'
        )
    hf_repo = reader.get(data, "hf_repo", str, "")
    if not REPO_PATTERN.match(hf_repo):
        raise reader.fail("hf_repo", f"is not an owner/name repository id: {hf_repo!r}")
    name = reader.get(data, "name", str, "")
    if not BRANCH_PATTERN.match(name):
        raise reader.fail("name", f"is not a safe name: {name!r}")
    reference = reader.mapping(data.get("reference"), "reference")
    calibrations = _calibrations(reader, reader.mapping(data.get("memory_overhead"), "memory_overhead"))
    return ModelProfile(
        name=name,
        display_name=reader.get(data, "display_name", str, ""),
        hf_repo=hf_repo,
        architecture=arch,
        quants=quants,
        serving=serving,
        reference_ppl=reader.number(reference, "ppl", "reference.", 1.0, 1e6),
        source=source,
        calibrations=calibrations,
        uncalibrated_margin=_margin(
            reader, reader.mapping(data.get("uncalibrated_margin"), "uncalibrated_margin")
        ),
        memory_overhead=calibrations[-1].terms,
        calibration=calibrations[-1].exllamav3,
        mix=_mix(reader, data.get("mix")),
    )


def load_profile(name_or_path: str = "glm-4.7") -> ModelProfile:
    """Load a profile by name (profiles/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and "/" not in name_or_path:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if p.stem not in NOT_MODELS))
        raise BadInput(f"no profile {name_or_path!r}", f"use one of: {known}, or a path to a profile YAML")
    text = inputs.read_text(path, "profile", hint="fix the profile file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"profile {path}:{where} is not valid YAML", "fix the profile file") from None
    except RecursionError:
        raise BadInput(f"profile {path} nests too deeply", "fix the profile file") from None
    inputs.check_depth(data, "profile", path, "fix the profile file")
    return parse_profile(data, path)
