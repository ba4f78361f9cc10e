"""TEST DOUBLE of exllamav3's compile_model with model_stc: the model's tensors (through config.stc, a
VariantSafetensorsCollection in a mix) written into shards, then config.json, quantization_config.json and the
base's other files, as exllamav3 1.6.5 lays them out."""

from __future__ import annotations

import json
import os
import shutil

from ..loader.safetensors_alt import save_file
from ..version import __version__
from .quant_config import create_quantization_config_json, update_config

SKIPPED_SUFFIXES = (".bin", ".ckpt", ".pth", ".pt")


def compile_model(args: dict, model, config, tokenizer, mtp_model=None, vision_model=None) -> None:
    """Shards of at most shard_size MB (a module is never split), named model-0000i-of-0000n.safetensors (one:
    model.safetensors), with an index when there are several."""
    if not args.get("model_stc"):
        raise NotImplementedError("the test double compiles from the model's own tensors only (model_stc)")
    in_dir, out_dir = args["in_dir"], args["out_dir"]
    stc = config.stc
    os.makedirs(out_dir, exist_ok=True)
    limit = args["shard_size"] * 1024**2
    shards: list[list] = [[]]
    filled = 0
    for module in model.modules:
        size = sum(module.get_compile_sizes(stc))
        if size == 0:
            continue
        if filled + size > limit and filled > 0:
            shards.append([])
            filled = 0
        filled += size
        shards[-1].append(module)
    weight_map: dict[str, str] = {}
    total = 0
    for index, modules in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{index + 1:05}-of-{len(shards):05}.safetensors"
        )
        print(f" -- Writing {name}")
        tensors: dict = {}
        for module in modules:
            tensors.update((k, v) for k, v in module.get_compile_tensors(stc).items() if k not in weight_map)
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.nelement() * tensor.element_size()
        save_file(tensors, os.path.join(out_dir, name))
    for name in os.listdir(in_dir):
        path = os.path.join(in_dir, name)
        if not os.path.isfile(path) or name.endswith(".safetensors"):
            continue
        if name in ("config.json", "model.safetensors.index.json") or name.endswith(SKIPPED_SUFFIXES):
            continue
        shutil.copy(path, os.path.join(out_dir, name))
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as handle:
            handle.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=4))
    with open(os.path.join(in_dir, "config.json")) as handle:
        settings = json.load(handle)
    quant = {
        "quant_method": "exl3",
        "version": __version__,
        "bits": args["final_bits"],
        "head_bits": args["head_bits"],
    }
    previous = settings.get("quantization_config")
    if previous and previous.get("quant_method") == "exl3":
        quant = {**previous, "bits": args["final_bits"], "head_bits": args["head_bits"]}
    update_config(settings)
    settings["quantization_config"] = quant
    with open(os.path.join(out_dir, "config.json"), "w") as handle:
        handle.write(json.dumps(settings, indent=4))
    create_quantization_config_json(out_dir)
    print(f" -- Finished compiling model to {out_dir}")
