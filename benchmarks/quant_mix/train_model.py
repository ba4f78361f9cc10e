"""Train a tiny GLM-4 MoE (Glm4MoeForCausalLM layout, BF16) on exllamav3's bundled text, so it has structure.

Random weights do not reward what the GLM-4.7 card's mixing heuristics assume (attention and shared experts matter
more per bit than routed experts): a model trained on real text does. The forward here follows transformers'
Glm4Moe (and exllamav3's architecture/glm4_moe.py): q/k/v with bias, per-head RMS q/k norm, NEOX rotary on the
first half of each head, GQA, one dense layer then MoE layers with a sigmoid router (top-k on score + correction
bias, weights normalized and scaled by routed_scaling_factor) plus one shared expert. The checkpoint uses the same
tensor names as ../spotcheck_gpu/make_model.py, which exllamav3 converts. The last 5 % of every bundled text file is
held out: eval_ids.npy (rows of --eval-len tokens) is what the KL measurement reads.

Usage: python3 train_model.py OUT_DIR [--seconds 100]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

HIDDEN, LAYERS, N_Q, N_KV, HEAD_DIM = 1024, 6, 8, 2, 128
INTER, MOE_INTER, EXPERTS, TOP_K, DENSE = 2048, 256, 16, 4, 1
ROTARY, THETA, EPS, SCALING = HEAD_DIM // 2, 1_000_000.0, 1e-5, 2.5


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalize in fp32, cast back, multiply by the weight."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotary on the first ROTARY dims of each head, the rest passed through (partial_rotary_factor 0.5)."""
    rot, rest = x[..., :ROTARY], x[..., ROTARY:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, N_Q * HEAD_DIM, bias=True)
        self.k_proj = nn.Linear(HIDDEN, N_KV * HEAD_DIM, bias=True)
        self.v_proj = nn.Linear(HIDDEN, N_KV * HEAD_DIM, bias=True)
        self.o_proj = nn.Linear(N_Q * HEAD_DIM, HIDDEN, bias=False)
        self.q_norm, self.k_norm = RMSNorm(HEAD_DIM), RMSNorm(HEAD_DIM)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, N_Q, HEAD_DIM)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, N_KV, HEAD_DIM)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, N_KV, HEAD_DIM).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, N_Q * HEAD_DIM))


class MLP(nn.Module):
    def __init__(self, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, inter, bias=False)
        self.up_proj = nn.Linear(HIDDEN, inter, bias=False)
        self.down_proj = nn.Linear(inter, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(EXPERTS, HIDDEN) * 0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(EXPERTS))


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Router()
        self.experts = nn.ModuleList(MLP(MOE_INTER) for _ in range(EXPERTS))
        self.shared_experts = MLP(MOE_INTER)
        self.aux = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, HIDDEN)
        scores = torch.sigmoid(F.linear(flat.float(), self.gate.weight.float()))
        chosen = torch.topk(scores + self.gate.e_score_correction_bias, TOP_K, dim=-1).indices
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * SCALING
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, (expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype)))
        # Switch-style balance term: keeps every routed expert in use (a collapsed router would leave experts
        # untrained and tell nothing about mixing them).
        load = F.one_hot(chosen, EXPERTS).float().sum(1).mean(0) / TOP_K
        share = (scores / scores.sum(-1, keepdim=True)).mean(0)
        self.aux = EXPERTS * (load * share).sum()
        return (out + self.shared_experts(flat)).reshape(shape)


