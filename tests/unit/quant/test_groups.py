"""The tensor groups the recipe walks, from GLM-4 MoE module keys, and the storage read that sizes them."""

from __future__ import annotations

import json

import pytest

from toolkit.errors import BadInput
from toolkit.quant.storage import classify, read_storage

from .exl3_folders import make_quant


@pytest.mark.parametrize(
    ("key", "group", "layer"),
    [
        ("model.embed_tokens", "embedding", None),
        ("lm_head", "head", None),
        ("model.norm", "norms", None),
        ("model.layers.0.input_layernorm", "norms", 0),
        ("model.layers.7.self_attn.q_proj", "attention", 7),
        ("model.layers.7.self_attn.k_norm", "norms", 7),
        ("model.layers.2.mlp.down_proj", "dense_mlp", 2),
        ("model.layers.3.mlp.gate", "router", 3),
        ("model.layers.3.mlp.shared_experts.gate_proj", "shared_experts", 3),
        ("model.layers.91.mlp.experts.159.down_proj", "routed_down", 91),
        ("model.layers.91.mlp.experts.0.up_proj", "routed_gate_up", 91),
        ("model.layers.91.mlp.experts.0.gate_proj", "routed_gate_up", 91),
    ],
)
def test_glm_module_keys_fall_in_their_groups(key, group, layer):
    assert classify(key) == (group, layer)


def test_the_storage_of_a_quant_is_exact_per_module(tmp_path):
    folder = make_quant(tmp_path / "q", 3)
    storage = read_storage(folder)
    listed = json.loads((folder / "quantization_config.json").read_text())["tensor_storage"]
    assert storage.vram_bytes + storage.embedding_bytes == sum(
        t["n_bytes"] for m in listed.values() for t in m["stored_tensors"].values()
    )
    assert sum(storage.by_group().values()) == storage.vram_bytes + storage.embedding_bytes
    assert storage.codebook == "mcg" and storage.architecture == "Glm4MoeForCausalLM" and storage.bits == 3.0


def test_a_quant_mixing_codebooks_or_without_tensor_storage_is_refused(tmp_path):
    folder = make_quant(tmp_path / "q", 3)
    path = folder / "quantization_config.json"
    document = json.loads(path.read_text())
    entry = document["tensor_storage"]["lm_head"]
    entry["mul1_multiplier"] = entry.pop("mcg_multiplier")
    path.write_text(json.dumps(document))
    with pytest.raises(BadInput, match="mixes codebooks"):
        read_storage(folder)
    del document["tensor_storage"]
    path.write_text(json.dumps(document))
    with pytest.raises(BadInput, match="has no tensor_storage"):
        read_storage(folder)
