"""`deploy quant mix` on the host: everything refused before work, the disk, the assembly through a runner (here a
local Python with the exllamav3 TEST DOUBLE), the module-by-module check, the manifest, staging and reuse."""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

import pytest

from toolkit import disk
from toolkit.cli.quant_mix import shortfall_note
from toolkit.errors import BadInput, EnvironmentMissing, VerificationFailed
from toolkit.facts.layout import MODEL_MARKER
from toolkit.output import Progress
from toolkit.quant import mix
from toolkit.quant.recipe import load_recipe, plan_mix
from toolkit.quant.storage import read_storage

from .exl3_folders import drop_tensor, read_tensor

GIB = 2**30


def _request(lower: Path, upper: Path, out: Path, target: int, **kwargs) -> mix.MixRequest:
    return mix.MixRequest(lower=str(lower), upper=str(upper), target_gib=target / GIB, out=str(out), **kwargs)


def _middle(lower: Path, upper: Path) -> int:
    return (read_storage(lower).vram_bytes + read_storage(upper).vram_bytes) // 2


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(mix.STAGING_PREFIX)]


def test_a_mix_is_assembled_checked_and_described_module_by_module(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix-3bpw"
    target = _middle(lower, upper)
    outcome = mix.build(mix.prepare(_request(lower, upper, out, target)), double, Progress(quiet=True))
    assert not outcome.reused and outcome.path == out and not _leftovers(out.parent)
    plan = plan_mix([("2bpw", read_storage(lower)), ("4bpw", read_storage(upper))], target, load_recipe(None))
    manifest = json.loads((out / mix.MIX_MANIFEST).read_text())
    assert (
        manifest == outcome.manifest and manifest["format"] == mix.FORMAT and manifest["method"] == "recipe"
    )
    assert manifest["recipe"]["name"] == "card" and manifest["recipe"]["sha256"] == load_recipe(None).sha256
    assert [s["id"] for s in manifest["sources"]] == ["2bpw", "4bpw"]
    assert manifest["sources"][1] | {"path": None} == {
        "id": "4bpw",
        "path": None,
        "repo": "owner/GLM-Tiny-EXL3",
        "branch": "4bpw",
        "commit": "4" * 40,
        "codebook": "mcg",
        "bits": 4.0,
        "head_bits": 6.0,
        "vram_bytes": read_storage(upper).vram_bytes,
        "quantization_config_sha256": manifest["sources"][1]["quantization_config_sha256"],
    }
    result = read_storage(out)
    assert (
        manifest["predicted_bytes"] == plan.predicted_bytes == manifest["actual_bytes"] == result.vram_bytes
    )
    assert manifest["target_bytes"] == target >= result.vram_bytes
    assert manifest["modules"] == {k: plan.source_of(k) for k in result.modules}
    assert manifest["modules_from"] == {
        "2bpw": len(result.modules) - len(plan.overrides),
        "4bpw": len(plan.overrides),
    }
    assert manifest["test_double"] and manifest["versions"]["exllamav3"].endswith("+testdouble")
    shards = sorted(out.glob("*.safetensors"))
    assert manifest["shards"] == len(shards) and manifest["shard_bytes"] == sum(
        p.stat().st_size for p in shards
    )
    # The tensors themselves come from the planned source, byte for byte.
    for key, source in manifest["modules"].items():
        for name in result.modules[key].shapes:
            assert read_tensor(out, name) == read_tensor(lower if source == "2bpw" else upper, name), name
    # A model folder TabbyAPI loads: the base's other files, a config naming the new bits; not the base's marker.
    assert (out / "tokenizer.json").read_text() == (lower / "tokenizer.json").read_text()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == manifest["bits"]
    assert not (out / MODEL_MARKER).exists()


def test_the_same_mix_is_reused_and_force_assembles_it_again(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    request = _request(lower, upper, out, _middle(lower, upper))
    first = mix.build(mix.prepare(request), double, Progress(quiet=True))
    again = mix.build(mix.prepare(request), double, Progress(quiet=True))
    assert again.reused and again.manifest["created"] == first.manifest["created"]
    forced = mix.build(
        mix.prepare(mix.MixRequest(**{**request.__dict__, "force": True})), double, Progress(True)
    )
    assert not forced.reused and forced.manifest["key"] == first.manifest["key"]
    other = _request(lower, upper, out, _middle(lower, upper) + 4096)  # another target replaces our own mix
    replaced = mix.build(mix.prepare(other), double, Progress(quiet=True))
    assert not replaced.reused and replaced.manifest["target_bytes"] != first.manifest["target_bytes"]
    assert not _leftovers(out.parent)


def test_a_failing_assembly_leaves_no_staging_and_the_previous_mix_untouched(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    before = mix.build(
        mix.prepare(_request(lower, upper, out, _middle(lower, upper))), double, Progress(True)
    )
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    prepared = mix.prepare(_request(lower, upper, out, _middle(lower, upper) + 8192))
    drop_tensor(upper, "model.layers.0.self_attn.q_proj.trellis")
    with pytest.raises(EnvironmentMissing) as caught:
        mix.build(prepared, double, Progress(quiet=True))
    line = caught.value.line()
    assert "Required tensor model.layers.0.self_attn.q_proj.trellis not found" in line and "\n" not in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files and before.path == out
    assert not _leftovers(out.parent)


def test_a_result_that_differs_from_the_plan_is_exit_5_and_not_kept(quant, double, tmp_path, monkeypatch):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    prepared = mix.prepare(_request(lower, upper, out, _middle(lower, upper)))
    planned = prepared.plan.overrides
    job = mix._job

    def one_module_from_the_wrong_source(prepared, sources, staging):
        made = job(prepared, sources, staging)
        made["overrides"] = dict(list(planned.items())[1:])  # the assembly leaves one module at the base
        return made

    monkeypatch.setattr(mix, "_job", one_module_from_the_wrong_source)
    with pytest.raises(VerificationFailed) as caught:
        mix.build(prepared, double, Progress(quiet=True))
    assert caught.value.exit_code == 5 and next(iter(planned)) in caught.value.line()
    assert "4bpw's" in caught.value.line() and not out.exists() and not _leftovers(out.parent)


def _cases(quant, tmp_path) -> dict[str, tuple[mix.MixRequest, str]]:
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    target = _middle(lower, upper)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    empty = tmp_path / "plain"
    empty.mkdir()
    (upper / "model-00002-of-00002.safetensors").rename(tmp_path / "aside.safetensors")
    return {
        "no folder": (_request(tmp_path / "none", lower, out, target), "--lower"),
        "no settings": (_request(lower, empty, out, target), "quantization_config.json"),
        "missing shard": (
            _request(lower, upper, out, target),
            "is listed in quantization_config.json but in no",
        ),
    }


def test_sources_that_are_not_complete_quants_are_refused_before_any_work(quant, tmp_path):
    for request, said in _cases(quant, tmp_path).values():
        with pytest.raises(BadInput) as caught:
            mix.prepare(request)
        assert said in caught.value.line() and "\n" not in caught.value.line()
    assert not (tmp_path / "models" / "mix").exists()


def test_order_target_and_out_are_checked_before_any_work(quant, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    target = _middle(lower, upper)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cases = [
        (_request(upper, lower, out, target), "--lower 4bpw"),
        (_request(lower, upper, busy, target), "exists and is not a mix made by `deploy quant mix`"),
        (_request(lower, upper, lower / "inner", target), "overlaps the source"),
        (_request(lower, upper, out, read_storage(lower).vram_bytes - 1), "is outside what 2bpw + 4bpw make"),
        (mix.MixRequest(lower=str(lower), upper=str(upper), out=str(out)), "--target-gib or --target-bpw"),
        (_request(lower, upper, out, target, measurement="m.json", recipe="card"), "exclude each other"),
        (_request(lower, lower, out, target), "is given twice"),
    ]
    for request, said in cases:
        with pytest.raises(BadInput) as caught:
            mix.prepare(request)
        assert said in caught.value.line(), caught.value.line()
    assert (busy / "notes.txt").read_text() == "mine" and not out.exists()


def test_a_target_in_bits_per_weight_is_exllamav3s_layer_bpw(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    request = mix.MixRequest(lower=str(lower), upper=str(upper), target_bpw=3.0, out=str(out))
    outcome = mix.build(mix.prepare(request), double, Progress(quiet=True))
    bits, numel = mix.linear_bits(read_storage(out))
    assert bits / numel <= 3.0 and outcome.manifest["bits"] == round(bits / numel, 2)


def test_not_enough_disk_is_exit_4_before_anything_is_written(quant, tmp_path, monkeypatch):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    prepared = mix.prepare(_request(lower, upper, out, _middle(lower, upper)))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mix.shutil, "disk_usage", lambda _: usage(10 * GIB, 10 * GIB - 2 * GIB, 2 * GIB))
    with pytest.raises(EnvironmentMissing) as caught:
        mix.prepare(_request(lower, upper, out, _middle(lower, upper)))
    need = prepared.disk_bytes + disk.margin_bytes(prepared.disk_bytes)
    assert caught.value.exit_code == 4 and f"the mix needs {need / GIB:.3f} GiB" in caught.value.line()
    assert not out.exists() and not _leftovers(out.parent)


def test_the_disk_estimate_covers_what_the_mix_writes(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    prepared = mix.prepare(_request(lower, upper, out, _middle(lower, upper)))
    mix.build(prepared, double, Progress(quiet=True))
    written = sum(p.stat().st_size for p in out.iterdir())
    assert written <= prepared.disk_bytes


def _measurement(
    lower: Path, upper: Path, path: Path, *, off_by: int = 0, flat: frozenset[str] = frozenset()
) -> Path:
    """A measurement like exllamav3's measure step writes: per layer, attention and the MLP as groups, each with
    its KL change and exact bit change from the higher quant."""
    base, alt = read_storage(lower), read_storage(upper)
    groups = {}
    for key, module in base.modules.items():
        if module.bits is not None and module.layer is not None:
            kind = "attn" if module.group == "attention" else module.group
            groups.setdefault((module.layer, kind), []).append(key)
    document = {
        "base": {"dir": str(lower)},
        "alts": [{"dir": str(upper)}],
        "base_kld": 0.25,
        "groups": [
            {
                "layers": keys,
                "candidates": [
                    {
                        "dkld": 0.0 if kind in flat else -0.01 * (i + 1) * (3 if kind == "attn" else 1),
                        "dbits": 8 * sum(alt.modules[k].n_bytes - base.modules[k].n_bytes for k in keys)
                        + off_by,
                    }
                ],
            }
            for i, ((_layer, kind), keys) in enumerate(sorted(groups.items()))
        ],
    }
    path.write_text(json.dumps(document))
    return path


def test_a_measurement_of_these_sources_drives_exllamav3s_optimizer(quant, double, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    out = tmp_path / "models" / "mix"
    measured = _measurement(lower, upper, tmp_path / "m.json")
    target = _middle(lower, upper)
    outcome = mix.build(
        mix.prepare(_request(lower, upper, out, target, measurement=str(measured))), double, Progress(True)
    )
    manifest = outcome.manifest
    assert manifest["method"] == "measurement" and manifest["recipe"] is None
    assert manifest["measurement"]["path"] == str(measured)
    assert read_storage(lower).vram_bytes < manifest["actual_bytes"] == manifest["predicted_bytes"] <= target
    chosen = {k for k, v in manifest["modules"].items() if v == "4bpw"}
    groups = json.loads(measured.read_text())["groups"]
    assert chosen and all(set(g["layers"]) <= chosen or not set(g["layers"]) & chosen for g in groups)


def test_a_measurement_of_other_quants_is_refused(quant, tmp_path):
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    measured = _measurement(lower, upper, tmp_path / "m.json", off_by=16)
    request = _request(lower, upper, tmp_path / "out", _middle(lower, upper), measurement=str(measured))
    with pytest.raises(BadInput, match="was made from other quants"):
        mix.prepare(request)


def test_python_must_be_an_executable(tmp_path):
    with pytest.raises(BadInput, match="is not an executable file"):
        mix.PythonRunner(str(tmp_path / "python"))
    assert os.access(mix.PythonRunner("/bin/sh").python, os.X_OK)


def test_an_optimizer_that_finds_no_gain_in_the_routed_experts_stops_short_and_says_so(
    quant, double, tmp_path
):
    """exllamav3 1.6.5's measure step wrote dkld 0.0 for every routed-expert group (benchmarks/quant_mix/run-1/
    measurement.json): its greedy never takes them, so the mix stays far below the target."""
    lower, upper = quant("2bpw", 2), quant("4bpw", 4)
    routed = frozenset({"routed_gate_up", "routed_down"})
    measured = _measurement(lower, upper, tmp_path / "m.json", flat=routed)
    target = read_storage(upper).vram_bytes  # everything from the higher source fits
    request = _request(lower, upper, tmp_path / "models" / "mix", target, measurement=str(measured))
    manifest = mix.build(mix.prepare(request), double, Progress(True)).manifest
    assert manifest["measurement"]["modules_without_measured_gain"] > 0
    taken = {k for k, v in manifest["modules"].items() if v == "4bpw"}
    assert taken and not any(read_storage(lower).modules[k].group in routed for k in taken)
    note = shortfall_note(manifest)
    assert note and "below the target" in note and "--recipe card" in note
    recipe = mix.build(
        mix.prepare(_request(lower, upper, tmp_path / "models" / "r", target)), double, Progress(True)
    )
    assert shortfall_note(recipe.manifest) is None  # the recipe fills the target
