"""Write a tiny GLM-4.7-shaped checkpoint (Glm4MoeForCausalLM, BF16) that follows a fixed script after <|assistant|>.

A random-weight model never writes `</think>`, so the reasoning split of a real TabbyAPI cannot be observed with
one. This model is a bigram machine: every attention o_proj and every MLP/expert down_proj is exactly zero, so the
residual stream reaching the final norm is the token's own embedding, and the lm_head row of each script token is
aligned with the (normalized) embedding of its predecessor in the script. After `<|assistant|>` it therefore writes

    <think> REASONING </think> ANSWER <|endoftext|>

with a logit margin of ~50 nats (greedy and temperature-1 sampling agree). Every script token is distinct (one
successor per token). Elsewhere (prompt text) the next-token distribution is a random, fairly flat one.

Tokenizer: byte-level BPE trained on exllamav3's bundled text with GLM-4.7's special tokens; tokenizer_config.json
carries a GLM-4.7-style chat template whose generation prompt ends in `<|assistant|><think>` (GLM-4.7 opens the
think block itself; TabbyAPI's start_in_reasoning "auto" then treats the output as reasoning up to `</think>`).
Like GLM-4.7 (vocab_size 151552 > its tokenizer), config.json's vocab_size is padded beyond the tokenizer's ids;
the padded lm_head rows are zero (logit 0).

Needs numpy and tokenizers only (no torch), so it runs, and is checked, on a CPU machine too:
    python3 make_scripted_glm.py OUT_DIR [--check]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# GLM-4.7's special tokens (zai-org/GLM-4.7 tokenizer_config.json added tokens), first ids of this vocabulary
SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
]
TOKENIZER_VOCAB = 4096  # ids 0..4095 (specials included)
MODEL_VOCAB = 4096 + 128  # padded like GLM-4.7's 151552
REASONING = "The user wants France's capital city"
ANSWER = "Paris is where French government sits."
MARGIN_LOGIT = 60.0  # logit of the scripted successor; the others are ~N(0, 2)
HIDDEN, HEAD_DIM, Q_HEADS, KV_HEADS = 1024, 128, 8, 2
INTERMEDIATE, MOE_INTERMEDIATE, EXPERTS, TOP_K = 2048, 256, 16, 4
LAYERS = 2  # layer 0 dense, layer 1 MoE (GLM-4.7: first_k_dense_replace 3 of 92)

# A GLM-4.7-style template (reasoning of the last assistant turn kept, <think> opened by the generation prompt)
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- macro visible_text(content) -%}"
    "{%- if content is string -%}{{- content }}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for item in content -%}{%- if item is mapping and item.type == 'text' -%}{{- item.text }}"
    "{%- elif item is string -%}{{- item }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{- content }}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|system|>{{ visible_text(m.content) }}"
    "{%- elif m.role == 'user' -%}<|user|>{{ visible_text(m.content) }}"
    "{%- elif m.role == 'assistant' -%}<|assistant|>"
    "{%- set content = visible_text(m.content) -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "</think>{{ content.strip() }}"
    "{%- elif m.role == 'tool' -%}<|observation|><tool_response>{{ visible_text(m.content) }}</tool_response>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{{- '</think>' if (enable_thinking is defined and not enable_thinking) else '<think>' -}}"
    "{%- endif -%}"
)

DTYPES = {"BF16": 2, "F32": 4}


def calibration_text() -> str:
    """exllamav3's bundled wiki text (found without importing exllamav3, which needs torch)."""
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("exllamav3 is not installed (its bundled calibration text trains the tokenizer)")
    base = Path(next(iter(spec.submodule_search_locations)))
    return (base / "conversion/standard_cal_data/wiki.utf8").read_text(encoding="utf8")


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE of TOKENIZER_VOCAB ids, GLM-4.7's special tokens first."""
    text = calibration_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 20000] for i in range(0, len(text), 20000)], trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    return tok


def script_ids(tok: Tokenizer) -> list[int]:
    """<|assistant|> <think> REASONING </think> ANSWER <|endoftext|>, all ids distinct."""
    ids = [tok.token_to_id("<|assistant|>"), tok.token_to_id("<think>")]
    ids += tok.encode(REASONING, add_special_tokens=False).ids
    ids.append(tok.token_to_id("</think>"))
    ids += tok.encode(ANSWER, add_special_tokens=False).ids
    ids.append(tok.token_to_id("<|endoftext|>"))
    if len(set(ids)) != len(ids):
        dupes = sorted({tok.id_to_token(i) for i in ids if ids.count(i) > 1})
        raise SystemExit(f"script tokens repeat ({dupes}): change REASONING / ANSWER")
    return ids


def bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rms_normalize(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """The final RMSNorm with weight 1 (what the lm_head sees)."""
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file from (dtype, shape, raw bytes) entries."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        assert len(raw) == int(np.prod(shape)) * DTYPES[dtype], name
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, _, raw in tensors.values():
            f.write(raw)


def build(out: Path) -> dict[str, object]:
    """Write tokenizer, configs and weights; return the script and the margins it was built with."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    script = script_ids(tok)
    eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "clean_up_tokenization_spaces": False,
                "do_lower_case": False,
                "model_max_length": 202752,
                "padding_side": "left",
                "remove_space": False,
                "chat_template": CHAT_TEMPLATE,
                "added_tokens_decoder": {
                    str(tok.token_to_id(s)): {
                        "content": s,
                        "special": True,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "single_word": False,
                    }
                    for s in SPECIALS
                },
            },
            indent=1,
        )
    )
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "partial_rotary_factor": 0.5,
        "intermediate_size": INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "first_k_dense_replace": 1,
        "vocab_size": MODEL_VOCAB,
        "max_position_embeddings": 202752,
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
        "eos_token_id": eos,
        "pad_token_id": eos[0],
        "num_nextn_predict_layers": 0,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": eos[0]}, indent=1)
    )

    rng = np.random.default_rng(47)
    tensors: dict[str, tuple[str, list[int], bytes]] = {}

    def put(name: str, values: np.ndarray) -> None:
        tensors[name] = ("BF16", list(values.shape), bf16(values).tobytes())

    def rand(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * std

    embed_bits = bf16(rand(MODEL_VOCAB, HIDDEN, std=1.0))
    tensors["model.embed_tokens.weight"] = ("BF16", [MODEL_VOCAB, HIDDEN], embed_bits.tobytes())
    normed = rms_normalize(from_bf16(embed_bits)).astype(np.float32)
    head = rand(MODEL_VOCAB, HIDDEN, std=1.0 / np.sqrt(HIDDEN))  # logits ~N(0, 1) away from the script
    head[TOKENIZER_VOCAB:] = 0.0  # padded ids: logit 0
    for prev, nxt in itertools.pairwise(script):
        head[nxt] = normed[prev] * (MARGIN_LOGIT / HIDDEN)  # logit MARGIN_LOGIT after `prev`
    head_bits = bf16(head)
    tensors["lm_head.weight"] = ("BF16", [MODEL_VOCAB, HIDDEN], head_bits.tobytes())
    put("model.norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", np.ones(HIDDEN, dtype=np.float32))
        put(p + "post_attention_layernorm.weight", np.ones(HIDDEN, dtype=np.float32))
        a = p + "self_attn."
        for name, rows in (
            ("q_proj", Q_HEADS * HEAD_DIM),
            ("k_proj", KV_HEADS * HEAD_DIM),
            ("v_proj", KV_HEADS * HEAD_DIM),
        ):
            put(a + name + ".weight", rand(rows, HIDDEN))
            put(a + name + ".bias", rand(rows))
        put(a + "o_proj.weight", np.zeros((HIDDEN, Q_HEADS * HEAD_DIM), dtype=np.float32))
        m = p + "mlp."
        if i == 0:
            put(m + "gate_proj.weight", rand(INTERMEDIATE, HIDDEN))
            put(m + "up_proj.weight", rand(INTERMEDIATE, HIDDEN))
            put(m + "down_proj.weight", np.zeros((HIDDEN, INTERMEDIATE), dtype=np.float32))
            continue
        put(m + "gate.weight", rand(EXPERTS, HIDDEN, std=0.1))
        tensors[m + "gate.e_score_correction_bias"] = (
            "F32",
            [EXPERTS],
            np.zeros(EXPERTS, np.float32).tobytes(),
        )
        for e in [*(f"experts.{j}." for j in range(EXPERTS)), "shared_experts."]:
            put(m + e + "gate_proj.weight", rand(MOE_INTERMEDIATE, HIDDEN))
            put(m + e + "up_proj.weight", rand(MOE_INTERMEDIATE, HIDDEN))
            put(m + e + "down_proj.weight", np.zeros((HIDDEN, MOE_INTERMEDIATE), dtype=np.float32))
    write_safetensors(out / "model.safetensors", tensors)

    # What the weights imply (o_proj = down_proj = 0: final hidden = embedding): margin of every script step
    logits = normed[script[:-1]] @ from_bf16(head_bits).T
    steps = []
    for row, nxt in zip(logits, script[1:]):
        others = np.delete(row, nxt)
        steps.append(
            {
                "next": tok.id_to_token(nxt),
                "logit": round(float(row[nxt]), 2),
                "best_other": round(float(others.max()), 2),
            }
        )
    record = {
        "script_ids": script,
        "script_tokens": [tok.id_to_token(i) for i in script],
        "reasoning": REASONING,
        "answer": ANSWER,
        "eos_token_ids": eos,
        "tokenizer_vocab": TOKENIZER_VOCAB,
        "model_vocab": MODEL_VOCAB,
        "min_margin_nats": round(min(s["logit"] - s["best_other"] for s in steps), 2),
        "steps": steps,
    }
    (out / "script.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    record = build(args.out)
    print(
        f"scripted GLM written to {args.out}: {len(record['script_ids'])} script tokens, "
        f"min margin {record['min_margin_nats']} nats: {' '.join(record['script_tokens'])}"
    )
    if record["min_margin_nats"] < 20:
        raise SystemExit("margin below 20 nats: the script would not be followed reliably")


if __name__ == "__main__":
    main()
