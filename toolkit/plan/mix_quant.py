"""A mix of two published branches as the quant a plan deploys (pure but for reading the recipe file).

- Asked for as `--quant mix:LOWER+UPPER@GIB` (or `--mix`: the planner's own proposal, gap.py), the mix is placed
  like a published branch of GIB GiB of VRAM weights: a uniform stand-in quant of exactly that size with the
  lower's lm_head (the recipe raises linears, not the head), so the memory plan's weights are the target, which the
  assembled mix never exceeds (toolkit/quant/recipe.py plans at most the target, byte-exact).
- Its name is the model folder and the served model id: mix-<lower>-<upper>-<target>GiB (one safe path segment).
- Expected quality: KL(FP16||mix) interpolated in log between the two branches' measured points on the card at the
  target size (gap.py's estimate, said to be one in kl_basis); top-K agreement and perplexity linearly.
- The recipe (name and hash of its units) is the default of profiles/quant_mix.yaml, recorded so that a changed
  recipe file is noticed (plan.check refuses the plan, `deploy plan` makes a new one).
- The target lies strictly between the two branches' sizes: their card sizes (the KL estimate's frame) and their
  VRAM weights as the memory model counts them (exllamav3's storage rules, memory.weights_bytes).
- At fetch time the downloaded branches' exact sizes are known: source_target_bytes puts the mix at the share of the
  way from the lower to the upper at which the target lies between their memory-model sizes, never above the planned
  bytes. For the published branches, whose stored bytes the memory model counts exactly, that is the planned bytes;
  smaller stand-ins of them (the tests' branches) get the same share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import validate
from ..errors import BadInput
from ..facts.profiles import ModelProfile, Quant
from .gap import download_gb, interpolated_kl, kl_basis, uniform_quant
from .memory import GIB, weights_bytes
from .plan import Download, PlannedMix

PREFIX = "mix:"
SPEC = re.compile(
    r"^mix:([A-Za-z0-9][A-Za-z0-9._-]{0,63})\+([A-Za-z0-9][A-Za-z0-9._-]{0,63})"
    r"@([0-9]{1,5}(?:\.[0-9]{1,2})?)(?:GiB)?\Z"
)
SPEC_HINT = "e.g. --quant mix:2.57bpw-tuned+3.15bpw-tuned@110 (two branches of the profile, a size in GiB)"


@dataclass(frozen=True)
class MixSpec:
    """What `--quant mix:LOWER+UPPER@GIB` names."""

    lower: str
    upper: str
    target_gib: float


def is_mix_spec(quant: str | None) -> bool:
    """Whether a --quant value names a mix rather than a branch."""
    return quant is not None and quant.startswith(PREFIX)


def spec_text(lower: str, upper: str, target_gib: float) -> str:
    """The --quant spelling of a mix."""
    return f"{PREFIX}{lower}+{upper}@{target_gib:g}"


def mix_name(lower: str, upper: str, target_gib: float) -> str:
    """The mix's folder and model id; exit 2 when the branch names make it longer than a safe name may be."""
    name = f"mix-{lower}-{upper}-{target_gib:g}GiB"
    return validate.safe_name(name, "the mix's folder name")


def parse_spec(profile: ModelProfile, text: str) -> MixSpec:
    """A mix spec checked against the profile: two of its branches, the smaller first, a size strictly between."""
    found = SPEC.fullmatch(text)
    if found is None:
        raise BadInput(f"--quant {text[:120]!r} is not mix:LOWER+UPPER@GIB", SPEC_HINT)
    if profile.mix is None:
        raise BadInput(f"profile {profile.name} proposes no mixes (it has no mix: section)", "pass a branch")
    lower, upper = profile.quant(found.group(1)), profile.quant(found.group(2))
    target = float(found.group(3))
    if lower.size_gib >= upper.size_gib:
        raise BadInput(
            f"--quant {text}: {lower.branch} ({lower.size_gib:g} GiB) is not smaller than {upper.branch} "
            f"({upper.size_gib:g} GiB)",
            f"name the smaller branch first: mix:{upper.branch}+{lower.branch}@GIB",
        )
    low, high = size_range(profile, lower, upper)
    if not low < target < high:
        raise BadInput(
            f"--quant {text}: {target:g} GiB is not between {lower.branch}'s {low:.2f} and {upper.branch}'s "
            f"{high:.2f} GiB of weights",
            f"give a size between them, or deploy a branch as it is (--quant {lower.branch})",
        )
    mix_name(lower.branch, upper.branch, target)
    return MixSpec(lower.branch, upper.branch, target)


