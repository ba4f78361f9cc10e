"""read_storage on real exllamav3 1.6.5 files: a tiny GLM-4 MoE (6 layers, 16 experts, first layer dense) converted
at 2 and 4 bpw, and a mix of the two (attention and shared experts from 4 bpw), measured on an H200.

fixtures/ holds what the probe kept (/work/notes/quant_probe): each quant's config.json and quantization_config.json;
mix_load.txt, exllamav3's model.get_storage_info() after loading each quant (bpw of the linears, head bpw, VRAM bits
of the linears and the head); headers.txt, the first 400 of the 2 bpw file's 1186 safetensors header entries
(dtype, shape, bytes); ls.txt, the folders' file sizes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from tests.unit.quant import glm47_storage
from toolkit.quant.storage import read_storage

FIXTURES = Path(__file__).with_name("fixtures")
QUANTS = ("tiny-2bpw", "tiny-4bpw", "mix-probe")
SAFETENSORS_DTYPES = {"F16": "torch.float16", "BF16": "torch.bfloat16", "F32": "torch.float32"}
SAFETENSORS_DTYPES |= {"I16": "torch.int16", "I32": "torch.int32"}


def storage_info() -> dict[str, tuple[float, float, float]]:
    """mix_load.txt: folder name -> exllamav3's (linear bpw, head bpw, VRAM bits) on a real load."""
    found = {}
    for line in (FIXTURES / "mix_load.txt").read_text().splitlines():
        match = re.match(r"^\S*/([^/\s]+) storage (\(.*?\)) logits", line)
        if match:
            found[match.group(1)] = ast.literal_eval(match.group(2))
    return found


def file_sizes() -> dict[str, int]:
    """ls.txt: folder name -> model.safetensors bytes."""
    sizes, folder = {}, None
    for line in (FIXTURES / "ls.txt").read_text().splitlines():
        if line.endswith(":"):
            folder = line.rstrip(":").rstrip("/").rsplit("/", 1)[-1]
        elif line.endswith(" model.safetensors") and folder:
            sizes[folder] = int(line.split()[4])
    return sizes


