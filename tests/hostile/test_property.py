"""The whole CLI under random command lines: every subcommand, flags and values drawn from a grammar that mixes
valid values with hostile ones (empty, newline-terminated, NaN/inf, 5000-digit numbers, markup, traversal paths,
URL credentials, NUL bytes, non-ASCII).

For every command line: the exit code is one of 0, 2, 3, 4, 5; no traceback; neither canary (API key, HF token)
appears in any output or any file; nothing changes in the sandbox outside the folders the command was given.
Docker and the hub are unreachable and there is no NVIDIA driver, so nothing leaves the machine.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import API_KEY, assert_contained, files_holding, snapshot

EXAMPLES = 300
QUANT_FIXTURE = Path(__file__).resolve().parents[1] / "unit" / "quant" / "fixtures" / "tiny-2bpw"

HOSTILE = [
    "",
    "\n",
    "x\n",
    " ",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e400",
    "9" * 5000,
    "[red]x[/red]",
    "../../x",
    "/etc/passwd",
    "é",
    "x\x00y",
    "%s%n",
    "$(id)",
    "`id`",
    "a;b",
    "--json",
    "-",
]
GPUS = [
    "2xH200",
    "8x24GiB",
    "1xH200",
    "4xRTX5090",
    "24GiB,48GiB",
    "8x24",
    "0xH200",
    "65x24GiB",
    "2xNOPE",
    "2x24." + "9" * 5000 + "GiB",
]
CONTEXTS = ["32768", "max", "1", "202752", "202753", "65536"]
CACHES = ["auto", "FP16", "5,4", "8,8", "k5v4", "Q4", "9,9", "2,2"]
QUANTS = ["4bpw_H6", "3.15bpw-tuned", "2bpw_H6", "9bpw_H9"]
SPLITS = ["auto", "tp", "layer", "diagonal"]
PORTS = ["5000", "1", "65535", "65536", "0", "http"]
BINDS = ["127.0.0.1", "0.0.0.0", "::1", "localhost", "fe80::1%eth0"]
WAITS = ["0", "0.5", "1", "-1"]


def values(*choices: list[str]) -> st.SearchStrategy[str]:
    """A flag value: usually a meaningful one, sometimes a hostile one."""
    pool = [v for choice in choices for v in choice]
    meaningful, hostile, text = st.sampled_from(pool), st.sampled_from(HOSTILE), st.text(max_size=12)
    return st.integers(0, 9).flatmap(lambda n: meaningful if n < 6 else hostile if n < 9 else text)


def option(flag: str, strategy: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """The flag with a value two times in three."""
    return st.integers(0, 2).flatmap(
        lambda n: st.just([]) if n == 0 else strategy.map(lambda value: [flag, value])
    )


def required(flag: str, strategy: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """The flag with a value nine times in ten (a missing required flag is a usage error, tested elsewhere)."""
    return st.integers(0, 9).flatmap(
        lambda n: st.just([]) if n == 0 else strategy.map(lambda value: [flag, value])
    )


def switch(flag: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [flag]])


def command(name: list[str], *parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """A subcommand and a shuffled selection of its options."""
    return st.tuples(*parts).flatmap(
        lambda chosen: st.permutations([p for p in chosen if p]).map(
            lambda order: name + list(itertools.chain.from_iterable(order))
        )
    )


def grammar(places: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """Command lines over every subcommand; `places` are sandbox paths the command may be given."""
    outs = [places["out"], places["rendered"], places["fleet_out"], ""]
    inputs = [
        places["key"],
        places["plan"],
        places["fleet"],
        places["reference"],
        places["detect"],
        places["prompts"],
        places["missing"],
        places["folder"],
        places["not_utf8"],
    ]
    urls = [places["url"], places["closed"], f"http://user:{API_KEY}@127.0.0.1:9", "ftp://x", "http://[::1"]
    path_out = values(outs)
    path_in = values(inputs)
    plan_options = [
        option("--gpus", values(GPUS)),
        option("--context", values(CONTEXTS)),
        option("--cache", values(CACHES)),
        option("--quant", values(QUANTS)),
        option("--split", values(SPLITS)),
        option("--headroom-mib", values(["0", "256", "-5"])),
        option("--profile", values(["glm-4.7", places["missing"]])),
    ]
    return st.one_of(
        command(["plan"], *plan_options, switch("--json")),
        command(
            ["render"],
            required("--out", path_out),
            option("--plan", path_in),
            *plan_options,
            option("--port", values(PORTS)),
            option("--bind", values(BINDS)),
            option("--models-dir", values(["/srv/models", "rel"])),
            option("--tabby-ref", values(["e632af4"])),
            switch("--force"),
            switch("--json"),
        ),
        command(
            ["verify"],
            required("--url", values(urls)),
            option("--api-key-file", path_in),
            option("--reference", path_in),
            option("--max-kl", values(["0.02", "10"])),
            option("--expect-model", values(["tiny"])),
            option("--expect-cache-mode", values(CACHES)),
            option("--expect-context", values(["4096"])),
            option("--prompts", values(["1", "2"])),
            option("--wait", values(WAITS)),
            option("--timeout", values(["30", "5"])),
            option("--junit", values([places["junit"]])),
            switch("--json"),
        ),
        command(
            ["reference", "record"],
            required("--url", values(urls)),
            option("--api-key-file", path_in),
            required("--out", values([places["ref_out"]])),
            option("--prompts", path_in),
            option("--top-k", values(["5", "100"])),
            option("--timeout", values(["30"])),
        ),
        command(["detect"], switch("--json")),
        command(
            ["node-config"],
            option("--gpus", values(GPUS)),
            option("--detect-json", path_in),
            option("--node", values(["gpu-a", "bad name"])),
            switch("--json"),
        ),
        command(
            ["cluster", "plan"], required("--inventory", path_in), switch("--allow-mixed"), switch("--json")
        ),
        command(
            ["cluster", "render"],
            required("--inventory", path_in),
            required("--out", path_out),
            switch("--force"),
            switch("--allow-mixed"),
        ),
        command(
            ["cluster", "verify"],
            required("--inventory", path_in),
            required("--url", values(urls)),
            option("--api-key-file", path_in),
            option("--wait", values(WAITS)),
            option("--timeout", values(["5"])),
            switch("--no-endpoint"),
            switch("--json"),
        ),
        *[
            command([name], option("--out", path_out), option("--hf-token-file", path_in), switch("--json"))
            for name in ("fetch-model", "build", "status", "down")
        ],
        command(
            ["up"],
            option("--out", path_out),
            option("--ready-timeout", values(["10", "-1"])),
            switch("--no-gpu"),
            switch("--json"),
        ),
        command(["logs"], option("--out", path_out), option("--tail", values(["10", "all", "-1"]))),
        command(["down"], option("--out", path_out), switch("--purge")),
        command(
            ["auto"],
            option("--out", path_out),
            *plan_options[:4],
            option("--port", values(PORTS)),
            option("--bind", values(BINDS)),
            option("--hf-token-file", path_in),
            switch("--yes"),
            switch("--no-gpu"),
            switch("--json"),
        ),
    )


@pytest.fixture()
def places(cli, sandbox, honest_tabby, reference_file, prompts_file) -> dict[str, str]:
    """Inputs and output folders inside the sandbox: a rendered bundle, a plan, a fleet, a detect JSON..."""
    given = sandbox.root / "given"
    given.mkdir()
    rendered = given / "rendered"
    assert cli("render", "--gpus", "1xH200", "--out", str(rendered)).code == 0
    plan = sandbox.root / "plan.json"
    plan.write_text(cli("plan", "--gpus", "2xH200", "--json").out)
    fleet = sandbox.root / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump({"nodes": [{"name": "gpu-a", "gpus": "1xH200", "url": honest_tabby.url}]})
    )
    detect = sandbox.root / "detect.json"
    detect.write_text('{"gpus": [{"index": 0, "name": "H200", "total_mib": 143771, "free_mib": 143000}]}')
    reference = sandbox.root / "reference.json.gz"
    reference.write_bytes(reference_file.read_bytes())
    prompts = sandbox.root / "prompts.yaml"
    prompts.write_bytes(prompts_file.read_bytes())
    quant = sandbox.root / "quant"
    shutil.copytree(QUANT_FIXTURE, quant)
    not_utf8 = sandbox.root / "not-utf8"
    not_utf8.write_bytes(b"\xff\xfe\x80")
    return {
        "out": str(given / "out"),
        "rendered": str(rendered),
        "fleet_out": str(given / "fleet-out"),
        "junit": str(given / "junit.xml"),
        "ref_out": str(given / "ref.json"),
        "key": str(sandbox.key_file),
        "plan": str(plan),
        "fleet": str(fleet),
        "detect": str(detect),
        "reference": str(reference),
        "prompts": str(prompts),
        "missing": str(sandbox.root / "missing"),
        "folder": str(sandbox.root),
        "not_utf8": str(not_utf8),
        "quant": str(quant),
        "url": honest_tabby.url,
        "closed": "http://127.0.0.1:9",
    }


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_any_command_line_keeps_the_invariants(data, cli, sandbox, places) -> None:
    argv = data.draw(grammar(places), label="argv")
    given = Path(places["out"]).parent
    before = snapshot(sandbox.root)
    run = cli(*argv, check=False)
    assert_contained(run)
    after = snapshot(sandbox.root)
    touched = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    outside = {path for path in touched if not (sandbox.root / path).is_relative_to(given) and path != "."}
    assert outside == set(), f"{argv!r} touched {sorted(outside)[:5]}"
    assert files_holding(sandbox.root, skip=(sandbox.key_file, sandbox.token_file)) == [], argv


def quant_grammar(places: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """`deploy quant sizes` command lines (a grammar of its own: adding it to grammar() would redraw every example
    of the test above)."""
    folders = [places["quant"], places["folder"], places["missing"], places["rendered"], places["not_utf8"]]
    return command(
        ["quant", "sizes"],
        option("--model-dir", values(folders)),
        option("--quant", values(QUANTS)),
        option("--models-dir", values([places["out"], ""])),
        option("--profile", values(["glm-4.7", places["missing"]])),
        option("--hf-token-file", values([places["key"], places["missing"], places["not_utf8"]])),
        switch("--json"),
    )


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_quant_sizes_command_line_keeps_the_invariants(data, cli, sandbox, places) -> None:
    argv = data.draw(quant_grammar(places), label="argv")
    given = Path(places["out"]).parent
    before = snapshot(sandbox.root)
    run = cli(*argv, check=False)
    assert_contained(run)
    after = snapshot(sandbox.root)
    touched = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    outside = {path for path in touched if not (sandbox.root / path).is_relative_to(given) and path != "."}
    assert outside == set(), f"{argv!r} touched {sorted(outside)[:5]}"
    assert files_holding(sandbox.root, skip=(sandbox.key_file, sandbox.token_file)) == [], argv
