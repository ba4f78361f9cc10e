"""A deployment whose plan names a mix (plan.mix): both branches fetched, the mix assembled into the model folder.

- fetch (fetch_sources, run by steps.fetch_step): first each branch's config.json and quantization_config.json
  (one file each, pinned to the branch's commit), checked as the assembly will check them -- one model, one
  codebook, the target within what the recipe makes of them -- so that a mismatch is exit 2 before hundreds of GB
  are downloaded; then both branches with fetch-model's machinery, each pinned to its commit with its marker.
- mix (mix_step, `deploy mix-model`, `deploy auto` after build): every check of `deploy quant mix` (complete
  shards, compatibility, target, disk), then exllamav3's assembly (toolkit.quant.mix) in the deployment's built
  image (toolkit.deploy.mix_image.ImageRunner) or a local Python, into <models>/<mix name>; reused when mix.json
  there is this very mix (mix.py's key: sources and their commits, recipe, target).
- The target in bytes: the planned GiB placed between the downloaded branches' exact sizes as it lies between
  their card sizes, never above the planned bytes (plan.mix_quant.source_target_bytes).
- model_marker: what the later steps (up, reference, status) read to know the model is in place: the download
  marker of a branch plan; for a mix, a marker-like record of its folder (mix.json's key as the commit) when
  mix.json names this plan's mix and its shards are all there. A mix in place needs its branches no more: they may
  be deleted, and fetch and mix then keep the mix as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing
from ..facts.layout import MODEL_MARKER
from ..facts.profiles import load_profile
from ..output import Progress
from ..plan.mix_quant import source_target_bytes
from ..plan.plan import PlannedMix
from .deployment import Deployment

CONFIG_LIMIT_BYTES = 1 << 20  # a config.json is a few KB


@dataclass(frozen=True)
class MixSources:
    """fetch-model's result for a mix: both branches downloaded (or the mix already in place)."""

    mix: str
    path: str  # the mix's folder
    sources: tuple[Any, ...]  # hub.ModelFetch of lower and upper; () when the mix was in place
    mix_in_place: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "mix": self.mix,
            "path": self.path,
            "mix_in_place": self.mix_in_place,
            "sources": [s.to_dict() for s in self.sources],
        }

    def lines(self) -> list[str]:
        """What fetch-model says, a line per branch."""
        if self.mix_in_place:
            return [f"mix {self.mix} already in place at {self.path}: nothing to download"]
        return [
            f"source ready at {s.path} ({s.repo}@{s.revision}, commit {s.commit[:12]}, "
            f"{s.total_bytes / 2**30:.1f} GiB{', reused' if s.reused else ''})"
            for s in self.sources
        ] + [f"next: `deploy mix-model` assembles {self.mix} from them"]


def planned_mix(dep: Deployment) -> PlannedMix:
    """The plan's mix (exit 2 for a plan that deploys a published branch)."""
    if dep.plan.mix is None:
        raise BadInput(
            f"the plan of {dep.out_dir} deploys the branch {dep.plan.quant}: there is no mix to assemble",
            "plan with --mix or --quant mix:LOWER+UPPER@GIB",
        )
    return dep.plan.mix


def source_dir(dep: Deployment, branch: str) -> Path:
    """Where fetch-model puts a branch of the mix: beside the mix, as a deployment of that branch would."""
    from .hub import model_path

    return model_path(dep.models_dir, branch)


def fetch_sources(dep: Deployment, progress: Progress, token: str | None) -> MixSources:
    """Check both branches' storage maps, then download both (nothing when the mix is in place already)."""
    from . import hub

    mix = planned_mix(dep)
    if model_marker(dep) is not None:
        progress.note(f"reusing the mix in place at {dep.model_dir} (its branches are not needed)")
        return MixSources(mix.name, str(dep.model_dir), (), True)
    precheck_sources(dep, token, progress)
    fetched = tuple(
        hub.fetch_model(
            dep.plan.hf_repo,
            branch,
            dep.models_dir,
            token,
            progress=not progress.quiet,
            note=progress.note,
        )
        for branch in (mix.lower, mix.upper)
    )
    return MixSources(mix.name, str(dep.model_dir), fetched, False)


def precheck_sources(dep: Deployment, token: str | None, progress: Progress) -> None:
    """From the two branches' config.json and quantization_config.json alone: they mix, and the target lies within
    what the recipe makes of them (exit 2 otherwise, before any shard is downloaded)."""
    from ..quant.recipe import check_compatible, load_recipe, plan_mix
    from ..quant.storage import CONFIG, QUANT_CONFIG, QUANT_CONFIG_BYTES, read_storage
    from . import hub

    mix = planned_mix(dep)
    pairs = []
    for branch in (mix.lower, mix.upper):
        for name, limit in ((CONFIG, CONFIG_LIMIT_BYTES), (QUANT_CONFIG, QUANT_CONFIG_BYTES)):
            hub.fetch_file(
                dep.plan.hf_repo,
                branch,
                dep.models_dir,
                token,
                filename=name,
                limit=limit,
                progress=not progress.quiet,
            )
        pairs.append((branch, read_storage(source_dir(dep, branch))))
    check_compatible(pairs)
    profile = load_profile(dep.plan.profile)
    target = source_target_bytes(profile, mix, pairs[0][1].vram_bytes, pairs[1][1].vram_bytes)
    plan_mix(pairs, target, load_recipe(mix.recipe))


