"""Fleets: fleet.yaml validation (line and field), node classes, fleet plans, stack rendering, node-config."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from toolkit.cli import main
from toolkit.cluster.fleet import load_fleet
from toolkit.cluster.fleet_plan import CLASS_LABEL, class_name, plan_fleet, require_uniform
from toolkit.cluster.node_config import node_config
from toolkit.cluster.stack import StackOptions, write_stack
from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import BadInput, NoFit
from toolkit.facts.profiles import load_profile
from toolkit.render.dockerfile import start_period_s

PROFILE = load_profile("glm-4.7")


def _fleet(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _detect_json(uuids: list[str], total_mib: int = 143771, free_mib: int = 143000) -> dict:
    return {
        "gpus": [
            {
                "index": i,
                "name": "NVIDIA H200",
                "total_mib": total_mib,
                "free_mib": free_mib - i,
                "used_mib": 0,
                "uuid": uuid,
                "compute_capability": "9.0",
            }
            for i, uuid in enumerate(uuids)
        ],
        "source": "nvml",
        "driver_version": "580.65.06",
        "cuda_driver_version": "13.0",
    }


UNIFORM = """\
name: glm
nodes:
  - name: gpu-a
    gpus: 8x24GiB
  - name: gpu-b
    gpus: 8x24GiB
    labels: {rack: r2}
  - name: big
    gpus: 2xH200
requirements:
  quant: 4bpw_H6
