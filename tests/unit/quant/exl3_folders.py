"""Small EXL3 quants of a GLM-4 MoE shape, written for the tests: real safetensors shards with the tensors
exllamav3 stores (trellis int16 (in/16, out/16, 16 x bits), suh/svh fp16, the codebook marker as an int32 scalar,
unquantized norms, router and embedding) and a config.json and quantization_config.json consistent with them,
laid out as exllamav3 1.6.5 writes them (conversion/quant_config.py). Written independently of the exllamav3 test
double, so that the double's output is checked against files it did not make."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from toolkit.facts.layout import MODEL_MARKER

MCG = 0xCBAC1FED  # exllamav3 modules/quant/exl3_lib/quantize.py codebook_mcg_mult
MUL1 = 0x83DCD12D  # codebook_mul1_mult
TORCH_NAMES = {"I16": "torch.int16", "I32": "torch.int32", "F16": "torch.float16", "F32": "torch.float32"}
NUMPY = {"I16": np.int16, "I32": np.int32, "F16": np.float16, "F32": np.float32}


@dataclass(frozen=True)
class Shape:
    """The model's dimensions (multiples of 16, as the trellis tiles need)."""

    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 64
    intermediate: int = 256
    moe: int = 64
    experts: int = 4
    layers: int = 3
    first_dense: int = 1
    vocab: int = 256


def linears(shape: Shape) -> list[tuple[str, int, int]]:
    """(key, in_features, out_features) of every quantized linear, the head last."""
    h = shape.hidden
    found: list[tuple[str, int, int]] = []
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        found += [
            (f"{p}.self_attn.q_proj", h, shape.heads * shape.head_dim),
            (f"{p}.self_attn.k_proj", h, shape.kv_heads * shape.head_dim),
            (f"{p}.self_attn.v_proj", h, shape.kv_heads * shape.head_dim),
            (f"{p}.self_attn.o_proj", shape.heads * shape.head_dim, h),
        ]
        mlps = [(f"{p}.mlp", shape.intermediate)] if i < shape.first_dense else []
        if i >= shape.first_dense:
            mlps += [(f"{p}.mlp.experts.{e}", shape.moe) for e in range(shape.experts)]
            mlps.append((f"{p}.mlp.shared_experts", shape.moe))
        for key, inner in mlps:
            found += [
                (f"{key}.up_proj", h, inner),
                (f"{key}.gate_proj", h, inner),
                (f"{key}.down_proj", inner, h),
            ]
    return found + [("lm_head", h, shape.vocab)]


