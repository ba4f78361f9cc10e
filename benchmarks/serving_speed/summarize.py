"""The tables of RESULTS.md from the raw device records (results-call2.json, results-call3.json), and the per-layer
bandwidth fraction and the 92-layer extrapolation, with the method written out. No GPU needed:

    python3 benchmarks/serving_speed/summarize.py

Method (decode, batch 1):
- time per token (TPOT) = (last chunk - first chunk) / (completion_tokens - 1) of each request, median over the
  requests of concurrency 1 (the decode phase only: no prefill, no HTTP set-up).
- Two slices that differ only in MoE layers (1 dense + 3 MoE, 1 dense + 1 MoE): per MoE layer
  M = (TPOT_4l - TPOT_2l) / 2; the rest of the 2-layer slice, F + D = TPOT_2l - M (F: head, embedding, sampling,
  framework; D: the dense layer), is not separable with two points, so GLM-4.7 (3 dense + 89 MoE layers) is
  bracketed by D = 0 and D = F + D: TPOT_92 = (F + D) + 2 D + 89 M, i.e. between (F + D) + 89 M and 3 (F + D) + 89 M.
- Bandwidth bound per part = bytes read per generated token / measured copy bandwidth (read + written), bytes from
  the slice's safetensors headers: attention, router, shared expert, 8 / 160 of the routed experts, norms; the head
  once per token; FP16 KV cache at the requests' context (~0.9k tokens, negligible). Fraction = bound / measured.
- GLM-4.7 bytes at the slice's 4 bpw (head 6 bits) = 3 dense layers + 89 MoE layers + head of the slice's measured
  per-layer bytes; another quant scales the bound with its bytes, but not the measured time (see RESULTS.md).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20
GLM_DENSE, GLM_MOE = 3, 89


def load(call: str) -> dict:
    return json.loads((HERE / f"results-{call}.json").read_text())


def tpot(server: dict, concurrency: int = 1) -> float:
    """Median time per output token at a concurrency level, from the per-level summary."""
    level = next(level for level in server["levels"] if level["concurrency"] == concurrency)
    return level["tpot_s"]["median"]


def main() -> None:
    call2, call3 = load("call2"), load("call3")
    servers = {s["name"]: s for s in call2["servers"]}
    bw = call2["bandwidth"]["best_tb_s"] * 1e12
    print(
        f"Copy bandwidth: {call2['bandwidth']['best_tb_s']:.2f} TB/s best, {call2['bandwidth']['median_tb_s']:.2f} "
        f"median (call 2); {call3['bandwidth']['best_tb_s']:.2f} / {call3['bandwidth']['median_tb_s']:.2f} (call 3)\n"
    )

    print(
        "Decode, 1 dense + 3 MoE slice, FP16 cache, max_tokens 256, ban_eos_token, distinct ~750-token prompts:\n"
    )
    print(
        "| concurrency | requests | decode tok/s per request (median) | aggregate decode tok/s | output tok/s "
        "(wall) | TTFT median / p99 (s) | TPOT median (ms) | ITL per chunk median / p99 (ms) | tokens per chunk |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for level in servers["decode-4l"]["levels"]:
        print(
            f"| {level['concurrency']} | {level['requests']} | {level['decode_tokens_per_s_per_request']['median']:.0f} | "
            f"{level['decode_tokens_per_s_aggregate']:.0f} | {level['output_tokens_per_s']:.0f} | "
            f"{level['ttft_s']['median']:.3f} / {level['ttft_s']['p99']:.3f} | {1000 * level['tpot_s']['median']:.2f} | "
            f"{1000 * level['itl_chunk_s']['median']:.2f} / {1000 * level['itl_chunk_s']['p99']:.2f} | "
            f"{level['completion_tokens'] / level['requests'] / level['chunks_per_request']:.2f} |"
        )
    small = servers["decode-2l"]["levels"][0]
    print(
        f"\n1 dense + 1 MoE slice, concurrency 1: {small['decode_tokens_per_s_per_request']['median']:.0f} tok/s per "
        f"request, TPOT {1000 * small['tpot_s']['median']:.2f} ms."
    )

    t4, t2 = tpot(servers["decode-4l"]), tpot(servers["decode-2l"])
    moe = (t4 - t2) / 2
    rest = t2 - moe
    parts = call2["bytes_per_token"]["slice"]
    dense_bytes = next(layer["active"] for layer in parts["layers"] if layer["kind"] == "dense")
    moe_bytes = next(layer["active"] for layer in parts["layers"] if layer["kind"] == "moe")
    head = parts["head"]
    print("\nPer layer at batch 1 (bytes read per generated token at 4 bpw, head 6 bits):\n")
    print(
        "| part | MiB read per token | bound at measured bandwidth (us) | measured (us) | fraction of bound |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| MoE layer (attention {next(la['attention'] for la in parts['layers'] if la['kind'] == 'moe') / MIB:.1f} + "
        f"router + shared + 8/160 routed) | {moe_bytes / MIB:.1f} | {moe_bytes / bw * 1e6:.1f} | {moe * 1e6:.0f} | "
        f"{moe_bytes / bw / moe:.3f} |"
    )
    print(
        f"| rest of the 2-layer slice: dense layer + head + framework | {(dense_bytes + head) / MIB:.1f} | "
        f"{(dense_bytes + head) / bw * 1e6:.1f} | {rest * 1e6:.0f} | {(dense_bytes + head) / bw / rest:.3f} |"
    )
    print(
        f"| whole 4-layer slice | {(dense_bytes + 3 * moe_bytes + head) / MIB:.1f} | "
        f"{(dense_bytes + 3 * moe_bytes + head) / bw * 1e6:.1f} | {t4 * 1e6:.0f} | "
        f"{(dense_bytes + 3 * moe_bytes + head) / bw / t4:.3f} |"
    )

    glm_bytes = GLM_DENSE * dense_bytes + GLM_MOE * moe_bytes + head
    low = rest + GLM_MOE * moe
    high = 3 * rest + GLM_MOE * moe
    bound = glm_bytes / bw
    print(
        f"\nGLM-4.7 (3 dense + 89 MoE layers) at this 4 bpw / H6: {glm_bytes / 2**30:.2f} GiB read per token; "
        f"bandwidth bound {bound * 1e3:.2f} ms = {1 / bound:.0f} tok/s at batch 1 on one H200."
    )
    print(
        f"Extrapolated TPOT {low * 1e3:.1f}-{high * 1e3:.1f} ms = {1 / high:.1f}-{1 / low:.1f} tok/s at batch 1 "
        f"({bound / high:.3f}-{bound / low:.3f} of the bound), if per-layer time stays as measured here."
    )

    print(
        "\nPrefill, 1 dense + 3 MoE slice, FP16 cache 16384, one distinct ~8.3k-token prompt per request, "
        "max_tokens 1 (TTFT = prefill):\n"
    )
    print(
        "| chunk_size | call 2 (after a short warm-up; server order 2048, 512, 4096, 1024) tok/s | "
        "call 3 (after a long warm-up; order 2048, 512, 4096) tok/s | NVML after load / after prefill (MiB) |"
    )
    print("|---|---|---|---|")
    by3 = {s["name"]: s for s in call3["servers"]}
    for chunk in (512, 1024, 2048, 4096):
        name = f"prefill-4l-chunk{chunk}"
        cells = []
        for source in (servers, by3):
            server = source.get(name) or {}
            rates = [
                r["prefill_tokens_per_s"] for r in server.get("prefill", []) if r.get("prefill_tokens_per_s")
            ]
            cells.append(", ".join(f"{r / 1000:.1f}k" for r in rates) if rates else "not run (time)")
        mem = servers.get(name, {})
        print(
            f"| {chunk} | {cells[0]} | {cells[1]} | {mem.get('after_load_delta_mib')} / "
            f"{mem.get('after_work_delta_mib')} |"
        )
    warm = [
        r["prefill_tokens_per_s"]
        for name in ("prefill-4l-chunk2048", "prefill-4l-chunk512")
        for source in (servers, by3)
        for r in source.get(name, {}).get("prefill", [])[1:]
    ]
    per_layer = 8300 / statistics.median(warm) / 4
    print(
        f"\nPer layer (4-layer slice, warm 512/2048 samples, head ignored: logits of the last token only): "
        f"~{per_layer * 1e3:.0f} ms per 8.3k-token prompt per layer -> 92 layers ~{92 * per_layer:.1f} s = "
        f"~{8300 / (92 * per_layer):.0f} tok/s prefill (dense and MoE layers taken as equal; rough)."
    )


if __name__ == "__main__":
    main()
