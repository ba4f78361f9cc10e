# The reference entry point on exllamav3 1.6.5 (M: a model folder; default the BF16 tiny model), then the cached
# one-token computation it ships compared with exllamav3's plain forward at the same positions, full vocabulary.
set -u
[ -f /tmp/site/exllamav3_ext.so ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
gunzip -c .dev/exllamav3_ext-1.6.5-py312-cu130-sm90.so.gz > /tmp/site/exllamav3_ext.so; }
export PYTHONPATH=/tmp/site:$(pwd)/.dev/autokl PYTHONUNBUFFERED=1
echo "setup ${SECONDS} s"
[ -f /tmp/m/tiny-bf16/config.json ] || python3 .dev/autokl/make_tiny_glm.py /tmp/m/tiny-bf16 > /tmp/make.log 2>&1
export M=${M:-/tmp/m/tiny-bf16}
[ -f $M/config.json ] || timeout 90 python3 -m exllamav3.conversion.convert_model -i /tmp/m/tiny-bf16 -o $M -w /tmp/w4 -b 4 -cr 32 -cc 512 > /tmp/convert.log 2>&1 || { tail -5 /tmp/convert.log; exit 1; }
echo "model ${SECONDS} s"
python3 -P -m toolkit.verify.reference_entry --model-dir $M --out $OUT --model-commit smoke 2>&1 | grep -v "prompt [0-9]*/40" | tail -8
echo "entry exit ${PIPESTATUS[0]} at ${SECONDS} s"
python3 -P - <<'PY'
import numpy as np, os
from pathlib import Path
from toolkit.verify.exl3_backend import Exl3Backend
from toolkit.verify.kl import full_kl
from toolkit.verify.reference import load_reference
ref = load_reference(Path(os.environ["OUT"]) / "deployment-reference.json.gz")
b = Exl3Backend(Path(os.environ["M"])); b.load(int(ref.settings["max_seq_len"]))
kl, top1, rep = [], [], []
for p in ref.prompts:
    longest = max(p.positions, key=lambda s: s.token_count)
    ids, counts = list(longest.prefix_ids), [s.token_count for s in p.positions]
    c, c2, pl = b.logprobs_at(ids, counts), b.logprobs_at(ids, counts), b.plain_logprobs_at(ids, counts)
    kl += [full_kl(x, y) for x, y in zip(pl, c)]; rep += [full_kl(x, y) for x, y in zip(c, c2)]
    top1 += list(pl.argmax(1) == c.argmax(1))
    for s, row in zip(p.positions, c):
        assert s.top_ids[0] == int(row.argmax()), "stored top-1 differs from a recomputation"
print(f"positions {len(kl)}: KL(plain forward || cached one-token forward) mean {np.mean(kl):.3g} max {np.max(kl):.3g}; top-1 agreement {np.mean(top1):.3f}; repeat max {np.max(rep):.3g}; peak {b.peak_memory_mib()}")
PY
echo "done ${SECONDS} s"
