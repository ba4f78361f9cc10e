"""--gpus specs: exact unit arithmetic, card names from profiles/gpus.yaml, one-line errors for bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.detect.gpu_spec import parse_gpu_spec
from toolkit.errors import BadInput
from toolkit.facts.gpu_cards import GPU_TABLE, load_gpu_table, parse_gpu_table


def totals(spec: str) -> list[int]:
    return [gpu.total_mib for gpu in parse_gpu_spec(spec).gpus]


def test_count_times_binary_size() -> None:
    inventory = parse_gpu_spec("8x24GiB")
    assert [gpu.index for gpu in inventory.gpus] == list(range(8))
    assert all(gpu.total_mib == gpu.free_mib == 24 * 1024 for gpu in inventory.gpus)
    assert inventory.source == "spec"


def test_list_of_sizes_keeps_order_and_numbers_gpus() -> None:
    inventory = parse_gpu_spec("24GiB,24GiB,48GiB")
    assert [(g.index, g.total_mib) for g in inventory.gpus] == [(0, 24576), (1, 24576), (2, 49152)]


def test_mixed_groups_number_gpus_consecutively() -> None:
    inventory = parse_gpu_spec("2x24GiB, 1xH200")
    assert [g.index for g in inventory.gpus] == [0, 1, 2]


def test_mib_is_taken_verbatim() -> None:
    assert totals("97887MiB") == [97887]


@pytest.mark.parametrize(
    ("spec", "mib"),
    [
        ("24GB", 24 * 10**9 // 2**20),  # decimal gigabytes: 22888 MiB, not 24576
        ("1000MB", 10**9 // 2**20),
        ("1.5GiB", 1536),
        ("0.5gib", 512),
        ("23.99GiB", int(23.99 * 1024)),
    ],
)
def test_units_are_exact(spec: str, mib: int) -> None:
    assert totals(spec) == [mib]


@pytest.mark.parametrize("spec", ["4xRTX5090", "4x RTX 5090", "4xrtx-5090", "4 x rtx_5090"])
def test_card_names_are_looked_up_loosely(spec: str) -> None:
    table = yaml.safe_load(GPU_TABLE.read_text())["gpus"]
    assert totals(spec) == [table["RTX5090"]] * 4


def test_cards_from_the_facts_have_their_nvml_totals() -> None:
    # ../shared/facts/glm-4.7.md: H200 143771 MiB, RTX PRO 6000 Blackwell 97887 MiB, RTX 4090 24 GiB
    assert totals("H200") == [143771]
    assert totals("RTX PRO 6000") == [97887]
    assert totals("RTX4090") == [24576]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("8x", "names no GPU"),
        ("24", "no unit"),
        ("8x24", "no unit"),
        ("24G", "unknown unit"),
        ("24TB", "unknown unit"),
        ("8xRTX9999", "unknown GPU"),
        ("0x24GiB", "asks for 0 GPUs"),
        ("65x24GiB", "asks for 65 GPUs"),
        ("40x24GiB,30x24GiB", "asks for 70 GPUs"),
        ("0GiB", "plausible"),
        ("24GiB,,24GiB", "empty"),
    ],
)
def test_bad_specs_are_one_line_bad_input(spec: str, fragment: str) -> None:
    with pytest.raises(BadInput) as caught:
        parse_gpu_spec(spec)
    line = caught.value.line()
    assert fragment in line
    assert "\n" not in line


def test_unknown_card_error_lists_known_cards() -> None:
    with pytest.raises(BadInput) as caught:
        parse_gpu_spec("2xTPUv5")
    assert "RTX5090" in caught.value.hint and "24GiB" in caught.value.hint


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"gpus": {}}, "gpus"),
        ({"cards": {"A": 1}}, "gpus"),
        ({"gpus": {"RTX4090": "24GiB"}}, "gpus.RTX4090"),
        ({"gpus": {"RTX4090": -1}}, "gpus.RTX4090"),
        ({"gpus": {"RTX4090": True}}, "gpus.RTX4090"),
    ],
)
def test_malformed_gpu_table_names_file_and_field(data: object, field: str) -> None:
    with pytest.raises(BadInput) as caught:
        parse_gpu_table(data, Path("/x/gpus.yaml"))
    assert "/x/gpus.yaml" in caught.value.line() and repr(field) in caught.value.line()


def test_unreadable_or_invalid_gpu_table_is_bad_input(tmp_path: Path) -> None:
    broken = tmp_path / "gpus.yaml"
    broken.write_text("gpus: [unclosed\n")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_gpu_table(broken)
    with pytest.raises(BadInput, match="cannot be read"):
        load_gpu_table(tmp_path / "missing.yaml")
