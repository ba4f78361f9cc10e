"""TEST DOUBLE of the hub's GLM-4.7 `quantization_config.json`: the file exllamav3 1.6.5 writes for a GLM-4.7 EXL3
quant, synthesized from the architecture in profiles/glm-4.7.yaml (the real file is ~40 MB per branch and this
repository stores no download of it).

It follows exllamav3's storage rules (conversion/quant_config.py create_quantization_config_json, modules/linear.py,
modules/quant/exl3.py), checked against the real files of a tiny GLM-4 MoE converted with exllamav3 1.6.5
(tests/unit/quant/fixtures/, test_storage_fixtures.py):
- every leaf module in load order (embedding; per layer: input norm, q/k/v/o, q/k norms, post-attention norm, then
  the dense MLP's up/gate/down or the router and every expert's up/gate/down and the shared expert's; final norm;
  lm_head), each listing its stored tensors {shape, n_bytes, dtype};
- an EXL3 linear (in -> out features, both padded to multiples of 128) stores suh fp16 [in], svh fp16 [out], a bias
  fp16 [out] where the model has one, the codebook multiplier as an int32 scalar (`mcg` or `mul1`) and the trellis
  int16 [in/16, out/16, 16 * bits]; its entry carries quant_format "exl3", bits_per_weight and the multiplier;
- the router (`mlp.gate`) stays unquantized: weight fp16 [experts, hidden] and e_score_correction_bias fp32;
- norms and the embedding keep the original's dtype (BF16 for GLM-4.7); q/k/v carry biases (GLM-4.5/4.6/4.7's
  config has attention_bias true) and every layer has q/k norms (use_qk_norm true; GLM-4.5-Air has none).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from toolkit.facts.profiles import Architecture, load_profile

PAD = 128  # exllamav3 pads Linear dimensions to multiples of 128
MULTIPLIERS = {"mcg": 0xCBAC1FED, "mul1": 0x83DCD12D}  # quantize.py codebook_mcg_mult / codebook_mul1_mult
DTYPE_BYTES = {
    "torch.float16": 2,
    "torch.bfloat16": 2,
    "torch.float32": 4,
    "torch.int16": 2,
    "torch.int32": 4,
}
ORIGINAL_DTYPE = "torch.bfloat16"  # zai-org/GLM-4.7 ships BF16: norms and the embedding keep it


def architecture() -> Architecture:
    """GLM-4.7's shapes as the profile states them."""
    return load_profile("glm-4.7").architecture


def _tensor(shape: list[int], dtype: str) -> dict[str, Any]:
    count = 1
    for size in shape:
        count *= size
    return {"shape": shape, "n_bytes": count * DTYPE_BYTES[dtype], "dtype": dtype}