class Block(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.mlp = MLP(INTER) if index < DENSE else MoE()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, HIDDEN)
        self.layers = nn.ModuleList(Block(i) for i in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        inv = 1.0 / (THETA ** (torch.arange(0, ROTARY, 2, device=ids.device).float() / ROTARY))
        freqs = torch.outer(torch.arange(t, device=ids.device).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    def aux_loss(self) -> torch.Tensor:
        return sum(layer.mlp.aux for layer in self.layers if isinstance(layer.mlp, MoE))


def checkpoint(model: Model) -> dict[str, torch.Tensor]:
    """transformers' Glm4Moe tensor names (model.layers.N...., lm_head.weight), BF16; the correction bias FP32."""
    out = {}
    for name, tensor in model.state_dict().items():
        key = name if name.startswith("lm_head") else f"model.{name}"
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        out[key] = tensor.detach().to("cpu", dtype).contiguous()
    return out


def calibration_folder() -> str:
    """exllamav3's bundled calibration text (the converter's own calibration data)."""
    import exllamav3

    return os.path.join(os.path.dirname(exllamav3.__file__), "conversion/standard_cal_data")


def tokenizer_and_text(out: str, folder: str) -> tuple[Tokenizer, list[str]]:
    """A 4096-token byte-level BPE trained on all of the bundled text files."""
    texts = [Path(f).read_text(encoding="utf8") for f in sorted(glob.glob(f"{folder}/*.utf8"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>", "[gMASK]", "<sop>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    joined = "\n".join(texts)
    tok.train_from_iterator([joined[i : i + 20000] for i in range(0, len(joined), 20000)], trainer)
    tok.save(f"{out}/tokenizer.json")
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
    return tok, texts


def write_config(out: str, vocab: int) -> None:
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": N_Q,
        "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM,
        "partial_rotary_factor": 0.5,
        "intermediate_size": INTER,
        "moe_intermediate_size": MOE_INTER,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "first_k_dense_replace": DENSE,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "routed_scaling_factor": SCALING,
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


def main() -> None:
    """Tokenize, hold out 5 % per file, train for --seconds, write the checkpoint, eval rows and a log."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cal-dir", help="the text folder (default: exllamav3's standard_cal_data)")
    args = parser.parse_args()
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    tok, texts = tokenizer_and_text(args.out, args.cal_dir or calibration_folder())
    vocab = tok.get_vocab_size()
    train, held = [], []
    for text in texts:
        ids = tok.encode(text).ids
        cut = int(len(ids) * 0.95)
        train += ids[:cut]
        held += ids[cut:]
    train_ids = torch.tensor(train, dtype=torch.long, device=device)
    rows = len(held) // args.eval_len
    eval_ids = np.array(held[: rows * args.eval_len], dtype=np.int64).reshape(rows, args.eval_len)
    step = max(1, rows // args.eval_rows)
    eval_ids = eval_ids[::step][: args.eval_rows]
    np.save(f"{args.out}/eval_ids.npy", eval_ids)
    model = Model(vocab).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    log = {
        "seed": args.seed,
        "train_tokens": len(train),
        "held_out_tokens": len(held),
        "eval_rows": eval_ids.shape,
        "losses": [],
    }
    started, steps = time.monotonic(), 0
    while time.monotonic() - started < args.seconds:
        frac = min(1.0, (time.monotonic() - started) / args.seconds)
        lr = 2e-3 * min(1.0, (steps + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in optim.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), device=device)
        window = train_ids[starts[:, None] + torch.arange(args.seq + 1, device=device)]
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1))
            total = loss + 0.01 * model.aux_loss()
        optim.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        steps += 1
        if steps % 100 == 0:
            log["losses"].append([steps, round(time.monotonic() - started, 1), round(loss.item(), 4)])
            print(f"step {steps} {time.monotonic() - started:.0f}s loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        ids = torch.tensor(eval_ids, device=device)
        nll = [
            F.cross_entropy(model(ids[i : i + 8])[:, :-1].reshape(-1, vocab), ids[i : i + 8, 1:].reshape(-1))
            for i in range(0, len(ids), 8)
        ]
    log.update(
        steps=steps,
        seconds=round(time.monotonic() - started, 1),
        torch_eval_ppl=math.exp(torch.stack(nll).mean().item()),
    )
    write_config(args.out, vocab)
    save_file(checkpoint(model), f"{args.out}/model.safetensors", metadata={"format": "pt"})
    with open(f"{args.out}/train_log.json", "w") as handle:
        json.dump(log, handle, indent=1, default=str)
    print(
        f"trained {steps} steps in {log['seconds']} s; held-out perplexity (torch) {log['torch_eval_ppl']:.2f}"
    )


if __name__ == "__main__":
    main()
