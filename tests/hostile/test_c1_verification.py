"""Class 1, no verification bypass: only real log-probabilities count, from the server and from reference files.

A server that does not serve the model must not pass `deploy verify` by reporting numbers that are not a
distribution (0.0 everywhere, +inf, NaN, strings, 1000, a distribution shifted upward, mass summing above 1);
`reference record` refuses to write such numbers; a tampered reference file is bad input. Top-1 agreement comes
from the values, not from the order the entries arrive in.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.conftest import API_KEY
from tests.hostile.servers import HostileTabby


def _shift_to_zero(top: dict[str, float]) -> dict[str, float]:
    """Every value moved up so the top entry is 0.0: all <= 0, but the reported mass is above 1."""
    peak = max(top.values())
    return {key: value - peak for key, value in top.items()}


BENT: dict[str, Any] = {
    "zero everywhere": (lambda top: {key: 0.0 for key in top}, "sum"),
    "plus infinity": (lambda top: {key: float("inf") for key in top}, "finite"),
    "minus infinity": (lambda top: {key: float("-inf") for key in top}, "finite"),
    "NaN": (lambda top: {key: float("nan") for key in top}, "finite"),
    "strings": (lambda top: {key: "high" for key in top}, "not a number"),
    "numeric strings": (lambda top: {key: str(value) for key, value in top.items()}, "not a number"),
    "null": (lambda top: {key: None for key in top}, "not a number"),
    "booleans": (lambda top: {key: True for key in top}, "not a number"),
    "lists": (lambda top: {key: [value] for key, value in top.items()}, "not a number"),
    "1000": (lambda top: {key: 1000 for key in top}, "above 0"),
    "huge integer": (lambda top: {key: 10**400 for key in top}, "above 0"),
    "small positive": (lambda top: {key: 0.05 for key in top}, "above 0"),
    "shifted upward": (_shift_to_zero, "sum"),
    "half each": (lambda top: {key: math.log(0.5) for key in top}, "sum"),
}


def _verify(cli, url: str, key: Path, reference: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    run = cli(
        "verify", "--url", url, "--api-key-file", str(key), "--reference", str(reference), "--json", *extra
    )
    return run.code, json.loads(run.out)


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.mark.parametrize("case", sorted(BENT))
def test_bent_logprobs_fail_the_kl_check_naming_the_position(
    case, cli, sandbox, reference_file, tmp_path
) -> None:
    hook, problem = BENT[case]
    with HostileTabby(tmp_path / "server", API_KEY, logprobs=hook) as server:
        code, report = _verify(cli, server.url, sandbox.key_file, reference_file)
    kl = _check(report, "kl")
    assert code == 5 and not report["passed"] and not kl["passed"], kl
    assert "position" in kl["detail"] and problem in kl["detail"], kl["detail"]


def test_one_bent_position_is_enough_and_is_named(cli, sandbox, reference_file, tmp_path) -> None:
    calls = {"n": 0}

    def third_only(top: dict[str, float]) -> dict[str, float]:
        calls["n"] += 1
        return {key: 0.0 for key in top} if calls["n"] == 3 else top

    with HostileTabby(tmp_path / "server", API_KEY, logprobs=third_only) as server:
        code, report = _verify(cli, server.url, sandbox.key_file, reference_file)
    kl = _check(report, "kl")
    assert code == 5 and not kl["passed"]
    assert "river" in kl["detail"] and "position 3" in kl["detail"], kl["detail"]


@pytest.mark.parametrize("order", ["reversed", "rotated"])
def test_top1_comes_from_the_values_not_the_order(order, cli, sandbox, reference_file, tmp_path) -> None:
    def reorder(top: dict[str, float]) -> dict[str, float]:
        items = list(top.items())
        items = items[::-1] if order == "reversed" else items[1:] + items[:1]
        return dict(items)

    with HostileTabby(tmp_path / "server", API_KEY, logprobs=reorder) as server:
        code, report = _verify(cli, server.url, sandbox.key_file, reference_file)
    assert code == 0, report
    assert report["top1_agreement"] == 1.0 and report["kl"]["mean"] < 1e-9


def test_honest_server_still_passes(cli, sandbox, reference_file, honest_tabby) -> None:
    code, report = _verify(cli, honest_tabby.url, sandbox.key_file, reference_file)
    assert code == 0 and report["passed"] and report["top1_agreement"] == 1.0


@pytest.mark.parametrize("case", ["zero everywhere", "NaN", "strings", "1000", "shifted upward"])
def test_record_refuses_to_write_bent_logprobs(case, cli, sandbox, prompts_file, tmp_path) -> None:
    hook, problem = BENT[case]
    out = sandbox.work / "bent.json"
    with HostileTabby(tmp_path / "server", API_KEY, logprobs=hook) as server:
        run = cli(
            "reference",
            "record",
            "--url",
            server.url,
            "--api-key-file",
            str(sandbox.key_file),
            "--out",
            str(out),
            "--prompts",
            str(prompts_file),
        )
    assert run.code == 5 and "position" in run.err and problem in run.err, run.err
    assert not out.exists() and not list(sandbox.work.iterdir())


def _tampered_reference(reference: Path, folder: Path, change: Any, compress: bool = True) -> Path:
    data = json.loads(gzip.decompress(reference.read_bytes()))
    position = data["prompts"][1]["positions"][2]
    position["top"]["logprobs"] = change(position["top"]["logprobs"])
    text = json.dumps(data, allow_nan=True)
    path = folder / ("tampered.json.gz" if compress else "tampered.json")
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


REFERENCE_BENT: dict[str, Any] = {
    "positive logprob": (lambda values: [0.5] + values[1:], "above 0"),
    "zero everywhere": (lambda values: [0.0 for _ in values], "sum"),
    "NaN": (lambda values: [float("nan")] + values[1:], "finite"),
    "infinity": (lambda values: [float("inf")] + values[1:], "finite"),
    "string": (lambda values: ["-0.5"] + values[1:], "not a number"),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_BENT))
def test_tampered_reference_is_bad_input_naming_the_position(
    case, cli, sandbox, reference_file, honest_tabby
) -> None:
    change, problem = REFERENCE_BENT[case]
    tampered = _tampered_reference(reference_file, sandbox.work, change)
    run = cli(
        "verify",
        "--url",
        honest_tabby.url,
        "--api-key-file",
        str(sandbox.key_file),
        "--reference",
        str(tampered),
    )
    assert run.code == 2 and "prompts[1].positions[2]" in run.err and problem in run.err, run.err
    assert len(run.err.strip().splitlines()) == 1