def size_range(profile: ModelProfile, lower: Quant, upper: Quant) -> tuple[float, float]:
    """GiB a mix of the two must lie strictly between: above both sizes of the lower (card, memory model), below
    both of the upper."""
    arch = profile.architecture
    return (
        max(lower.size_gib, weights_bytes(arch, lower) / GIB),
        min(upper.size_gib, weights_bytes(arch, upper) / GIB),
    )


def _between(low: float, high: float, share: float) -> float:
    return low + share * (high - low)


def stand_in(profile: ModelProfile, spec: MixSpec) -> Quant:
    """The quant the planner places for the mix: exactly target GiB of weights, the lower's head, the estimates."""
    lower, upper = profile.quant(spec.lower), profile.quant(spec.upper)
    share = (spec.target_gib - lower.size_gib) / (upper.size_gib - lower.size_gib)
    uniform = uniform_quant(profile, lower.head_bits, int(spec.target_gib * GIB))
    log_kl = _between(math.log(lower.kl_quant_ref), math.log(upper.kl_quant_ref), share)
    return Quant(
        branch=mix_name(spec.lower, spec.upper, spec.target_gib),
        bpw=uniform.bpw,
        head_bits=lower.head_bits,
        size_gib=spec.target_gib,
        kl_quant_ref=math.exp(log_kl),
        kl_ref_quant=interpolated_kl(lower, upper, spec.target_gib),
        ppl=_between(lower.ppl, upper.ppl, share),
        top_k_agreement=tuple(
            _between(a, b, share) for a, b in zip(lower.top_k_agreement, upper.top_k_agreement)
        ),
    )


def planned_mix(profile: ModelProfile, spec: MixSpec, recipe_name: str, recipe_sha256: str) -> PlannedMix:
    """The plan's record of the mix."""
    lower, upper = profile.quant(spec.lower), profile.quant(spec.upper)
    return PlannedMix(
        name=mix_name(spec.lower, spec.upper, spec.target_gib),
        lower=spec.lower,
        upper=spec.upper,
        recipe=recipe_name,
        recipe_sha256=recipe_sha256,
        target_gib=spec.target_gib,
        expected_kl=round(interpolated_kl(lower, upper, spec.target_gib), 4),
        kl_basis=kl_basis(lower, upper),
        head_bits=lower.head_bits,
        downloads=(download_of(profile, lower), download_of(profile, upper)),
    )


def download_of(profile: ModelProfile, quant: Quant) -> Download:
    """A branch's download as the plan lists it."""
    return Download(quant.branch, download_gb(profile, quant))


def default_recipe() -> tuple[str, str]:
    """The default recipe of profiles/quant_mix.yaml: its name and hash."""
    from ..quant.recipe import load_recipe

    recipe = load_recipe(None)
    return recipe.name, recipe.sha256


def recipe_hash(name: str) -> str:
    """The hash of a recipe of profiles/quant_mix.yaml by name (exit 2 when there is none of that name)."""
    from ..quant.recipe import RECIPES_FILE, load_recipe

    if "/" in name or name.endswith((".yaml", ".yml")):
        raise BadInput(f"recipe {name!r} is not a recipe of {RECIPES_FILE.name}", "re-run `deploy plan`")
    return load_recipe(name).sha256


def source_target_bytes(profile: ModelProfile, mix: PlannedMix, lower_bytes: int, upper_bytes: int) -> int:
    """The mix's target in VRAM bytes once the branches' exact sizes are known: at the share of the way from the
    lower to the upper where the planned target lies between their memory-model sizes, never above the planned
    bytes."""
    arch = profile.architecture
    low, high = (weights_bytes(arch, profile.quant(b)) for b in (mix.lower, mix.upper))
    planned = int(mix.target_gib * GIB)
    share = (planned - low) / (high - low)
    return min(planned, lower_bytes + int(share * (upper_bytes - lower_bytes)))
