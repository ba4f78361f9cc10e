"""Write a tiny random-weight GLM-4 MoE checkpoint (Glm4MoeForCausalLM, BF16) with a 4096-token byte-level BPE.

Adapted from ../shared/device/make_tiny_glm.py (the proven recipe) with one change the device README suggests:
a larger lm_head scale (--head-std), so next-token distributions are peaked like a trained model's (mean top-1
probability ~0.3-0.5 instead of ~0.12). A flat distribution would put most mass beyond any top-K and measure the
estimator's truncation rather than the quants.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def main() -> None:
    """Tokenizer trained on exllamav3's bundled calibration text; weights from a fixed seed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--head-std", type=float, default=0.16)
    args = parser.parse_args()
    import exllamav3

    out = args.out
    os.makedirs(out, exist_ok=True)
    cal = os.path.join(os.path.dirname(exllamav3.__file__), "conversion/standard_cal_data/wiki.utf8")
    with open(cal, encoding="utf8") as handle:
        text = handle.read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>", "[gMASK]", "<sop>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 20000] for i in range(0, len(text), 20000)], trainer)
    tok.save(f"{out}/tokenizer.json")
    vocab = tok.get_vocab_size()
    with open(f"{out}/tokenizer_config.json", "w") as handle:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "model_max_length": 8192,
                "chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                "<|assistant|>\n",
            },
            handle,
        )
    hidden, layers, n_q, n_kv, head_dim, inter, moe_inter, experts, top_k = (
        1024,
        6,
        8,
        2,
        128,
        2048,
        256,
        16,
        4,
    )
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": n_q,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "partial_rotary_factor": 0.5,
        "intermediate_size": inter,
        "moe_intermediate_size": moe_inter,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": top_k,
        "first_k_dense_replace": 1,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": True,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eos_token_id": 0,
        "num_nextn_predict_layers": 0,
    }
    with open(f"{out}/config.json", "w") as handle:
        json.dump(config, handle, indent=1)
    generator = torch.Generator().manual_seed(0)

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    t = {
        "model.embed_tokens.weight": w(vocab, hidden, std=1.0),
        "model.norm.weight": ones(hidden),
        "lm_head.weight": w(vocab, hidden, std=args.head_std),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ones(hidden)
        t[p + "post_attention_layernorm.weight"] = ones(hidden)
        a = p + "self_attn."
        for name, rows in (
            ("q_proj", n_q * head_dim),
            ("k_proj", n_kv * head_dim),
            ("v_proj", n_kv * head_dim),
        ):
            t[a + name + ".weight"] = w(rows, hidden)
            t[a + name + ".bias"] = w(rows)
        t[a + "o_proj.weight"] = w(hidden, n_q * head_dim)
        t[a + "q_norm.weight"] = ones(head_dim)
        t[a + "k_norm.weight"] = ones(head_dim)
        m = p + "mlp."
        if i < 1:
            t[m + "gate_proj.weight"] = w(inter, hidden)
            t[m + "up_proj.weight"] = w(inter, hidden)
            t[m + "down_proj.weight"] = w(hidden, inter)
            continue
        t[m + "gate.weight"] = w(experts, hidden, std=0.1)
        t[m + "gate.e_score_correction_bias"] = torch.zeros(experts, dtype=torch.float32)
        for e in [*(f"experts.{j}." for j in range(experts)), "shared_experts."]:
            t[m + e + "gate_proj.weight"] = w(moe_inter, hidden)
            t[m + e + "up_proj.weight"] = w(moe_inter, hidden)
            t[m + e + "down_proj.weight"] = w(hidden, moe_inter)
    save_file(
        {k: v.contiguous() for k, v in t.items()}, f"{out}/model.safetensors", metadata={"format": "pt"}
    )
    print(
        "tiny model",
        out,
        "vocab",
        vocab,
        "params",
        sum(v.numel() for v in t.values()),
        "head_std",
        args.head_std,
    )


if __name__ == "__main__":
    main()
