"""Which tensors of a mix come from which source: compatibility of the sources and the recipe's exact plan.

A recipe (profiles/quant_mix.yaml, or a YAML file of the same shape) is an ordered list of units; a unit is some
tensor groups walked layer by layer. plan_mix takes the sources lowest first and raises each step -- the unit's
groups in one layer -- to the highest source that still fits the target, so the mix's bytes are known before a
byte is copied: the sum of the chosen sources' stored bytes per module (their tensor_storage), never above the
target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import inputs
from ..errors import BadInput
from ..facts.paths import PROFILES_DIR
from .storage import GROUPS, ModuleStorage, QuantStorage

RECIPES_FILE = PROFILES_DIR / "quant_mix.yaml"
ORDERS = ("early_first", "late_first")
# The embedding lives in system RAM and is unquantized: nothing to gain by mixing it.
RECIPE_GROUPS = tuple(g for g in GROUPS if g != "embedding")
GIB = 1 << 30
_SAME_MODEL = "mix quants of one model made with the same codebook (e.g. two branches of one EXL3 repository)"

Source = tuple[str, QuantStorage]


@dataclass(frozen=True)
class RecipeUnit:
    """Tensor groups raised together, layer by layer in the given order."""

    groups: tuple[str, ...]
    order: str


@dataclass(frozen=True)
class Recipe:
    """An ordered list of units, with where it comes from."""

    name: str
    units: tuple[RecipeUnit, ...]
    source: str

    @property
    def sha256(self) -> str:
        """Hash of what decides the plan (the units), recorded in the mix's manifest."""
        document = [{"groups": list(u.groups), "order": u.order} for u in self.units]
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class MixPlan:
    """The modules taken from a source other than the base, and the mix's exact sizes."""

    base: str
    overrides: dict[str, str]  # module key -> source id, for every module not taken from the base
    target_bytes: int
    predicted_bytes: int  # VRAM bytes: every stored tensor but the embedding's
    tensor_bytes: int  # every stored tensor, the embedding's too (what the shards hold)
    by_group: dict[str, int]

    def source_of(self, key: str) -> str:
        """The source a module comes from."""
        return self.overrides.get(key, self.base)


def load_recipe(spec: str | None) -> Recipe:
    """A recipe by name from profiles/quant_mix.yaml (None: its default), or from a YAML file of one recipe."""
    if spec is not None and (spec.endswith((".yaml", ".yml")) or "/" in spec):
        data = inputs.parse_yaml(inputs.read_text(spec, "--recipe"), "--recipe", spec)
        if not isinstance(data, dict):
            raise BadInput(f"--recipe {spec} is not a mapping with units", "see profiles/quant_mix.yaml")
        return _recipe(str(data.get("name") or Path(spec).stem), data, str(spec))
    data = inputs.parse_yaml(inputs.read_text(RECIPES_FILE, "the recipe file"), "recipes", RECIPES_FILE)
    recipes = data.get("recipes") if isinstance(data, dict) else None
    if not isinstance(recipes, dict) or not recipes:
        raise BadInput(f"{RECIPES_FILE} holds no recipes", "restore it from the package")
    name = spec or str(data.get("default"))
    if name not in recipes:
        raise BadInput(
            f"--recipe {name!r} is not a recipe", f"use one of {', '.join(sorted(recipes))} or a file"
        )
    entry = recipes[name]
    source = entry.get("source") if isinstance(entry, dict) else None
    return _recipe(name, entry, str(source or RECIPES_FILE))


def _recipe(name: str, data: object, source: str) -> Recipe:
    units = data.get("units") if isinstance(data, dict) else None
    if not isinstance(units, list) or not units:
        raise BadInput(
            f"recipe {name!r} has no units", "give it a list of {groups: [...], order: early_first}"
        )
    parsed: list[RecipeUnit] = []
    seen: set[str] = set()
    for index, unit in enumerate(units, 1):
        groups = unit.get("groups") if isinstance(unit, dict) else None
        order = unit.get("order", "early_first") if isinstance(unit, dict) else None
        if not isinstance(groups, list) or not groups or order not in ORDERS:
            raise BadInput(
                f"recipe {name!r} unit {index} is not {{groups: [...], order: early_first|late_first}}",
                "fix the recipe",
            )
        for group in groups:
            if group not in RECIPE_GROUPS:
                raise BadInput(
                    f"recipe {name!r} unit {index}: {str(group)[:40]!r} is not a tensor group",
                    f"use {', '.join(RECIPE_GROUPS)}",
                )
            if group in seen:
                raise BadInput(
                    f"recipe {name!r} names the group {group} twice", "name each group in one unit"
                )
            seen.add(group)
        parsed.append(RecipeUnit(tuple(groups), order))
    return Recipe(name, tuple(parsed), source)


def check_compatible(sources: list[Source]) -> None:
    """Refuse sources exllamav3 cannot mix: another architecture, codebook, module set or original shape."""
    if len(sources) < 2:
        raise BadInput("a mix needs at least two sources", "pass --lower and --upper")
    ids = [sid for sid, _ in sources]
    if len(set(ids)) != len(ids):
        raise BadInput(
            f"two sources are named {next(i for i in ids if ids.count(i) > 1)}", "pass each quant once"
        )
    first_id, first = sources[0]
    for sid, other in sources[1:]:
        problem = _mismatch(first, other)
        if problem is not None:
            raise BadInput(f"{sid} cannot be mixed with {first_id}: {problem}", _SAME_MODEL)