"""


# --- fleet.yaml validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, field",
    [
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\n    colour: red\n", 4, "nodes[0].colour"),
        ("nodes:\n  - name: a\n    gpus: 8x24\n", 3, "nodes[0].gpus"),
        (
            "nodes:\n  - name: a\n    gpus: 8x24GiB\n  - name: 'a; rm -rf /'\n    gpus: 1xH200\n",
            4,
            "nodes[1].name",
        ),
        (
            "nodes:\n  - name: a\n    gpus: 8x24GiB\n    labels: {glm-deploy.class: x}\n",
            4,
            "nodes[0].labels.glm-deploy.class",
        ),
        (
            'nodes:\n  - name: a\n    gpus: 8x24GiB\n    labels: {rack: "r1 --label-add x=y"}\n',
            4,
            "nodes[0].labels.rack",
        ),
        (
            "nodes:\n  - name: a\n    gpus: 8x24GiB\n    replicas: 2\n    url: http://10.0.0.1:5000\n",
            5,
            "nodes[0].url",
        ),
        ("name: Glm_Prod\nnodes:\n  - name: a\n    gpus: 8x24GiB\n", 1, "name"),
        ("image: 'evil image;rm'\nnodes:\n  - name: a\n    gpus: 8x24GiB\n", 1, "image"),
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\nendpoint:\n  port: 70000\n", 5, "endpoint.port"),
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\nendpoint:\n  mode: mesh\n", 5, "endpoint.mode"),
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\nrequirements:\n  cache: k5v4\n", 5, "requirements.cache"),
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\nmodels_dir: relative/models\n", 4, "models_dir"),
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\n  - name: A\n    gpus: 8x24GiB\n", 4, "nodes[1].name"),
        ("nodes: []\n", 1, "nodes"),
        (
            "nodes:\n  - name: a\n    gpus: {gpus: [{index: 0, name: H200, total_mib: 10, free_mib: 20}]}\n",
            3,
            "nodes[0].gpus",
        ),
        (
            (
                "nodes:\n  - name: a\n    gpus: {gpus: [{index: 0, name: H200, total_mib: 10, free_mib: 5, "
                "uuid: 'GPU-1 $(reboot)'}]}\n"
            ),
            3,
            "nodes[0].gpus",
        ),
    ],
)
def test_bad_fleet_names_line_and_field_and_exits_2(tmp_path, capsys, text, line, field):
    path = _fleet(tmp_path, text)
    with pytest.raises(BadInput) as error:
        load_fleet(path)
    assert error.value.message.startswith(f"{path}:{line}: {field}:"), error.value.message
    assert main(["cluster", "plan", "--inventory", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: {field}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text, problem",
    [
        ("nodes:\n  - name: a\n    gpus: 8x24GiB\n    gpus: 1xH200\n", "duplicate key"),
        ("x: &a [1]\nnodes:\n  - name: a\n    gpus: *a\n", "aliases"),
        ("nodes: !!python/object:os.system [ls]\n", "unsupported YAML type"),
        ("nodes:\n  - name: a\n   gpus: [\n", "not valid YAML"),
        ("nodes:\n  - name: a\n    gpus: 2026-01-01\n", "unsupported YAML type"),
    ],
)
def test_unsafe_or_ambiguous_yaml_is_refused(tmp_path, text, problem):
    with pytest.raises(BadInput, match=problem):
        load_fleet(_fleet(tmp_path, text))


def test_missing_inventory_file_is_bad_input(tmp_path, capsys):
    assert main(["cluster", "plan", "--inventory", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read --inventory" in capsys.readouterr().err


def test_gpus_from_detect_json_file_and_inline(tmp_path):
    (tmp_path / "detect").mkdir()
    (tmp_path / "detect" / "n1.json").write_text(json.dumps(_detect_json(["GPU-aaa", "GPU-bbb"])))
    inline = yaml.safe_dump(_detect_json(["GPU-ccc", "GPU-ddd"]), default_flow_style=True).strip()
    fleet = load_fleet(
        _fleet(
            tmp_path, f"nodes:\n  - name: n1\n    gpus: detect/n1.json\n  - name: n2\n    gpus: {inline}\n"
        )
    )
    assert [g.uuid for g in fleet.nodes[0].inventory.gpus] == ["GPU-aaa", "GPU-bbb"]
    assert [g.uuid for g in fleet.nodes[1].inventory.gpus] == ["GPU-ccc", "GPU-ddd"]
    assert fleet.nodes[0].inventory.cuda_driver_version == "13.0"


# --- node classes and the fleet plan ---------------------------------------------------------------------------


def test_identical_gpus_share_a_class_planned_on_the_least_free_memory(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_detect_json(["GPU-a0", "GPU-a1"], free_mib=140000)))
    (tmp_path / "b.json").write_text(json.dumps(_detect_json(["GPU-b0", "GPU-b1"], free_mib=120000)))
    fleet = load_fleet(
        _fleet(
            tmp_path,
            "nodes:\n  - {name: a, gpus: a.json}\n  - {name: b, gpus: b.json}\n"
            "  - {name: c, gpus: 8x24GiB}\n",
        )
    )
    fleet_plan = plan_fleet(fleet, PROFILE)
    assert [c.name for c in fleet_plan.classes] == ["2xnvidia-h200", "8x24gib"]
    h200 = fleet_plan.classes[0]
    assert [n.name for n in h200.nodes] == ["a", "b"]
    assert [g.free_mib for g in h200.inventory.gpus] == [120000, 119999]
    assert all(a.usable_mib <= 119999 for a in h200.plan.per_gpu)


def test_class_name_is_label_safe_and_matches_node_config():
    for spec in ("8x24GiB", "2xH200", "24GiB,24GiB,48GiB", "64x97887MiB"):
        inventory = parse_gpu_spec(spec)
        name = class_name(inventory)
        assert len(name) <= 40 and all(c.isalnum() or c == "-" for c in name), name
        assert node_config(inventory, "node-1")["class"] == name
    assert class_name(parse_gpu_spec("24GiB,24GiB,48GiB")) == "2x24gib-1x48gib"


def test_uniform_fleet_aligns_context_and_passes(tmp_path):
    fleet_plan = plan_fleet(load_fleet(_fleet(tmp_path, UNIFORM)), PROFILE)
    assert not fleet_plan.mixed
    assert {c.plan.quant for c in fleet_plan.classes} == {"4bpw_H6"}
    assert len({c.plan.context for c in fleet_plan.classes}) == 1
    require_uniform(fleet_plan, allow_mixed=False)


def test_mixed_quants_exit_2_with_a_common_quant_unless_allowed(tmp_path, capsys):
    path = _fleet(tmp_path, UNIFORM.replace("requirements:\n  quant: 4bpw_H6\n", ""))
    fleet_plan = plan_fleet(load_fleet(path), PROFILE)
    assert fleet_plan.mixed
    # The suggestion really fits every class.
    fixed = plan_fleet(
        load_fleet(_fleet(tmp_path, UNIFORM.replace("4bpw_H6", fleet_plan.suggested_quant), "f2.yaml")),
        PROFILE,
    )
    assert not fixed.mixed
    assert main(["cluster", "plan", "--inventory", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"requirements.quant: {fleet_plan.suggested_quant}" in captured.err
    for node in ("gpu-a", "gpu-b", "big"):
        assert node in captured.out
    assert main(["cluster", "plan", "--inventory", str(path), "--allow-mixed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mixed"] is True and {n["name"] for n in data["nodes"]} == {"gpu-a", "gpu-b", "big"}
    assert all(n["expected_kl"] > 0 for n in data["nodes"])
    assert main(["cluster", "render", "--inventory", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_class_that_fits_nothing_exits_3_naming_it(tmp_path, capsys):
    path = _fleet(tmp_path, "nodes:\n  - {name: small, gpus: 1x24GiB}\n  - {name: big, gpus: 2xH200}\n")
    with pytest.raises(NoFit, match="node class 1x24gib \\(small\\)"):
        plan_fleet(load_fleet(path), PROFILE)
    assert main(["cluster", "plan", "--inventory", str(path)]) == 3


# --- stack rendering -------------------------------------------------------------------------------------------


def _walk(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    else:
        yield value


def test_stack_per_class_services_generic_resources_configs_secret_and_updates(tmp_path, capsys):
    fleet_path = _fleet(tmp_path, UNIFORM)
    out = tmp_path / "out"
    assert main(["cluster", "render", "--inventory", str(fleet_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    fleet_plan = plan_fleet(load_fleet(fleet_path), PROFILE)
    stack = yaml.safe_load((out / "stack.yml").read_text())
    assert "devices" not in list(_walk(stack))  # Swarm rejects compose device reservations
    for node_class in fleet_plan.classes:
        service = stack["services"][node_class.service]
        deploy = service["deploy"]
        assert deploy["replicas"] == len(node_class.nodes)
        assert deploy["placement"]["constraints"] == [f"node.labels.{CLASS_LABEL} == {node_class.name}"]
        assert deploy["resources"]["reservations"]["generic_resources"] == [
            {"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": len(node_class.plan.per_gpu)}}
        ]
        update = deploy["update_config"]
        assert (update["parallelism"], update["order"], update["failure_action"]) == (
            1,
            "start-first",
            "rollback",
        )
        assert service["healthcheck"]["start_period"] == f"{start_period_s(node_class.plan.weights_gib)}s"
        # the image's "can serve" probe, not /health (503 for good after one failed generation)
        assert service["healthcheck"]["test"][:3] == [
            "CMD",
            "python3",
            "/usr/local/lib/glm-deploy/healthcheck.py",
        ]
        config = service["configs"][0]
        assert config["target"] == "/app/config.yml"
        config_file = out / stack["configs"][config["source"]]["file"]
        served = yaml.safe_load(config_file.read_text())["model"]
        assert (served["model_name"], served["max_seq_len"], served["cache_mode"]) == (
            node_class.plan.quant,
            node_class.plan.context,
            node_class.plan.cache_mode,
        )
        assert service["secrets"] == [
            {
                "source": "api_tokens",
                "target": "/app/api_tokens.yml",
                "uid": "10001",
                "gid": "10001",
                "mode": 0o400,
            }
        ]
        assert (out / "classes" / node_class.name / "Dockerfile").is_file()
        for node in node_class.nodes:
            compose = yaml.safe_load((out / "hosts" / node.name / "compose.yaml").read_text())
            assert compose["services"]["tabbyapi"]["ports"][0]["host_ip"].endswith("127.0.0.1}")
            assert any(
                line.strip().startswith(f"docker node update --label-add {CLASS_LABEL}={node_class.name} ")
                and line.endswith(f" {node.name}")
                for line in printed.splitlines()
            )
    assert "--label-add rack=r2 gpu-b" in printed
    gateway = stack["services"]["gateway"]
    assert gateway["ports"] == [{"target": 5000, "published": 5000, "protocol": "tcp", "mode": "host"}]
    haproxy = (out / "gateway" / "haproxy.cfg").read_text()
    for node_class in fleet_plan.classes:
        assert f"tasks.glm_{node_class.service}:5000" in haproxy
    # the gateway checks ports, never /health: one failed request must not take a replica out of rotation
    settings = "\n".join(line for line in haproxy.splitlines() if not line.strip().startswith("#"))
    assert "httpchk" not in settings and "http-check" not in settings and "/health" not in settings
    assert "default-server check " in settings and "observe layer4" in settings and "layer7" not in settings
    # One key for the whole endpoint: 0600 everywhere, never printed, never inside another file.
    key = yaml.safe_load((out / "api_tokens.yml").read_text())["api_key"]
    assert stack["secrets"]["api_tokens"]["file"] == "./api_tokens.yml"
    assert key not in printed
    for path in out.rglob("*"):
        if path.is_file():
            if path.name == "api_tokens.yml":
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert yaml.safe_load(path.read_text())["api_key"] == key
            else:
                assert key not in path.read_text(), path


def test_rerender_keeps_the_key_and_changes_only_the_changed_config(tmp_path):
    fleet_path = _fleet(tmp_path, UNIFORM)
    out = tmp_path / "out"
    fleet_plan = plan_fleet(load_fleet(fleet_path), PROFILE)
    write_stack(fleet_plan, out)
    first = yaml.safe_load((out / "stack.yml").read_text())
    key = (out / "api_tokens.yml").read_text()
    fleet_path.write_text(UNIFORM + "  context: 65536\n")
    write_stack(plan_fleet(load_fleet(fleet_path), PROFILE), out)
    second = yaml.safe_load((out / "stack.yml").read_text())
    assert (out / "api_tokens.yml").read_text() == key
    assert second["secrets"] == first["secrets"]
    assert all(
        second["configs"][k]["name"] != first["configs"][k]["name"]
        for k in first["configs"]
        if k != "gateway"
    )
    assert second["configs"]["gateway"] == first["configs"]["gateway"]


def test_render_refuses_a_foreign_folder_and_removes_gone_hosts(tmp_path):
    fleet_path = _fleet(tmp_path, UNIFORM)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="other files"):
        write_stack(plan_fleet(load_fleet(fleet_path), PROFILE), foreign)
    out = tmp_path / "out"
    write_stack(plan_fleet(load_fleet(fleet_path), PROFILE), out)
    fleet_path.write_text(UNIFORM.replace("  - name: big\n    gpus: 2xH200\n", ""))
    write_stack(plan_fleet(load_fleet(fleet_path), PROFILE), out)
    assert sorted(p.name for p in (out / "hosts").iterdir()) == ["gpu-a", "gpu-b"]
    assert sorted(p.name for p in (out / "classes").iterdir()) == ["8x24gib"]


def test_ingress_endpoint_mode_uses_the_routing_mesh(tmp_path):
    fleet_plan = plan_fleet(
        load_fleet(_fleet(tmp_path, UNIFORM + "endpoint: {port: 8080, mode: ingress}\n")), PROFILE
    )
    write_stack(fleet_plan, tmp_path / "out", StackOptions(image="registry.local/tabby:1"))
    stack = yaml.safe_load((tmp_path / "out" / "stack.yml").read_text())
    assert stack["services"]["gateway"]["ports"][0] == {
        "target": 5000,
        "published": 8080,
        "protocol": "tcp",
        "mode": "ingress",
    }
    assert stack["services"]["gateway"]["deploy"]["update_config"]["order"] == "start-first"
    assert {s["image"] for n, s in stack["services"].items() if n != "gateway"} == {"registry.local/tabby:1"}


# --- node-config -----------------------------------------------------------------------------------------------


def test_node_config_advertises_uuids_from_a_detect_file(tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps(_detect_json(["GPU-11111111-2222", "GPU-33333333-4444"])))
    assert main(["node-config", "--detect-json", str(tmp_path / "d.json"), "--node", "gpu-a", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["daemon_json"]["node-generic-resources"] == [
        "NVIDIA-GPU=GPU-11111111-2222",
        "NVIDIA-GPU=GPU-33333333-4444",
    ]
    assert data["daemon_json"]["default-runtime"] == "nvidia"
    assert data["nvidia_container_runtime"]["swarm-resource"] == "DOCKER_RESOURCE_NVIDIA-GPU"
    assert data["label_commands"] == [f"docker node update --label-add {CLASS_LABEL}=2xnvidia-h200 gpu-a"]


def test_node_config_without_nvml_exits_4_and_rejects_bad_names(tmp_path, capsys, monkeypatch):
    import toolkit.detect.nvml

    def no_driver():
        from toolkit.errors import EnvironmentMissing

        raise EnvironmentMissing("no NVIDIA driver found")

    monkeypatch.setattr(toolkit.detect.nvml, "detect_nvml", no_driver)
    monkeypatch.setattr("toolkit.detect.inventory.detect_nvml", no_driver, raising=False)
    assert main(["node-config"]) == 4
    assert main(["node-config", "--gpus", "2xH200", "--node", "x;reboot"]) == 2
    assert main(["node-config", "--gpus", "2xH200", "--node", "gpu-b"]) == 0
    assert "NVIDIA-GPU=1" in capsys.readouterr().out


# --- cluster verify against in-process test servers (fleet urls, no engine) ------------------------------------


def test_cluster_verify_checks_every_replica_and_the_endpoint(tmp_path, capsys, monkeypatch):
    from tests.tabby_test_server import testing

    monkeypatch.setattr("toolkit.cli.cluster._engine_or_none", lambda: None)
    fleet_text = (
        "nodes:\n  - {name: a, gpus: 1x400GiB, url: URL_A}\n  - {name: b, gpus: 1x400GiB, url: URL_B}\n"
    )
    fleet_plan = plan_fleet(
        load_fleet(
            _fleet(
                tmp_path,
                fleet_text.replace("URL_A", "http://127.0.0.1:1").replace("URL_B", "http://127.0.0.1:2"),
            )
        ),
        PROFILE,
    )
    plan = fleet_plan.classes[0].plan
    model = {
        "model_name": plan.quant,
        "max_seq_len": plan.context,
        "cache_size": plan.cache_size,
        "cache_mode": plan.cache_mode,
        "reasoning": True,
    }
    servers = []
    try:
        for name, context in (("a", plan.context), ("b", plan.context), ("wrong", 4096)):
            (tmp_path / name).mkdir()
            servers.append(
                testing.start(
                    tmp_path / name, model={**model, "max_seq_len": context}, test_server={"bits": 8}
                )
            )
        a, b, wrong = servers
        path = _fleet(tmp_path, fleet_text.replace("URL_A", a.url).replace("URL_B", b.url))
        key_file = tmp_path / "key"
        key_file.write_text(a.api_key)
        junit = tmp_path / "junit.xml"
        assert (
            main(
                [
                    "cluster",
                    "verify",
                    "--inventory",
                    str(path),
                    "--url",
                    b.url,
                    "--api-key-file",
                    str(key_file),
                    "--json",
                    "--junit",
                    str(junit),
                ]
            )
            == 0
        )
        data = json.loads(capsys.readouterr().out)
        assert data["passed"] and [t["kind"] for t in data["targets"]] == ["replica", "replica", "endpoint"]
        import xml.etree.ElementTree as ET

        names = [suite.get("name") for suite in ET.parse(junit).getroot().findall("testsuite")]
        assert len(names) == 5 and any(n.startswith("deploy cluster verify consistency") for n in names)
        assert data["consistency"][0]["passed"] and data["consistency"][0]["replicas"] == ["a", "b"]
        bad = _fleet(tmp_path, fleet_text.replace("URL_A", a.url).replace("URL_B", wrong.url), "bad.yaml")
        assert (
            main(
                [
                    "cluster",
                    "verify",
                    "--inventory",
                    str(bad),
                    "--no-endpoint",
                    "--api-key-file",
                    str(key_file),
                ]
            )
            == 5
        )
        out = capsys.readouterr().out
        assert f"FAIL replica b {wrong.url}" in out and a.api_key not in out
    finally:
        for server in servers:
            server.stop()


def test_cluster_verify_without_key_or_engine_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("toolkit.cli.cluster._engine_or_none", lambda: None)
    monkeypatch.delenv("DEPLOY_API_KEY", raising=False)
    path = _fleet(tmp_path, "nodes:\n  - {name: a, gpus: 1x400GiB}\n")
    assert main(["cluster", "verify", "--inventory", str(path)]) == 2
    monkeypatch.setenv("DEPLOY_API_KEY", "k" * 32)
    assert main(["cluster", "verify", "--inventory", str(path)]) == 4
    assert os.environ["DEPLOY_API_KEY"] not in capsys.readouterr().err


def test_cluster_verify_names_the_replica_whose_distributions_disagree(tmp_path, capsys, monkeypatch):
    """Three replicas of one class, all reporting the planned model, cache mode and context; one computes with
    other weights (4 instead of 8 bits). Only the replicas' comparison with each other can name it."""
    import xml.etree.ElementTree as ET

    from tests.tabby_test_server import testing

    monkeypatch.setattr("toolkit.cli.cluster._engine_or_none", lambda: None)
    nodes = ("a", "b", "c")
    text = "nodes:\n" + "".join(f"  - {{name: {n}, gpus: 1x400GiB, url: URL_{n}}}\n" for n in nodes)
    placeholder = text
    for name in nodes:
        placeholder = placeholder.replace(f"URL_{name}", "http://127.0.0.1:1")
    plan = plan_fleet(load_fleet(_fleet(tmp_path, placeholder)), PROFILE)
    node_class = plan.classes[0]
    model = {
        "model_name": node_class.plan.quant,
        "max_seq_len": node_class.plan.context,
        "cache_size": node_class.plan.cache_size,
        "cache_mode": node_class.plan.cache_mode,
        "reasoning": True,
    }
    servers = {}
    try:
        for name, bits in (("a", 8), ("b", 8), ("c", 4)):
            (tmp_path / name).mkdir()
            servers[name] = testing.start(tmp_path / name, model=model, test_server={"bits": bits})
        fleet = text
        for name, server in servers.items():
            fleet = fleet.replace(f"URL_{name}", server.url)
        key_file = tmp_path / "key"
        key_file.write_text(servers["a"].api_key)
        junit = tmp_path / "junit.xml"
        args = [
            "cluster",
            "verify",
            "--inventory",
            str(_fleet(tmp_path, fleet, "three.yaml")),
            "--no-endpoint",
        ]
        code = main([*args, "--api-key-file", str(key_file), "--json", "--junit", str(junit)])
        data = json.loads(capsys.readouterr().out)
        assert code == 5 and not data["passed"]
        assert all(t["report"]["passed"] for t in data["targets"])  # each replica alone looks right
        (result,) = data["consistency"]
        assert result["class"] == node_class.name and list(result["named"]) == ["c"]
        assert "disagrees with the 2 agreeing replicas" in result["named"]["c"]
        pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
        assert pairs[("a", "b")]["agree"] and pairs[("a", "b")]["mean_kl"] == pytest.approx(0.0, abs=1e-12)
        assert pairs[("a", "b")]["positions"] == 159
        assert pairs[("a", "c")]["mean_kl"] > result["bound"] and not pairs[("b", "c")]["agree"]
        suite = next(
            s for s in ET.parse(junit).getroot() if s.get("name").endswith(f"consistency {node_class.name}")
        )
        failed = [case.get("name") for case in suite if case.find("failure") is not None]
        assert failed == ["c"] and suite.get("tests") == "3"

        assert main([*args, "--api-key-file", str(key_file), "--no-consistency"]) == 0
        capsys.readouterr()
        two = fleet.replace(f"  - {{name: c, gpus: 1x400GiB, url: {servers['c'].url}}}\n", "")
        two_args = [
            "cluster",
            "verify",
            "--inventory",
            str(_fleet(tmp_path, two, "two.yaml")),
            "--no-endpoint",
        ]
        assert main([*two_args, "--api-key-file", str(key_file)]) == 0
        assert "PASS consistency class" in capsys.readouterr().out
    finally:
        for server in servers.values():
            server.stop()


def test_two_disagreeing_replicas_are_both_named():
    """No majority: neither can be trusted over the other."""
    from toolkit.cluster.consistency import ReplicaSample, compare

    one = ReplicaSample("x", "http://x", "probe", ([("a", -0.1), ("b", -2.4)],))
    other = ReplicaSample("y", "http://y", "probe", ([("b", -0.1), ("a", -2.4)],))
    result = compare("k", [one, other], bound=0.01, source="test")
    assert not result.passed and set(result.named) == {"x", "y"} and "no majority" in result.named["x"]
    down = ReplicaSample("z", "http://z", None, (), error="cannot reach http://z")
    assert compare("k", [one, one.__class__("w", "http://w", "probe", one.positions), down], 0.01, "t").passed
    other_tokenizer = ReplicaSample("t", "http://t", "another", one.positions)
    named = compare(
        "k", [one, ReplicaSample("w", "http://w", "probe", one.positions), other_tokenizer], 0.01, "t"
    )
    assert list(named.named) == ["t"] and "tokenizer" in named.named["t"]