def target_bytes(dep: Deployment, lower: Path, upper: Path) -> int:
    """The mix's target in VRAM bytes for these downloaded branches."""
    from ..quant.storage import read_storage

    mix = planned_mix(dep)
    profile = load_profile(dep.plan.profile)
    return source_target_bytes(profile, mix, read_storage(lower).vram_bytes, read_storage(upper).vram_bytes)


def prepare_mix(dep: Deployment, force: bool = False) -> Any:
    """Every check of the assembly but the runner's (quant.mix.prepare), on the downloaded branches; None when they
    are not both downloaded but the mix is in place (it is kept); exit 4 when neither."""
    from ..quant import mix as quant_mix
    from ..quant.recipe import GIB
    from . import hub

    mix = planned_mix(dep)
    folders = [source_dir(dep, branch) for branch in (mix.lower, mix.upper)]
    downloaded = all(
        hub.read_marker(folder, dep.plan.hf_repo, branch) is not None
        for folder, branch in zip(folders, (mix.lower, mix.upper))
    )
    if not downloaded:
        if model_marker(dep) is not None and not force:
            return None
        raise EnvironmentMissing(
            f"the branches {mix.lower} and {mix.upper} are not both downloaded into {dep.models_dir}",
            f"run `deploy fetch-model --out {dep.out_dir}`",
        )
    target = target_bytes(dep, *folders)
    prepared = quant_mix.prepare(
        quant_mix.MixRequest(
            lower=str(folders[0]),
            upper=str(folders[1]),
            target_gib=target / GIB,
            recipe=mix.recipe,
            out=str(dep.model_dir),
            force=force,
        )
    )
    if prepared.recipe is None or prepared.recipe.sha256 != mix.recipe_sha256:
        raise BadInput(
            f"recipe {mix.recipe} is not the one the plan was made with",
            "re-run `deploy plan` / `deploy render`",
        )
    return prepared


def mix_step(
    dep: Deployment, runner: Any, progress: Progress, prepared: Any = None, force: bool = False
) -> Any:
    """Assemble the plan's mix into the model folder (quant.mix.build), or keep the one in place."""
    from ..quant import mix as quant_mix
    from ..quant.recipe import gib

    prepared = prepared or prepare_mix(dep, force)
    if prepared is None:
        progress.note(f"keeping the mix in place at {dep.model_dir} (its branches are not downloaded)")
        return quant_mix.MixOutcome(dep.model_dir, _manifest(dep) or {}, True)
    outcome = quant_mix.build(prepared, runner, progress)
    manifest = outcome.manifest
    progress.note(
        f"mix {'reused' if outcome.reused else 'assembled'} at {outcome.path}: {gib(manifest['actual_bytes'])} GiB "
        f"of VRAM weights ({manifest['actual_bytes']} bytes, target {manifest['target_bytes']}), "
        + ", ".join(f"{n} modules from {sid}" for sid, n in manifest["modules_from"].items())
    )
    return outcome


def _manifest(dep: Deployment) -> dict[str, Any] | None:
    from ..quant.mix import read_manifest

    return read_manifest(dep.model_dir)


def model_marker(dep: Deployment) -> dict[str, Any] | None:
    """The model in place as the later steps need it: {repo, revision, commit, files} (see the docstring)."""
    from ..quant.recipe import GIB
    from . import hub

    mix = dep.plan.mix
    if mix is None:
        return hub.read_marker(dep.model_dir, dep.plan.hf_repo, dep.plan.quant)
    manifest = _manifest(dep)
    if manifest is None or not isinstance(manifest.get("key"), str):
        return None
    sources = manifest.get("sources")
    recipe = manifest.get("recipe")
    if (
        not isinstance(sources, list)
        or [s.get("id") if isinstance(s, dict) else None for s in sources] != [mix.lower, mix.upper]
        or any(s.get("repo") != dep.plan.hf_repo for s in sources)
        or not isinstance(recipe, dict)
        or recipe.get("sha256") != mix.recipe_sha256
        or not isinstance(manifest.get("actual_bytes"), int)
        or manifest["actual_bytes"] > int(mix.target_gib * GIB)
    ):
        return None
    files = {p.name: p.stat().st_size for p in sorted(dep.model_dir.iterdir()) if p.is_file()}
    shards = sum(size for name, size in files.items() if name.endswith(".safetensors"))
    if shards != manifest.get("shard_bytes") or MODEL_MARKER in files:
        return None
    return {"repo": dep.plan.hf_repo, "revision": mix.name, "commit": manifest["key"], "files": files}


def describe(outcome: Any) -> str:
    """One line for `deploy mix-model`."""
    from ..quant.mix import MIX_MANIFEST
    from ..quant.recipe import gib

    manifest = outcome.manifest
    how = "reused" if outcome.reused else "assembled"
    counts = ", ".join(f"{n} from {sid}" for sid, n in (manifest.get("modules_from") or {}).items())
    actual = manifest.get("actual_bytes")
    size = f"{gib(actual)} GiB ({actual} bytes)" if isinstance(actual, int) else "?"
    return (
        f"mix {how}: {outcome.path}: {size} of VRAM weights (target {manifest.get('target_bytes')} bytes); "
        f"modules: {counts}; manifest {Path(outcome.path) / MIX_MANIFEST}"
        + ("; made by the TEST DOUBLE of exllamav3" if manifest.get("test_double") else "")
    )
