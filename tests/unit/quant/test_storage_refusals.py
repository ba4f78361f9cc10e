"""A missing, malformed or hostile quantization_config.json is one BadInput line (exit 2), never a wrong size."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from toolkit.errors import BadInput
from toolkit.quant.storage import QUANT_CONFIG, QUANT_CONFIG_BYTES, read_storage

FIXTURES = Path(__file__).with_name("fixtures")
KEY = "model.layers.1.mlp.experts.3.down_proj"


def broken(tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """The real 2 bpw file with one change."""
    folder = tmp_path / "quant"
    shutil.copytree(FIXTURES / "tiny-2bpw", folder)
    data = json.loads((folder / QUANT_CONFIG).read_text())
    change(data)
    (folder / QUANT_CONFIG).write_text(json.dumps(data))
    return folder


def refusal(folder: Path) -> str:
    with pytest.raises(BadInput) as caught:
        read_storage(folder)
    line = caught.value.line()
    assert "\n" not in line
    return line


def tensors(data: dict[str, Any], key: str = KEY) -> dict[str, Any]:
    return data["tensor_storage"][key]["stored_tensors"]


def set_key(mapping: dict[str, Any], key: str, value: object) -> None:
    mapping[key] = value


CASES: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "not exl3": (lambda d: set_key(d, "quant_method", "gptq"), "is not an EXL3 quant's"),
    "no tensor_storage": (lambda d: d.pop("tensor_storage"), "has no tensor_storage"),
    "empty tensor_storage": (lambda d: set_key(d, "tensor_storage", {}), "has no tensor_storage"),
    "bits as text": (lambda d: set_key(d, "bits", "2"), "has bits '2'"),
    "no version": (lambda d: d.pop("version"), "has no exllamav3 version"),
    "n_bytes beside its shape": (
        lambda d: set_key(tensors(d)[f"{KEY}.trellis"], "n_bytes", 1),
        "is not its shape",
    ),
    "negative n_bytes": (lambda d: set_key(tensors(d)[f"{KEY}.suh"], "n_bytes", -512), "not a byte count"),
    "boolean n_bytes": (lambda d: set_key(tensors(d)[f"{KEY}.suh"], "n_bytes", True), "not a byte count"),
    "shape of text": (lambda d: set_key(tensors(d)[f"{KEY}.suh"], "shape", "256"), "not a list of sizes"),
    "unknown dtype": (lambda d: set_key(tensors(d)[f"{KEY}.suh"], "dtype", "float16"), "not a torch dtype"),
    "hostile module key": (
        lambda d: set_key(d["tensor_storage"], "model.norm\n\x1b[31m", {"stored_tensors": {}}),
        "not a module key",
    ),
    "tensor of another module": (
        lambda d: set_key(
            tensors(d), "lm_head.weight", {"shape": [1], "n_bytes": 2, "dtype": "torch.float16"}
        ),
        "is not named after its module",
    ),
    "tensor listed by two modules": (
        lambda d: set_key(
            d["tensor_storage"], "model.layers.1.mlp.experts", {"stored_tensors": dict(tensors(d))}
        ),
        "is listed twice",
    ),
    "exl3 without trellis": (lambda d: tensors(d).pop(f"{KEY}.trellis"), "stores no trellis"),
    "bits beside the trellis": (
        lambda d: set_key(d["tensor_storage"][KEY], "bits_per_weight", 4),
        "but its trellis holds 2 bits",
    ),
    "two codebooks in one module": (
        lambda d: set_key(d["tensor_storage"][KEY], "mcg_multiplier", 3417055213),
        "names two codebooks",
    ),
    "bits without quant_format": (
        lambda d: d["tensor_storage"][KEY].pop("quant_format"),
        "has bits or a codebook but no quant_format",
    ),
    "declared codebook differs": (lambda d: set_key(d, "codebook", "mcg"), "declares codebook 'mcg'"),
    "no exl3 module": (
        lambda d: set_key(d, "tensor_storage", {"model.norm": d["tensor_storage"]["model.norm"]}),
        "holds no EXL3 module",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_file_is_one_line_naming_the_problem(tmp_path: Path, case: str) -> None:
    change, expected = CASES[case]
    line = refusal(broken(tmp_path, change))
    assert expected in line and "quantization_config.json" in line


def test_a_file_mixing_codebooks_is_reported_with_a_module_of_each(tmp_path: Path) -> None:
    def mixed(data: dict[str, Any]) -> None:
        data.pop("codebook")
        for key in ("model.layers.2.mlp.experts.0.up_proj", "model.layers.4.self_attn.o_proj"):
            entry = data["tensor_storage"][key]
            entry["mcg_multiplier"] = entry.pop("mul1_multiplier")

    line = refusal(broken(tmp_path, mixed))
    assert "mixes codebooks" in line
    assert "mcg in 2 modules (e.g. model.layers.2.mlp.experts.0.up_proj)" in line
    assert "mul1 in" in line and "(e.g. model.layers.0.self_attn.q_proj)" in line


def test_missing_not_json_oversized_and_not_regular_files(tmp_path: Path) -> None:
    assert "cannot read the quant's storage map" in refusal(tmp_path)
    (tmp_path / QUANT_CONFIG).write_text('{"quant_method": "exl3", ')
    assert "is not JSON" in refusal(tmp_path)
    (tmp_path / QUANT_CONFIG).write_text('{"quant_method": "exl3", "bits": NaN}')
    assert "NaN" in refusal(tmp_path)
    with (tmp_path / QUANT_CONFIG).open("wb") as handle:
        handle.truncate(QUANT_CONFIG_BYTES + 1)  # sparse: refused by its size before a byte is read
    assert "is larger than" in refusal(tmp_path)
    (tmp_path / QUANT_CONFIG).unlink()
    os.mkfifo(tmp_path / QUANT_CONFIG)
    assert "not a regular file" in refusal(tmp_path)


def test_a_broken_config_json_is_refused_and_an_absent_one_leaves_the_architecture_open(
    tmp_path: Path,
) -> None:
    folder = broken(tmp_path, lambda d: None)
    (folder / "config.json").unlink()
    assert read_storage(folder).architecture is None
    (folder / "config.json").write_text('{"architectures": "Glm4MoeForCausalLM"}')
    assert "names no architecture" in refusal(folder)
