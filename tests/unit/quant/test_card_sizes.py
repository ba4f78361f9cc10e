"""The card's sizes checked against exact bytes.

Every uniform GLM-4.7 branch on the card (2, 3, 4 bpw with a 6-bit head; 5, 6, 8 bpw with an 8-bit head) is
synthesized by the GLM-4.7 storage test double (glm47_storage: exllamav3's storage rules, which
test_storage_fixtures checks reproduce real exllamav3 files exactly) and read by read_storage. The card prints VRAM
weights rounded to whole GiB, so the exact size must lie within 0.5 GiB of the card's size_gib.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from tests.unit.quant import glm47_storage
from toolkit.facts.profiles import Quant, load_profile
from toolkit.plan.memory import weights_bytes
from toolkit.quant.sizes import CARD_ROUNDING_GIB, card_check
from toolkit.quant.storage import QUANT_CONFIG, QuantStorage, parse_storage, read_storage

GIB = 2**30
PROFILE = load_profile("glm-4.7")
UNIFORM = re.compile(r"^(\d+)bpw_H(\d+)\Z")
BRANCHES = [q for q in PROFILE.quants if UNIFORM.match(q.branch)]


@lru_cache(maxsize=8)
def storage_of(bits: float, head_bits: int) -> QuantStorage:
    return parse_storage(glm47_storage.quantization_config(bits, head_bits), "glm-4.7 test double")


def test_the_card_lists_six_uniform_branches_named_after_their_bits() -> None:
    assert [q.branch for q in BRANCHES] == ["2bpw_H6", "3bpw_H6", "4bpw_H6", "5bpw_H8", "6bpw_H8", "8bpw_H8"]
    for quant in BRANCHES:
        bits, head = UNIFORM.match(quant.branch).groups()  # type: ignore[union-attr]
        assert (quant.bpw, quant.head_bits) == (float(bits), int(head))


@pytest.mark.parametrize("quant", BRANCHES, ids=lambda q: q.branch)
def test_exact_vram_bytes_round_to_the_cards_size(quant: Quant) -> None:
    storage = storage_of(quant.bpw, quant.head_bits)
    check = card_check(storage, PROFILE, quant.branch)
    assert check is not None and check.agrees, check
    assert abs(storage.vram_bytes / GIB - quant.size_gib) <= CARD_ROUNDING_GIB
    assert storage.embedding_bytes == PROFILE.architecture.embedding_bytes  # 1.45 GiB in system RAM
    # The planner's memory model counts exactly what the files hold (trellis, suh/svh, biases, multipliers, the
    # FP16 router, norms): a bpw-only formula would be 0.66-0.71 GiB short.
    assert weights_bytes(PROFILE.architecture, quant) == storage.vram_bytes
    bpw_only = (
        quant.bpw * PROFILE.architecture.linear_params + quant.head_bits * PROFILE.architecture.head_params
    ) / 8
    assert 0.6 * GIB < storage.vram_bytes - bpw_only < 0.75 * GIB


def test_a_branch_compared_with_another_branchs_card_entry_disagrees() -> None:
    check = card_check(storage_of(2.0, 6), PROFILE, "3bpw_H6")
    assert check is not None and not check.agrees and check.difference_gib < -40
    assert card_check(storage_of(2.0, 6), PROFILE, "not-on-the-card") is None


def test_group_shares_match_the_models_parameter_shares() -> None:
    """The facts: of GLM-4.7's 352.8 B weights (92 layers, head, embedding), routed experts are 95.2 %, attention
    3.6 %, shared experts 0.6 %, dense MLPs 0.16 %."""
    storage = storage_of(4.0, 6)
    weights: dict[str, int] = {}
    for module in storage.modules.values():
        weights[module.group] = weights.get(module.group, 0) + module.weights
    arch = PROFILE.architecture
    total = arch.linear_params + arch.head_params + arch.vocab_size * arch.hidden_size
    assert round(total / 1e9, 1) == 352.8
    routed = weights["routed_gate_up"] + weights["routed_down"]
    assert round(100 * routed / total, 1) == 95.2
    assert round(100 * weights["attention"] / total, 1) == 3.6
    assert round(100 * weights["shared_experts"] / total, 1) == 0.6
    assert round(100 * weights["dense_mlp"] / total, 2) == 0.16
    router = arch.n_routed_experts * arch.hidden_size * (arch.num_hidden_layers - arch.first_k_dense_replace)
    assert sum(weights.values()) - weights["head"] == arch.linear_params - router  # the router is FP16
    assert weights["head"] == arch.head_params


def test_the_real_sized_file_reads_within_the_cap(tmp_path: Path) -> None:
    """The file exllamav3 writes for GLM-4.7 (~51 MiB, 43,824 modules) passes the size cap and reads exactly."""
    text = glm47_storage.quantization_config_text(8.0, 8)
    (tmp_path / QUANT_CONFIG).write_text(text)
    storage = read_storage(tmp_path)
    assert len(storage.modules) == 43824 and storage.codebook == "mcg"
    assert storage.vram_bytes == storage_of(8.0, 8).vram_bytes
    assert json.loads(text)["tensor_storage"].keys() == storage.modules.keys()
