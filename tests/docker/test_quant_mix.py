"""`deploy quant mix --image`: the assembly in a built image through the real Docker engine.

The image is the test base with the exllamav3 TEST DOUBLE (tests/exllamav3_double): the CPU machine cannot build
exllamav3's CUDA extension. What is real: the engine, the one-off container (no network, non-root, sources and
toolkit read-only, only the staging folder writable), the entry point mounted from this checkout, the staging and
rename, the module-by-module check and the cleanup after a failure.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.exllamav3_double.image import build_double_image
from tests.unit.quant.cli_wiring import deploy_with_quant
from tests.unit.quant.exl3_folders import drop_tensor, make_quant, read_tensor
from toolkit.deploy import engine, mix_image
from toolkit.errors import EnvironmentMissing
from toolkit.output import Progress
from toolkit.quant import mix
from toolkit.quant.storage import read_storage

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def double_image(docker_client, test_base_image) -> Iterator[str]:
    tag = f"glm-deploy-test-mix-double:{uuid.uuid4().hex[:12]}"
    build_double_image(docker_client, tag, test_base_image)
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.fixture()
def sources(tmp_path) -> tuple[Path, Path]:
    return (
        make_quant(tmp_path / "models" / "2bpw", 2, marker=("owner/GLM-Tiny-EXL3", "2bpw", "c" * 40)),
        make_quant(tmp_path / "models" / "4bpw", 4, marker=("owner/GLM-Tiny-EXL3", "4bpw", "d" * 40)),
    )


@pytest.fixture()
def tasks(monkeypatch) -> list[engine.TaskSpec]:
    """The one-off containers the runner asks the engine for (then run for real)."""
    seen: list[engine.TaskSpec] = []
    real = engine.run_task

    def recorded(client, spec, *args, **kwargs):
        seen.append(spec)
        return real(client, spec, *args, **kwargs)

    monkeypatch.setattr(engine, "run_task", recorded)
    return seen


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _ours(docker_client) -> list:
    return docker_client.containers.list(all=True, filters={"label": "io.glm-deploy.role=mix"})


def test_the_mix_is_assembled_in_the_image_and_put_in_place(
    docker_client, double_image, sources, tasks, tmp_path, monkeypatch, capsys
):
    lower, upper = sources
    before = {s: _snapshot(s) for s in sources}
    out = tmp_path / "models" / "mix-3bpw"
    target = (read_storage(lower).vram_bytes + read_storage(upper).vram_bytes) // 2
    deploy = deploy_with_quant(monkeypatch)
    argv = ["quant", "mix", "--lower", str(lower), "--upper", str(upper), "--out", str(out)]
    code = deploy([*argv, "--target-gib", str(target / 2**30), "--image", double_image, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["runner"] == {
        "kind": "image",
        "image": double_image,
        "image_id": docker_client.images.get(double_image).id,
    }
    assert result["test_double"] and "TEST DOUBLE" in captured.err
    manifest = json.loads((out / mix.MIX_MANIFEST).read_text())
    stored = read_storage(out)
    assert manifest["actual_bytes"] == manifest["predicted_bytes"] == stored.vram_bytes <= target
    for key, source in manifest["modules"].items():
        name = next(iter(stored.modules[key].shapes))
        assert read_tensor(out, name) == read_tensor(lower if source == "2bpw" else upper, name)
    # The container: no GPU asked for, a non-root user, sources and the toolkit read-only, staging writable.
    (task,) = tasks
    assert task.gpu_device_ids is None and task.user not in (None, "0", "root", "0:0")
    writable = [m for m in task.mounts if not m.read_only]
    assert [m.target for m in writable] == [mix_image.STAGING_DIR]
    assert {m.source for m in task.mounts if m.read_only} == {
        str(lower),
        str(upper),
        str(mix_image.PACKAGE_DIR),
    }
    # Afterwards: the caller owns the result, the sources are as they were, no container or staging is left.
    assert {p.stat().st_uid for p in out.iterdir()} == {os.getuid()}
    assert {s: _snapshot(s) for s in sources} == before
    assert not _ours(docker_client) and not list(out.parent.glob(".mix-*"))


def test_a_failure_in_the_image_leaves_nothing_behind(docker_client, double_image, sources, tmp_path, capsys):
    lower, upper = sources
    out = tmp_path / "models" / "mix"
    target = (read_storage(lower).vram_bytes + read_storage(upper).vram_bytes) // 2
    prepared = mix.prepare(mix.MixRequest(str(lower), str(upper), target_gib=target / 2**30, out=str(out)))
    drop_tensor(upper, "model.layers.0.self_attn.q_proj.trellis")  # the source changed after the checks
    runner = mix_image.ImageRunner(engine.connect(), double_image)
    with pytest.raises(EnvironmentMissing) as caught:
        mix.build(prepared, runner, Progress(quiet=True))
    assert "Required tensor model.layers.0.self_attn.q_proj.trellis not found" in caught.value.line()
    assert not out.exists() and not list(out.parent.glob(".mix-*")) and not _ours(docker_client)
