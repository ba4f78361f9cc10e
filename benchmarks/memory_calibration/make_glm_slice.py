"""Write a GLM-4.7-shaped EXL3 slice: real widths, few layers, random EXL3 tensors, so loads show GLM-scale memory.

Converting a 160-expert layer with exllamav3's quantizer takes minutes; memory depends only on the tensors' shapes
and dtypes, so this writes them directly in the layout exllamav3 1.6.5's converter produces
(modules/quant/exl3_lib/quantize.py: per Linear `trellis` int16 [in/16, out/16, 16*K], `suh` fp16 [in],
`svh` fp16 [out], a `mul1` int32 codebook marker; conversion/compile.py: config.json `quantization_config`).
Values are random but bounded (random trellis states decode to unit-variance weights, `svh` = 1/sqrt(in)), so a
forward pass stays finite. Dimensions: ../../../shared/facts/glm-4.7.md.

    python3 make_glm_slice.py OUT_DIR [--dense 1] [--moe 2] [--bits 4] [--head-bits 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

# GLM-4.7 (zai-org/GLM-4.7 config.json; ../../../shared/facts/glm-4.7.md)
HIDDEN = 5120
Q_HEADS, KV_HEADS, HEAD_DIM = 96, 8, 128
DENSE_INTERMEDIATE = 12288
MOE_INTERMEDIATE = 1536
ROUTED_EXPERTS, SHARED_EXPERTS, TOP_K = 160, 1, 8
VOCAB = 151552
MAX_POSITIONS = 202752
MUL1_MARKER = 0x83DCD12D  # exllamav3 quantize.py codebook_mul1_mult: the default (mul1) codebook's marker
POOL_VALUES = 1 << 24  # random values are drawn once and repeated: memory only depends on shapes

DTYPE_BYTES = {"I16": 2, "F16": 2, "BF16": 2, "F32": 4, "I32": 4}


class Pools:
    """Pre-drawn random byte pools, one per kind of tensor content, repeated to any length."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.trellis = rng.integers(-32768, 32768, POOL_VALUES, dtype=np.int16).tobytes()
        normal = rng.standard_normal(POOL_VALUES, dtype=np.float32)
        self.bf16_normal = (normal.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        self.f16_small = (normal * 0.02).astype(np.float16).tobytes()
        self.signs = np.where(rng.integers(0, 2, POOL_VALUES) > 0, 1.0, -1.0).astype(np.float16)

    @staticmethod
    def repeat(pool: bytes, nbytes: int) -> list[bytes | memoryview]:
        """The pool's bytes repeated to exactly nbytes, as pieces to write without concatenating."""
        view = memoryview(pool)
        pieces: list[bytes | memoryview] = []
        while nbytes > 0:
            take = min(nbytes, len(view))
            pieces.append(view[:take])
            nbytes -= take
        return pieces


class Shard:
    """One safetensors file, written from (name, dtype, shape, pieces) entries without holding it in memory."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, list[int], list[bytes | memoryview]]] = []

    def add(self, name: str, dtype: str, shape: list[int], pieces: list[bytes | memoryview]) -> None:
        assert sum(len(p) for p in pieces) == int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype], name
        self.entries.append((name, dtype, shape, pieces))

    def nbytes(self) -> int:
        return sum(sum(len(p) for p in pieces) for _, _, _, pieces in self.entries)

    def write(self, path: Path) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, pieces in self.entries:
            size = sum(len(p) for p in pieces)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, _, _, pieces in self.entries:
                f.writelines(pieces)


def f16(values: np.ndarray) -> list[bytes | memoryview]:
    """A small fp16 tensor's bytes."""
    return [values.astype(np.float16).tobytes()]


def add_exl3_linear(
    shard: Shard, pools: Pools, key: str, in_f: int, out_f: int, bits: int, bias: bool
) -> None:
    """One EXL3 Linear as exllamav3's converter stores it (integer bitrate, mul1 codebook)."""
    shard.add(
        f"{key}.trellis",
        "I16",
        [in_f // 16, out_f // 16, 16 * bits],
        Pools.repeat(pools.trellis, in_f * out_f * bits // 8),
    )
    shard.add(f"{key}.suh", "F16", [in_f], f16(pools.signs[:in_f]))
    shard.add(f"{key}.svh", "F16", [out_f], f16(pools.signs[:out_f].astype(np.float32) / np.sqrt(in_f)))
    shard.add(f"{key}.mul1", "I32", [], [np.array([MUL1_MARKER], dtype=np.uint32).tobytes()])
    if bias:
        shard.add(f"{key}.bias", "F16", [out_f], f16(np.zeros(out_f)))


def layer_shard(pools: Pools, idx: int, dense: bool, bits: int) -> Shard:
    """Attention + (dense MLP or 160-expert MoE with one shared expert) of one decoder layer."""
    shard, p = Shard(), f"model.layers.{idx}."
    shard.add(p + "input_layernorm.weight", "F16", [HIDDEN], f16(np.ones(HIDDEN)))
    shard.add(p + "post_attention_layernorm.weight", "F16", [HIDDEN], f16(np.ones(HIDDEN)))
    a = p + "self_attn."
    add_exl3_linear(shard, pools, a + "q_proj", HIDDEN, Q_HEADS * HEAD_DIM, bits, bias=True)
    add_exl3_linear(shard, pools, a + "k_proj", HIDDEN, KV_HEADS * HEAD_DIM, bits, bias=True)
    add_exl3_linear(shard, pools, a + "v_proj", HIDDEN, KV_HEADS * HEAD_DIM, bits, bias=True)
    add_exl3_linear(shard, pools, a + "o_proj", Q_HEADS * HEAD_DIM, HIDDEN, bits, bias=False)
    m = p + "mlp."
    if dense:
        for name, i, o in (
            ("gate_proj", HIDDEN, DENSE_INTERMEDIATE),
            ("up_proj", HIDDEN, DENSE_INTERMEDIATE),
            ("down_proj", DENSE_INTERMEDIATE, HIDDEN),
        ):
            add_exl3_linear(shard, pools, m + name, i, o, bits, bias=False)
        return shard
    shard.add(
        m + "gate.weight",
        "F16",
        [ROUTED_EXPERTS, HIDDEN],
        Pools.repeat(pools.f16_small, ROUTED_EXPERTS * HIDDEN * 2),
    )
    shard.add(
        m + "gate.e_score_correction_bias",
        "F32",
        [ROUTED_EXPERTS],
        [np.zeros(ROUTED_EXPERTS, dtype=np.float32).tobytes()],
    )
    prefixes = [f"{m}experts.{e}." for e in range(ROUTED_EXPERTS)] + [m + "shared_experts."]
    for x in prefixes:
        add_exl3_linear(shard, pools, x + "gate_proj", HIDDEN, MOE_INTERMEDIATE, bits, bias=False)
        add_exl3_linear(shard, pools, x + "up_proj", HIDDEN, MOE_INTERMEDIATE, bits, bias=False)
        add_exl3_linear(shard, pools, x + "down_proj", MOE_INTERMEDIATE, HIDDEN, bits, bias=False)
    return shard


def config_json(layers: int, dense: int, bits: int, head_bits: int) -> dict[str, object]:
    """GLM-4.7's config.json with the slice's layer count and an EXL3 quantization_config."""
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "partial_rotary_factor": 0.5,
        "intermediate_size": DENSE_INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "n_routed_experts": ROUTED_EXPERTS,
        "n_shared_experts": SHARED_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "first_k_dense_replace": dense,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": False,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 0,
        "num_nextn_predict_layers": 0,
        "quantization_config": {
            "quant_method": "exl3",
            "version": "1.6.5",
            "bits": float(bits),
            "head_bits": head_bits,
            "codebook": "mul1",
            "note": "synthesized by benchmarks/memory_calibration/make_glm_slice.py",
        },
    }


def write_tokenizer(out: Path) -> None:
    """A 4096-token byte-level BPE trained on exllamav3's bundled text (ids past it are masked by the sampler)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("exllamav3 is not installed: its bundled calibration text trains the tokenizer")
    cal = Path(next(iter(spec.submodule_search_locations))) / "conversion/standard_cal_data/wiki.utf8"
    text = cal.read_text(encoding="utf8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>", "[gMASK]", "<sop>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 20000] for i in range(0, len(text), 20000)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "model_max_length": MAX_POSITIONS,
                "chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}<|assistant|>\n",
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--dense", type=int, default=1, help="dense layers first (GLM-4.7: first_k_dense_replace)"
    )
    parser.add_argument("--moe", type=int, default=2, help="MoE layers after them")
    parser.add_argument(
        "--bits", type=int, default=4, choices=range(1, 9), help="bits per weight of every Linear"
    )
    parser.add_argument("--head-bits", type=int, default=6, choices=range(1, 9))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    layers = args.dense + args.moe
    pools = Pools(args.seed)

    head = Shard()
    head.add(
        "model.embed_tokens.weight",
        "BF16",
        [VOCAB, HIDDEN],
        Pools.repeat(pools.bf16_normal, VOCAB * HIDDEN * 2),
    )
    head.add("model.norm.weight", "F16", [HIDDEN], f16(np.ones(HIDDEN)))
    add_exl3_linear(head, pools, "lm_head", HIDDEN, VOCAB, args.head_bits, bias=False)
    shards = [layer_shard(pools, i, i < args.dense, args.bits) for i in range(layers)] + [head]

    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        shard.write(out / name)
        total += shard.nbytes()
        weight_map.update({entry[0]: name for entry in shard.entries})
        print(f"wrote {name}: {shard.nbytes() / 2**30:.3f} GiB", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(
        json.dumps(config_json(layers, args.dense, args.bits, args.head_bits), indent=1)
    )
    write_tokenizer(out)
    print(
        f"slice: {layers} layers ({args.dense} dense), {args.bits} bpw, head {args.head_bits} bits, "
        f"{total / 2**30:.3f} GiB in {len(shards)} files -> {out}",
        flush=True,
    )


if __name__ == "__main__":
    os.umask(0o022)
    main()