def _padded(features: int) -> int:
    return -(-features // PAD) * PAD


def exl3_linear(
    key: str, in_features: int, out_features: int, bits: float, codebook: str, bias: bool = False
) -> dict[str, Any]:
    """One EXL3 linear's tensor_storage entry (tensor order as exllamav3 lists them)."""
    cols, rows = _padded(in_features), _padded(out_features)
    tensors = {f"{key}.suh": _tensor([cols], "torch.float16"), f"{key}.svh": _tensor([rows], "torch.float16")}
    if bias:
        tensors[f"{key}.bias"] = _tensor([rows], "torch.float16")
    if codebook != "3inst":
        tensors[f"{key}.{codebook}"] = _tensor([], "torch.int32")
    depth = bits * 16
    if not float(depth).is_integer():
        raise ValueError(f"{bits} bits is not a trellis depth (16 * bits must be whole)")
    tensors[f"{key}.trellis"] = _tensor([cols // 16, rows // 16, int(depth)], "torch.int16")
    entry: dict[str, Any] = {
        "stored_tensors": tensors,
        "quant_format": "exl3",
        "bits_per_weight": int(bits) if float(bits).is_integer() else bits,
    }
    if codebook != "3inst":
        entry[f"{codebook}_multiplier"] = MULTIPLIERS[codebook]
    return entry


def _plain(key: str, tensors: dict[str, tuple[list[int], str]]) -> dict[str, Any]:
    return {
        "stored_tensors": {f"{key}.{name}": _tensor(shape, dtype) for name, (shape, dtype) in tensors.items()}
    }


def leaf_modules(
    arch: Architecture,
) -> Iterator[tuple[str, Callable[[float, str], dict[str, Any]] | None, Any]]:
    """(key, linear factory or None, plain tensors) per leaf module, in exllamav3's load order."""
    hidden, heads, kv_heads, head_dim = (
        arch.hidden_size,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.head_dim,
    )

    def linear(key: str, n_in: int, n_out: int, bias: bool = False) -> tuple[str, Any, None]:
        return key, lambda bits, codebook: exl3_linear(key, n_in, n_out, bits, codebook, bias), None

    def norm(key: str, size: int) -> tuple[str, None, dict[str, tuple[list[int], str]]]:
        return key, None, {"weight": ([size], ORIGINAL_DTYPE)}

    yield "model.embed_tokens", None, {"weight": ([arch.vocab_size, hidden], ORIGINAL_DTYPE)}
    for layer in range(arch.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        yield norm(f"{prefix}.input_layernorm", hidden)
        yield linear(f"{prefix}.self_attn.q_proj", hidden, heads * head_dim, bias=True)
        yield linear(f"{prefix}.self_attn.k_proj", hidden, kv_heads * head_dim, bias=True)
        yield linear(f"{prefix}.self_attn.v_proj", hidden, kv_heads * head_dim, bias=True)
        yield linear(f"{prefix}.self_attn.o_proj", heads * head_dim, hidden)
        yield norm(f"{prefix}.self_attn.q_norm", head_dim)
        yield norm(f"{prefix}.self_attn.k_norm", head_dim)
        yield norm(f"{prefix}.post_attention_layernorm", hidden)
        if layer < arch.first_k_dense_replace:
            yield linear(f"{prefix}.mlp.up_proj", hidden, arch.intermediate_size)
            yield linear(f"{prefix}.mlp.gate_proj", hidden, arch.intermediate_size)
            yield linear(f"{prefix}.mlp.down_proj", arch.intermediate_size, hidden)
            continue
        experts = arch.n_routed_experts
        yield (
            f"{prefix}.mlp.gate",
            None,
            {
                "e_score_correction_bias": ([experts], "torch.float32"),
                "weight": ([experts, hidden], "torch.float16"),
            },
        )
        moe = arch.moe_intermediate_size
        for expert in range(experts):
            yield linear(f"{prefix}.mlp.experts.{expert}.up_proj", hidden, moe)
            yield linear(f"{prefix}.mlp.experts.{expert}.gate_proj", hidden, moe)
            yield linear(f"{prefix}.mlp.experts.{expert}.down_proj", moe, hidden)
        shared = moe * arch.n_shared_experts
        yield linear(f"{prefix}.mlp.shared_experts.up_proj", hidden, shared)
        yield linear(f"{prefix}.mlp.shared_experts.gate_proj", hidden, shared)
        yield linear(f"{prefix}.mlp.shared_experts.down_proj", shared, hidden)
    yield norm("model.norm", hidden)
    yield linear("lm_head", hidden, arch.vocab_size)


def quantization_config(
    bits: float,
    head_bits: int,
    codebook: str = "mcg",
    module_bits: Callable[[str], float | None] = lambda key: None,
    module_codebook: Callable[[str], str | None] = lambda key: None,
    arch: Architecture | None = None,
) -> dict[str, Any]:
    """The quantization_config.json of a GLM-4.7 quant at `bits` (head at head_bits); module_bits / module_codebook
    override single modules (a mixed quant, or a broken file for the refusal tests)."""
    shapes = arch or architecture()
    storage: dict[str, Any] = {}
    for key, factory, plain in leaf_modules(shapes):
        if factory is None:
            storage[key] = _plain(key, plain)
            continue
        chosen = module_bits(key)
        width = head_bits if key == "lm_head" else bits if chosen is None else chosen
        storage[key] = factory(width, module_codebook(key) or codebook)
    return {
        "quant_method": "exl3",
        "version": "1.6.5",
        "bits": float(bits),
        "head_bits": head_bits,
        "calibration": {"rows": 250, "cols": 2048},
        "out_scales": "auto",
        "codebook": codebook,
        "tensor_storage": storage,
    }


def quantization_config_text(bits: float, head_bits: int, **options: Any) -> str:
    """The file as exllamav3 writes it (json.dumps with indent 4)."""
    return json.dumps(quantization_config(bits, head_bits, **options), indent=4)