def plain_tensors(shape: Shape) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Unquantized tensors: embedding, norms, routers (name -> dtype, shape)."""
    h = shape.hidden
    found = {"model.embed_tokens.weight": ("F16", (shape.vocab, h)), "model.norm.weight": ("F16", (h,))}
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        found[f"{p}.input_layernorm.weight"] = ("F16", (h,))
        found[f"{p}.post_attention_layernorm.weight"] = ("F16", (h,))
        if i >= shape.first_dense:
            found[f"{p}.mlp.gate.weight"] = ("F16", (shape.experts, h))
            found[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (shape.experts,))
    return found


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The safetensors format: u64 header length, JSON header with data offsets, the data."""
    header, offset = {}, 0
    for name, (tag, array) in tensors.items():
        header[name] = {
            "dtype": tag,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for _tag, array in tensors.values():
            handle.write(array.tobytes())


def read_tensor(folder: Path, name: str) -> bytes:
    """The stored bytes of one tensor, from whichever shard holds it."""
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            if name in header:
                begin, end = header[name]["data_offsets"]
                handle.seek(8 + length + begin)
                return handle.read(end - begin)
    raise KeyError(name)


def drop_tensor(folder: Path, name: str) -> None:
    """Rewrite the shard holding `name` without it (a source that changed after the checks)."""
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        if name in header:
            keep = {
                n: (e["dtype"], np.frombuffer(read_tensor(folder, n), NUMPY[e["dtype"]]).reshape(e["shape"]))
                for n, e in header.items()
                if n not in (name, "__metadata__")
            }
            write_safetensors(shard, keep)
            return
    raise KeyError(name)


def make_quant(
    folder: Path,
    bits: int,
    *,
    head_bits: int = 6,
    shape: Shape = Shape(),
    codebook: str = "mcg",
    architecture: str = "Glm4MoeForCausalLM",
    shards: int = 2,
    bits_of: dict[str, int] | None = None,
    marker: tuple[str, str, str] | None = None,
) -> Path:
    """A quant at `bits` (head at head_bits; bits_of overrides single linears) in folder; marker = (repo, branch,
    commit) writes the download marker of `deploy fetch-model`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(bits * 1000 + head_bits)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    exl3: dict[str, int] = {}
    for key, n_in, n_out in linears(shape):
        k = (bits_of or {}).get(key, head_bits if key == "lm_head" else bits)
        exl3[key] = k
        trellis = rng.integers(-(2**15), 2**15, size=(n_in // 16, n_out // 16, 16 * k), dtype=np.int16)
        tensors[f"{key}.trellis"] = ("I16", trellis)
        tensors[f"{key}.suh"] = ("F16", rng.standard_normal(n_in).astype(np.float16))
        tensors[f"{key}.svh"] = ("F16", rng.standard_normal(n_out).astype(np.float16))
        if codebook != "3inst":
            value = MCG if codebook == "mcg" else MUL1
            tensors[f"{key}.{codebook}"] = ("I32", np.array(value, dtype=np.uint32).view(np.int32))
    for name, (tag, dims) in plain_tensors(shape).items():
        tensors[name] = (tag, (np.arange(int(np.prod(dims))) % 7).astype(NUMPY[tag]).reshape(dims))
    names = list(tensors)
    per = -(-len(names) // shards)
    for i in range(shards):
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05}-of-{shards:05}.safetensors"
        write_safetensors(folder / file, part)
    quant = {"quant_method": "exl3", "version": "1.6.5", "bits": bits, "head_bits": head_bits}
    config = {
        "architectures": [architecture],
        "model_type": "glm4_moe",
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate,
        "moe_intermediate_size": shape.moe,
        "n_routed_experts": shape.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": shape.first_dense,
        "num_hidden_layers": shape.layers,
        "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "quantization_config": quant,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    storage = {}
    leaves = [key for key, _, _ in linears(shape)] + sorted(
        {
            name.rsplit(".", 1)[0] if ".gate." not in name else name.split(".gate.")[0] + ".gate"
            for name in plain_tensors(shape)
        }
    )
    for key in leaves:
        stored = {
            n: {"shape": list(a.shape), "n_bytes": a.nbytes, "dtype": TORCH_NAMES[t]}
            for n, (t, a) in tensors.items()
            if n.startswith(key + ".")
        }
        entry: dict = {"stored_tensors": stored}
        if key in exl3:
            entry.update(quant_format="exl3", bits_per_weight=exl3[key])
            if codebook != "3inst":
                entry[f"{codebook}_multiplier"] = MCG if codebook == "mcg" else MUL1
        storage[key] = entry
    (folder / "quantization_config.json").write_text(
        json.dumps({**quant, "tensor_storage": storage}, indent=4)
    )
    (folder / "tokenizer.json").write_text('{"model": "tiny"}\n')
    (folder / "generation_config.json").write_text('{"eos_token_id": 1}\n')
    if marker is not None:
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        repo, branch, commit = marker
        (folder / MODEL_MARKER).write_text(
            json.dumps({"repo": repo, "revision": branch, "commit": commit, "files": files})
        )
    return folder


def wider(shape: Shape, **changes: int) -> Shape:
    """The shape with some dimensions changed (another model)."""
    return replace(shape, **changes)


MIX_LOWER, MIX_UPPER = "2.57bpw-tuned", "3.15bpw-tuned"  # GLM-4.7 branches a planned mix names


def mix_branches(root: Path, upper_codebook: str = "mcg") -> dict[str, Path]:
    """Two small EXL3 quants of one model standing in for GLM-4.7's 2.57bpw-tuned (2 bits) and 3.15bpw-tuned
    (4 bits), as the fake hub serves them (branch -> folder); upper_codebook other than mcg: unmixable branches."""
    return {
        MIX_LOWER: make_quant(root / MIX_LOWER, 2),
        MIX_UPPER: make_quant(root / MIX_UPPER, 4, codebook=upper_codebook),
    }
