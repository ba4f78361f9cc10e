"""Reference files: prefixes cut at token boundaries, the versioned format, record vs compute, bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.tabby_test_server import testing
from tests.tabby_test_server.backend import TinyModelBackend
from toolkit.cli import main
from toolkit.errors import BadInput
from toolkit.verify.client import TabbyClient
from toolkit.verify.reference import (
    FORMAT,
    choose_prefixes,
    compute_reference,
    load_prompts,
    load_reference,
    record_reference,
    save_reference,
)

KEY = "reference-test-key"


def test_default_prompt_set_is_varied():
    prompts = load_prompts()
    assert len(prompts) >= 30
    names = " ".join(p.name for p in prompts)
    for kind in ("code-", "math-", "prose-", "zh-", "ja-", "de-", "ru-"):
        assert kind in names


def test_prefixes_are_token_prefixes_of_the_whole_prompt():
    encode = TinyModelBackend().encode
    for prompt in load_prompts():
        full = encode(prompt.text)
        cuts = choose_prefixes(prompt.text, encode)
        assert 1 <= len(cuts) <= 4, prompt.name
        assert [len(ids) for _, ids in cuts] == sorted({len(ids) for _, ids in cuts})
        for prefix, ids in cuts:
            assert prompt.text.startswith(prefix) and ids == full[: len(ids)] and len(ids) < len(full)


def test_a_cut_whose_tokens_are_not_a_prefix_is_skipped():
    """An encoder that merges across the first space: that cut must not be used."""

    def encode(text: str) -> list[int]:
        return [hash(w) % 1000 for w in text.replace("a b", "a_b").split(" ")]

    cuts = choose_prefixes("x y z a b c d e f g h i j", encode, count=8)
    assert all(not prefix.endswith(" a") and prefix != "x y z a" for prefix, _ in cuts)


def test_compute_records_ids_collisions_and_identity():
    backend = TinyModelBackend()
    reference = compute_reference(backend, load_prompts()[:3], top_k=50)
    assert reference.kind == "full_precision" and reference.vocab_collisions == {"\ufffd": 128}
    assert reference.tokenizer["tokenizer_json_sha256"] == backend.tokenizer_sha256
    position = reference.prompts[0].positions[0]
    assert len(position.top_ids) == len(position.top_tokens) == 50
    assert list(position.top_logprobs) == sorted(position.top_logprobs, reverse=True)


@pytest.mark.parametrize("name", ["ref.json", "ref.json.gz"])
def test_save_load_round_trip(tmp_path, name):
    reference = compute_reference(TinyModelBackend(bits=6), load_prompts()[:2], top_k=20)
    save_reference(reference, tmp_path / name)
    assert load_reference(tmp_path / name).as_dict() == reference.as_dict()
    raw = (tmp_path / name).read_bytes()
    data = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    assert data["format"] == FORMAT and data["version"] == 1 and data["kind"] == "quantized"


def test_record_uses_the_same_prefixes_as_compute(tmp_path):
    prompts = load_prompts()[:4]
    server = testing.start(tmp_path, api_key=KEY, model={"model_name": "tiny"})
    client = TabbyClient(server.url, KEY)
    try:
        recorded = record_reference(client, prompts, top_k=30)
    finally:
        client.close()
        server.stop()
    computed = compute_reference(TinyModelBackend(), prompts, top_k=30)
    assert recorded.kind == "deployment" and recorded.model_id == "tiny"
    assert recorded.tokenizer["probe_ids_sha256"] == computed.tokenizer["probe_ids_sha256"]
    for rec, com in zip(recorded.prompts, computed.prompts):
        assert [p.prefix for p in rec.positions] == [p.prefix for p in com.positions]
        assert [p.prefix_ids for p in rec.positions] == [p.prefix_ids for p in com.positions]


@pytest.mark.parametrize(
    "document, problem",
    [
        (b"not json", "not JSON"),
        (json.dumps({"format": "other"}).encode(), "is not a glm-deploy-reference file"),
        (json.dumps({"format": FORMAT, "version": 1, "kind": "weird", "prompts": []}).encode(), "kind"),
        (
            json.dumps(
                {
                    "format": FORMAT,
                    "version": 1,
                    "kind": "deployment",
                    "prompts": [{"positions": [{"prefix": "a", "top": {"tokens": ["x"], "logprobs": []}}]}],
                }
            ).encode(),
            "equal",
        ),
    ],
)
def test_bad_reference_files_are_bad_input(tmp_path, document, problem):
    path = tmp_path / "ref.json"
    path.write_bytes(document)
    with pytest.raises(BadInput, match=problem):
        load_reference(path)


def test_bad_prompt_sets_are_bad_input(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("prompts: [{name: x}]")
    with pytest.raises(BadInput, match="non-empty text"):
        load_prompts(path)
    with pytest.raises(BadInput, match="cannot read"):
        load_prompts(tmp_path / "missing.yaml")


def test_custom_prompt_file_via_cli(tmp_path, capsys):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(
        "version: 1\nprompts:\n  - {name: one, text: 'the river and the light of the city at night "
        "and the people of the world'}\n"
    )
    server = testing.start(tmp_path, api_key=KEY, model={"model_name": "tiny"})
    out = tmp_path / "rec.json.gz"
    try:
        key = tmp_path / "key"
        key.write_text(KEY)
        assert (
            main(
                [
                    "reference",
                    "record",
                    "--url",
                    server.url,
                    "--api-key-file",
                    str(key),
                    "--out",
                    str(out),
                    "--prompts",
                    str(prompts),
                ]
            )
            == 0
        )
    finally:
        server.stop()
    reference = load_reference(out)
    assert [p.name for p in reference.prompts] == ["one"] and reference.positions == 4
    assert KEY not in capsys.readouterr().err


def test_record_from_an_unreachable_server_exits_5(tmp_path, capsys):
    code = main(
        [
            "reference",
            "record",
            "--url",
            f"http://127.0.0.1:{testing.free_port()}",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 5 and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["compute", "--model-dir", "/nonexistent/model", "--out", "ref.json"],
        ["compute", "--model-dir", ".", "--out", "ref.txt"],
        ["record", "--url", "http://127.0.0.1:1", "--out", "ref.json", "--top-k", "0"],
    ],
)
def test_reference_bad_input_exits_2(args, capsys):
    assert main(["reference", *args]) == 2
    assert capsys.readouterr().err.startswith("deploy reference:")


def test_compute_without_torch_or_gpu_is_environment_missing(tmp_path, capsys):
    """Extra `gpu` absent (or no CUDA device): exit 4 with the install hint, no traceback, no file written."""
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: compute would really run")
    except ImportError:
        pass
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Glm4MoeForCausalLM"]}))
    out = tmp_path / "ref.json.gz"
    assert main(["reference", "compute", "--model-dir", str(model), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("gpu" in err or "CUDA" in err)
    assert not out.exists()