def config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("name", QUANTS)
def test_vram_bytes_match_exllamavs_own_count_on_a_real_load(name: str) -> None:
    """exllamav3 counts every Linear's stored tensors and the head (get_storage_info); VRAM bytes also hold the
    norms and the router's score-correction bias, which are in VRAM but are no Linear's."""
    storage = read_storage(FIXTURES / name)
    linear_bpw, head_bpw, vram_bits = storage_info()[name]
    groups = storage.by_group()
    raw = json.loads((FIXTURES / name / "quantization_config.json").read_text())["tensor_storage"]
    score_bias = sum(
        tensor["n_bytes"]
        for entry in raw.values()
        for tensor_name, tensor in entry["stored_tensors"].items()
        if tensor_name.endswith(".e_score_correction_bias")
    )
    assert score_bias > 0
    assert storage.vram_bytes - groups["norms"] - score_bias == vram_bits / 8
    head = storage.modules["lm_head"]
    assert head.n_bytes * 8 / head.weights == pytest.approx(head_bpw, rel=1e-12)
    router_weights = sum(
        _numel(m.shapes[f"{m.key}.weight"]) for m in storage.modules.values() if m.group == "router"
    )
    linears = [m for m in storage.modules.values() if m.bits is not None and m.group != "head"]
    linear_bytes = sum(m.n_bytes for m in linears) + groups["router"] - score_bias
    assert linear_bytes * 8 / (sum(m.weights for m in linears) + router_weights) == pytest.approx(
        linear_bpw, rel=1e-12
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@pytest.mark.parametrize("name", QUANTS)
def test_stored_bytes_fit_the_safetensors_file(name: str) -> None:
    """Every stored tensor's bytes (embedding included) are the file's data: what is left is its JSON header."""
    storage = read_storage(FIXTURES / name)
    data = storage.vram_bytes + storage.embedding_bytes
    tensors = sum(len(m.shapes) for m in storage.modules.values())
    header = file_sizes()[name] - data
    assert tensors == 1186
    assert 8 + 60 * tensors < header < 8 + 160 * tensors  # ~110 bytes of JSON per tensor entry


def test_listed_tensors_match_the_safetensors_header() -> None:
    """The 400 header entries the probe listed agree with quantization_config.json in dtype, shape and bytes."""
    storage = read_storage(FIXTURES / "tiny-2bpw")
    listed = {}
    for module in storage.modules.values():
        for tensor, shape in module.shapes.items():
            listed[tensor] = (shape, module)
    raw = json.loads((FIXTURES / "tiny-2bpw" / "quantization_config.json").read_text())["tensor_storage"]
    lines = (FIXTURES / "headers.txt").read_text().splitlines()[1:]
    assert len(lines) == 400
    for line in lines:
        name, rest = line.split(" ", 1)
        dtype, shape, n_bytes = ast.literal_eval(rest)
        shape_read, module = listed[name]
        entry = raw[module.key]["stored_tensors"][name]
        assert shape_read == tuple(shape) and entry["n_bytes"] == n_bytes, name
        assert entry["dtype"] == SAFETENSORS_DTYPES[dtype], name


def test_groups_layers_and_codebook_of_the_uniform_quants() -> None:
    two, four = read_storage(FIXTURES / "tiny-2bpw"), read_storage(FIXTURES / "tiny-4bpw")
    for storage, bits in ((two, 2.0), (four, 4.0)):
        assert (storage.bits, storage.head_bits, storage.codebook) == (bits, 6.0, "mul1")
        assert storage.architecture == "Glm4MoeForCausalLM" and storage.version == "1.6.5"
        assert len(storage.modules) == 314
        linear_groups = ("attention", "shared_experts", "routed_gate_up", "routed_down", "dense_mlp")
        assert storage.group_bits() == {**{g: bits for g in linear_groups}, "head": 6.0}
        assert list(storage.by_layer()) == list(range(6))
        per_layer = storage.by_layer_group()
        assert "dense_mlp" in per_layer[0] and "routed_down" not in per_layer[0]
        for layer in range(1, 6):
            assert {"router", "routed_gate_up", "routed_down", "shared_experts"} <= set(per_layer[layer])
            assert "dense_mlp" not in per_layer[layer]
        final_norm = storage.modules["model.norm"].n_bytes
        assert (
            sum(storage.by_layer().values()) + storage.by_group()["head"] + final_norm == storage.vram_bytes
        )
    # at twice the bits, every quantized group's trellis doubles; norms, router and head stay
    for group in ("norms", "router", "head", "embedding"):
        assert two.by_group()[group] == four.by_group()[group]
    assert four.by_group()["routed_down"] > 1.9 * two.by_group()["routed_down"]


def test_the_mix_takes_attention_and_shared_experts_from_the_larger_quant() -> None:
    mix = read_storage(FIXTURES / "mix-probe")
    two, four = read_storage(FIXTURES / "tiny-2bpw"), read_storage(FIXTURES / "tiny-4bpw")
    assert mix.bits == 2.52 and mix.codebook == "mul1"
    assert mix.group_bits() == {
        "attention": 4.0,
        "shared_experts": 4.0,
        "routed_gate_up": 2.0,
        "routed_down": 2.0,
        "dense_mlp": 2.0,
        "head": 6.0,
    }
    for key, module in mix.modules.items():
        source = four if module.group in ("attention", "shared_experts") else two
        assert module == source.modules[key], key
    expected = two.vram_bytes + sum(
        four.by_group()[g] - two.by_group()[g] for g in ("attention", "shared_experts")
    )
    assert mix.vram_bytes == expected


@pytest.mark.parametrize(("name", "bits"), [("tiny-2bpw", 2), ("tiny-4bpw", 4)])
def test_the_glm47_test_double_follows_exllamavs_rules_exactly(name: str, bits: int) -> None:
    """glm47_storage, given the tiny model's shapes, writes the very file exllamav3 wrote: every module in order,
    every tensor's shape, dtype and bytes, bits and codebook multiplier."""
    shapes = config(name)
    arch = dataclasses.replace(
        glm47_storage.architecture(),
        **{
            field: shapes[field]
            for field in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "moe_intermediate_size",
                "n_routed_experts",
                "n_shared_experts",
                "first_k_dense_replace",
                "vocab_size",
            )
        },
    )
    real = json.loads((FIXTURES / name / "quantization_config.json").read_text())
    made = glm47_storage.quantization_config(bits, real["head_bits"], codebook=real["codebook"], arch=arch)
    assert list(made["tensor_storage"]) == list(real["tensor_storage"])
    for key, entry in real["tensor_storage"].items():
        assert made["tensor_storage"][key] == entry, key
        assert list(made["tensor_storage"][key]["stored_tensors"]) == list(entry["stored_tensors"]), key
