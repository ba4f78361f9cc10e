"""TEST DOUBLE of exllamav3's quantization_config.json writer: tensor_storage for every leaf module."""

from __future__ import annotations

import json
import os

import numpy as np

from ..model import Config, Model


def update_config(config_dict: dict) -> None:
    """The converter unties the head from the embedding."""
    if "tie_word_embeddings" in config_dict:
        config_dict["tie_word_embeddings"] = False


def create_quantization_config_json(model_dir: str) -> None:
    """config.json's quantization_config plus each leaf's stored tensors, bits and codebook multiplier."""
    config = Config.from_directory(model_dir)
    model = Model.from_config(config)
    storage: dict = {}
    for module in model:
        if module.modules:
            continue
        entry: dict = {"stored_tensors": config.stc.list_tensors(module.key, only_serializable=True)}
        if module.quant_format_id() == "exl3":
            bpw = entry["stored_tensors"][f"{module.key}.trellis"]["shape"][-1] / 16
            entry["quant_format"] = "exl3"
            entry["bits_per_weight"] = int(bpw) if float(bpw).is_integer() else bpw
            for marker in ("mul1", "mcg"):
                tensor = config.stc.get_tensor(f"{module.key}.{marker}", optional=True)
                if tensor is not None:
                    entry[f"{marker}_multiplier"] = int(np.asarray(tensor.array).view(np.uint32).item())
        storage[module.key] = entry
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        settings = json.load(handle)["quantization_config"]
    settings["tensor_storage"] = storage
    with open(os.path.join(model_dir, "quantization_config.json"), "w", encoding="utf-8") as handle:
        handle.write(json.dumps(settings, indent=4))
