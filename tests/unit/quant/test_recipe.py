"""Recipes as data, sources exllamav3 can mix, and the exact plan of a mix (bytes from tensor_storage)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.errors import BadInput
from toolkit.quant.recipe import check_compatible, feasible_range, load_recipe, plan_mix, steps
from toolkit.quant.storage import QuantStorage, read_storage

from .exl3_folders import Shape, make_quant, wider


@pytest.fixture(scope="module")
def storages(tmp_path_factory) -> dict[int, QuantStorage]:
    root = tmp_path_factory.mktemp("quants")
    return {bits: read_storage(make_quant(root / f"{bits}bpw", bits)) for bits in (2, 3, 4, 6)}


def test_the_default_recipe_is_the_cards_order_with_its_source():
    recipe = load_recipe(None)
    assert recipe.name == "card" and "mratsim/GLM-4.7-EXL3" in recipe.source
    assert [u.groups for u in recipe.units] == [
        ("attention", "shared_experts", "dense_mlp"),
        ("routed_down",),
        ("routed_gate_up",),
    ]
    assert {u.order for u in recipe.units} == {"early_first"}


def test_a_recipe_file_is_read_and_hashed_by_its_units(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("units:\n  - groups: [routed_down]\n    order: late_first\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.units[0].order == "late_first"
    assert recipe.sha256 != load_recipe(None).sha256
    path.write_text("units:\n  - groups: [routed_down]\n    order: early_first\n")
    assert load_recipe(str(path)).sha256 != recipe.sha256


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("units:\n  - groups: [embedding]\n", "is not a tensor group"),
        ("units:\n  - groups: [attention]\n  - groups: [attention]\n", "names the group attention twice"),
        ("units:\n  - groups: [attention]\n    order: middle_first\n", "order: early_first|late_first"),
        ("units: []\n", "has no units"),
    ],
)
def test_bad_recipes_are_one_line(tmp_path, text, said):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadInput) as caught:
        load_recipe(str(path))
    assert said in caught.value.line() and "\n" not in caught.value.line()


def test_an_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(BadInput) as caught:
        load_recipe("nonesuch")
    assert caught.value.line() == "--recipe 'nonesuch' is not a recipe -- use one of card or a file"


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"codebook": "mul1"}, "codebook mul1 is not mcg"),
        ({"architecture": "Glm4ForCausalLM"}, "architecture Glm4ForCausalLM is not Glm4MoeForCausalLM"),
        ({"shape": wider(Shape(), moe=80)}, "does not quantize the same matrix"),
        (
            {"shape": wider(Shape(), experts=5)},
            "a module model.layers.1.mlp.experts.4.up_proj the other lacks",
        ),
        ({"shape": wider(Shape(), layers=2)}, "it has no module model.layers.2"),
    ],
)
def test_sources_exllamav3_cannot_mix_are_refused_naming_the_first_difference(
    tmp_path, storages, kwargs, said
):
    other = read_storage(make_quant(tmp_path / "other", 4, **kwargs))
    with pytest.raises(BadInput) as caught:
        check_compatible([("2bpw", storages[2]), ("other", other)])
    line = caught.value.line()
    assert line.startswith("other cannot be mixed with 2bpw: ") and said in line and "\n" not in line
    assert caught.value.exit_code == 2 and "same codebook" in line


def _mutated(storage: QuantStorage, key: str, **changes) -> QuantStorage:
    modules = dict(storage.modules)
    modules[key] = replace(modules[key], **changes)
    return replace(storage, modules=modules)


@pytest.mark.parametrize(
    ("key", "change", "said"),
    [
        ("model.norm", {"shapes": {"model.norm.weight": (64,)}}, "model.norm.weight shape [64] is not [128]"),
        ("model.norm", {"n_bytes": 512}, "another dtype"),
        (
            "model.layers.0.self_attn.q_proj",
            {"shapes": {}},
            "stored tensors [] are not",
        ),
    ],
)
def test_unquantized_shapes_dtypes_and_tensor_sets_must_match(storages, key, change, said):
    other = _mutated(storages[4], key, **change)
    with pytest.raises(BadInput, match=f"module {key}: .*{said.replace('[', '.').replace(']', '.')}"):
        check_compatible([("2bpw", storages[2]), ("4bpw", other)])


def test_an_original_linear_shape_is_its_suh_length_too(storages):
    key = "model.layers.0.self_attn.o_proj"
    shapes = dict(storages[4].modules[key].shapes)
    shapes[f"{key}.suh"] = (64,)
    with pytest.raises(BadInput, match=f"{key}.suh shape .64. is not .128."):
        check_compatible([("2bpw", storages[2]), ("4bpw", _mutated(storages[4], key, shapes=shapes))])


def test_same_model_quants_of_any_bits_mix(storages):
    check_compatible([(f"{b}bpw", s) for b, s in storages.items()])


def _expected_bytes(sources, overrides) -> int:
    by_id = dict(sources)
    base_id, base = sources[0]
    return sum(
        by_id[overrides.get(k, base_id)].modules[k].n_bytes
        for k, m in base.modules.items()
        if m.group != "embedding"
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), levels=st.sampled_from([(2, 4), (2, 3, 4), (3, 6), (2, 3, 4, 6)]))
def test_the_plan_is_exact_never_above_the_target_and_leaves_no_step_that_would_fit(storages, data, levels):
    sources = [(f"{b}bpw", storages[b]) for b in levels]
    recipe = load_recipe(None)
    low, high = feasible_range(sources, recipe)
    target = data.draw(st.integers(min_value=low, max_value=high))
    plan = plan_mix(sources, target, recipe)
    assert plan.predicted_bytes == _expected_bytes(sources, plan.overrides) <= target
    assert set(plan.overrides.values()) <= {sid for sid, _ in sources[1:]}
    room = target - plan.predicted_bytes
    order = [sid for sid, _ in sources]
    by_id = dict(sources)
    for step in steps(sources[0][1], recipe):
        chosen = {plan.source_of(k) for k in step}
        assert len(chosen) == 1  # a step moves as one
        (now,) = chosen
        for higher in order[order.index(now) + 1 :]:
            extra = sum(by_id[higher].modules[k].n_bytes - by_id[now].modules[k].n_bytes for k in step)
            assert extra > room  # greedy: nothing left out would still have fitted


def test_the_bounds_are_the_lowest_source_and_every_recipe_step_at_the_highest(storages):
    sources = [("2bpw", storages[2]), ("4bpw", storages[4])]
    recipe = load_recipe(None)
    low, high = feasible_range(sources, recipe)
    assert (
        low == storages[2].vram_bytes and high == storages[4].vram_bytes
    )  # the card's recipe spans all linears
    assert plan_mix(sources, low, recipe).overrides == {}
    top = plan_mix(sources, high, recipe)
    assert top.predicted_bytes == high and set(top.overrides.values()) == {"4bpw"}
    for target in (low - 1, high + 1):
        with pytest.raises(BadInput) as caught:
            plan_mix(sources, target, recipe)
        line = caught.value.line()
        assert caught.value.exit_code == 2 and f"{low / 2**30:.3f} to {high / 2**30:.3f} GiB" in line


def test_attention_shared_and_dense_of_the_first_block_come_first(storages):
    sources = [("2bpw", storages[2]), ("4bpw", storages[4])]
    first = [
        k
        for k, m in storages[2].modules.items()
        if m.layer == 0 and m.group in ("attention", "shared_experts", "dense_mlp")
    ]
    extra = sum(storages[4].modules[k].n_bytes - storages[2].modules[k].n_bytes for k in first)
    plan = plan_mix(sources, storages[2].vram_bytes + extra, load_recipe(None))
    assert sorted(plan.overrides) == sorted(first) and plan.predicted_bytes == storages[2].vram_bytes + extra
    downs = plan_mix(sources, storages[4].vram_bytes - 1, load_recipe(None))
    assert all(
        downs.source_of(k) == "4bpw" for k, m in storages[2].modules.items() if m.group == "routed_down"
    )