def _mismatch(a: QuantStorage, b: QuantStorage) -> str | None:
    """The first difference that makes two quants unmixable, in words (None when they mix)."""
    if a.architecture != b.architecture:
        return f"architecture {b.architecture} is not {a.architecture}"
    if a.codebook != b.codebook:
        return f"codebook {b.codebook} is not {a.codebook}"
    missing = next((k for k in a.modules if k not in b.modules), None)
    if missing is not None:
        return f"it has no module {missing}"
    extra = next((k for k in b.modules if k not in a.modules), None)
    if extra is not None:
        return f"it has a module {extra} the other lacks"
    for key, ma in a.modules.items():
        problem = _module_mismatch(ma, b.modules[key])
        if problem is not None:
            return f"module {key}: {problem}"
    return None


def _module_mismatch(a: ModuleStorage, b: ModuleStorage) -> str | None:
    if (a.bits is None) != (b.bits is None):
        return "quantized in one source only"
    if a.codebook != b.codebook:
        return f"codebook {b.codebook} is not {a.codebook}"
    if set(a.shapes) != set(b.shapes):
        return f"stored tensors {sorted(b.shapes)} are not {sorted(a.shapes)}"
    for name, shape in a.shapes.items():
        other = b.shapes[name]
        if a.bits is not None and name.endswith(".trellis"):
            if len(shape) != 3 or len(other) != 3 or shape[:2] != other[:2]:
                return f"{name} shape {list(other)} does not quantize the same matrix as {list(shape)}"
        elif shape != other:
            return f"{name} shape {list(other)} is not {list(shape)}"
    if a.bits is None and a.n_bytes != b.n_bytes:
        return f"unquantized tensors of {b.n_bytes} bytes are not {a.n_bytes} bytes (another dtype)"
    return None


def steps(storage: QuantStorage, recipe: Recipe) -> list[list[str]]:
    """The recipe's steps on this model: per unit, per layer in the unit's order, the module keys raised together."""
    walked: list[list[str]] = []
    for unit in recipe.units:
        by_layer: dict[int | None, list[str]] = {}
        for key, module in storage.modules.items():
            if module.group in unit.groups:
                by_layer.setdefault(module.layer, []).append(key)
        layers = sorted((la for la in by_layer if la is not None), reverse=unit.order == "late_first")
        walked += [by_layer[la] for la in layers]
        if None in by_layer:
            walked.append(by_layer[None])
    return walked


def feasible_range(sources: list[Source], recipe: Recipe) -> tuple[int, int]:
    """The smallest and largest VRAM bytes a mix of these sources can have with this recipe."""
    base = sources[0][1]
    top = sources[-1][1]
    low = base.vram_bytes
    high = low + sum(
        top.modules[k].n_bytes - base.modules[k].n_bytes for step in steps(base, recipe) for k in step
    )
    return low, high


def plan_mix(sources: list[Source], target_bytes: int, recipe: Recipe) -> MixPlan:
    """Walk the recipe's steps raising each to the highest source that fits; exit 2 outside the feasible range."""
    low, high = feasible_range(sources, recipe)
    check_target(sources, target_bytes, (low, high), f"recipe {recipe.name}")
    base = sources[0][1]
    room = target_bytes - low
    overrides: dict[str, str] = {}
    for step in steps(base, recipe):
        now = sum(base.modules[k].n_bytes for k in step)
        for sid, storage in reversed(sources[1:]):
            extra = sum(storage.modules[k].n_bytes for k in step) - now
            if extra <= room:
                room -= extra
                overrides.update((k, sid) for k in step)
                break
    return make_plan(sources, overrides, target_bytes)


def check_target(sources: list[Source], target_bytes: int, feasible: tuple[int, int], how: str) -> None:
    """Exit 2, saying the feasible range, when the target is outside it."""
    low, high = feasible
    if not low <= target_bytes <= high:
        raise BadInput(
            f"a target of {gib(target_bytes)} GiB is outside what {' + '.join(s for s, _ in sources)} make with "
            f"{how}: {gib(low)} to {gib(high)} GiB of VRAM weights ({low} to {high} bytes)",
            f"pass a target between {gib(low)} and {gib(high)} GiB (or deploy a source branch as it is)",
        )


def make_plan(sources: list[Source], overrides: dict[str, str], target_bytes: int) -> MixPlan:
    """A plan from chosen overrides (the recipe's, or the optimizer's): sizes summed from the chosen sources."""
    by_id = dict(sources)
    base_id, base = sources[0]
    by_group: dict[str, int] = {}
    vram = total = 0
    for key, module in base.modules.items():
        chosen = by_id[overrides.get(key, base_id)].modules[key]
        by_group[module.group] = by_group.get(module.group, 0) + chosen.n_bytes
        total += chosen.n_bytes
        if module.group != "embedding":
            vram += chosen.n_bytes
    return MixPlan(base_id, dict(overrides), target_bytes, vram, total, by_group)


def gib(n: int) -> str:
    """Bytes as GiB with enough digits to tell neighbouring targets apart."""
    return f"{n / GIB:.3f}"
