"""TEST DOUBLE of exllamav3's Config and Model for Glm4MoeForCausalLM: the module tree (keys, leaves, linear
shapes) without weights, enough to size and compile a quant."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from .loader.safetensors import SafetensorsCollection

ARCHITECTURE = "Glm4MoeForCausalLM"


class Config:
    """config.json of a model folder and the collection of its tensors."""

    def __init__(self, directory: str, settings: dict) -> None:
        self.directory = directory
        self.architecture = ARCHITECTURE
        self.settings = settings
        self.stc = SafetensorsCollection(directory)

    @staticmethod
    def from_directory(directory: str) -> Config:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            settings = json.load(handle)
        architecture = (settings.get("architectures") or [None])[0]
        if architecture != ARCHITECTURE:
            raise ValueError(f"Unknown architecture {architecture} in {directory}/config.json")
        return Config(directory, settings)

    def get(self, name: str, default: int | None = None) -> int:
        value = self.settings.get(name, default)
        if value is None:
            raise ValueError(f"Missing key {name} in config.json")
        return int(value)


class Module:
    """A node of the model: its key and submodules; leaves hold the tensors."""

    def __init__(self, config: Config, key: str, modules: list[Module] | None = None) -> None:
        self.config = config
        self.key = key
        self.modules = modules or []
        self.device = None

    def __iter__(self) -> Iterator[Module]:
        yield self
        for module in self.modules:
            yield from module

    def get_compile_sizes(self, stc: SafetensorsCollection) -> list[int]:
        return stc.get_tensor_sizes(self.key)

    def get_compile_tensors(self, stc: SafetensorsCollection) -> dict:
        return stc.get_tensors(self.key, allow_bf16=True)

    def quant_format_id(self) -> str | None:
        return None

    def weights_numel(self) -> int:
        return sum(m.weights_numel() for m in self.modules)


class Linear(Module):
    """A linear layer: EXL3 when its folder stores trellis, suh and svh for it."""

    def __init__(self, config: Config, key: str, in_features: int, out_features: int) -> None:
        super().__init__(config, key)
        self.in_features = in_features
        self.out_features = out_features

    def is_exl3(self) -> bool:
        return all(self.config.stc.has_tensor(f"{self.key}.{t}") for t in ("trellis", "suh", "svh"))

    def quant_format_id(self) -> str | None:
        return "exl3" if self.is_exl3() else None

    def weights_numel(self) -> int:
        return self.in_features * self.out_features

    def storage_size(self) -> int:
        if self.is_exl3():
            return sum(self.config.stc.get_tensor_sizes(self.key))
        return 2 * self.in_features * self.out_features


def _mlp(config: Config, key: str, hidden: int, inner: int) -> Module:
    return Module(
        config,
        key,
        [
            Linear(config, f"{key}.up_proj", hidden, inner),
            Linear(config, f"{key}.gate_proj", hidden, inner),
            Linear(config, f"{key}.down_proj", inner, hidden),
        ],
    )


class Model:
    """The GLM-4 MoE tree exllamav3 builds: embedding, blocks (attention; dense MLP for the first
    first_k_dense_replace layers, else router, routed experts and shared experts), final norm, head."""

    def __init__(self, config: Config) -> None:
        self.config = config
        hidden = config.get("hidden_size")
        heads = config.get("num_attention_heads")
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim", hidden // heads)
        experts = config.get("n_routed_experts", 128)
        moe = config.get("moe_intermediate_size")
        self.modules: list[Module] = [Module(config, "model.embed_tokens")]
        for idx in range(config.get("num_hidden_layers")):
            key = f"model.layers.{idx}"
            attn = [
                Linear(config, f"{key}.self_attn.q_proj", hidden, heads * head_dim),
                Linear(config, f"{key}.self_attn.k_proj", hidden, kv_heads * head_dim),
                Linear(config, f"{key}.self_attn.v_proj", hidden, kv_heads * head_dim),
                Linear(config, f"{key}.self_attn.o_proj", heads * head_dim, hidden),
            ]
            if config.settings.get("use_qk_norm"):
                attn += [Module(config, f"{key}.self_attn.q_norm"), Module(config, f"{key}.self_attn.k_norm")]
            if idx < config.get("first_k_dense_replace", 3):
                mlp = _mlp(config, f"{key}.mlp", hidden, config.get("intermediate_size"))
            else:
                parts: list[Module] = [Linear(config, f"{key}.mlp.gate", hidden, experts)]
                for e in range(experts):
                    parts += _mlp(config, f"{key}.mlp.experts.{e}", hidden, moe).modules
                shared = moe * config.get("n_shared_experts", 1)
                parts.append(_mlp(config, f"{key}.mlp.shared_experts", hidden, shared))
                mlp = Module(config, f"{key}.mlp", parts)
            self.modules.append(
                Module(
                    config,
                    key,
                    [
                        Module(config, f"{key}.input_layernorm"),
                        Module(config, f"{key}.self_attn", attn),
                        Module(config, f"{key}.post_attention_layernorm"),
                        mlp,
                    ],
                )
            )
        self.modules += [
            Module(config, "model.norm"),
            Linear(config, "lm_head", hidden, config.get("vocab_size")),
        ]
        self._by_key: dict[str, Module] | None = None

    @staticmethod
    def from_config(config: Config) -> Model:
        return Model(config)

    def __iter__(self) -> Iterator[Module]:
        for module in self.modules:
            yield from module

    def find_module(self, key: str) -> Module:
        if self._by_key is None:
            self._by_key = {m.key: m for m in self}
        return self._by_key[key]

    def get_storage_info(self) -> tuple[float, float, float]:
        """Bits per weight of the linears, of the head, and the VRAM bits of both (as exllamav3 counts them)."""
        bits = numel = head_bpw = head_numel = 0
        for module in self:
            if not isinstance(module, Linear):
                continue
            stored = sum(self.config.stc.get_tensor_sizes(module.key)) * 8
            if module.key.endswith("lm_head"):
                head_numel = module.weights_numel()
                head_bpw = stored / head_numel
            else:
                bits += stored
                numel += module.weights_numel()
        return bits / numel, head_bpw, head_numel * head_bpw + bits
