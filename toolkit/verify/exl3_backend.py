"""exllamav3 as a ReferenceBackend: next-token distributions of a local model dir, the way TabbyAPI computes them.

exllamav3 loads unquantized HF checkpoints (BF16) as well as EXL3 quants, so the BF16 original gives the
full-precision reference and the deployed quant folder the deployment reference (../shared/facts/exllamav3.md).
Each position is computed as TabbyAPI's generator computes a one-token completion: the prompt's tokens but the
last are prefilled into an FP16 cache, then the last token alone is forwarded at its position, and that forward's
logits are the distribution. The cache is only as long as the prompts need. The model goes on one device, or
layer by layer across every visible GPU (exllamav3's autosplit) when it does not fit on one.

torch and exllamav3 are imported here, lazily: only the reference entry point on a GPU (or in the image) needs them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing
from .reference import KIND_FULL_PRECISION, KIND_QUANTIZED

CACHE_PAGE_TOKENS = 256  # exllamav3's cache page: a cache holds a multiple of it
MIB = 2**20


def _is_quantized(model_dir: Path) -> bool:
    """An EXL3 (or other) quant declares quantization_config in config.json; a BF16 original does not."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BadInput(
            f"{model_dir} has no readable config.json", "pass a Hugging Face model folder"
        ) from None
    return bool(config.get("quantization_config"))


class Exl3Backend:
    """A model dir read by exllamav3: tokenizer at once, weights and the FP16 cache on load()."""

    def __init__(self, model_dir: Path, device: str = "auto") -> None:
        if not model_dir.is_dir():
            raise BadInput(f"--model-dir {model_dir} is not a folder", "pass the model's folder")
        self.kind = KIND_QUANTIZED if _is_quantized(model_dir) else KIND_FULL_PRECISION
        try:
            import exllamav3
            import torch
            from exllamav3 import Config, Tokenizer
        except ImportError as error:
            raise EnvironmentMissing(
                f"reference compute needs torch and exllamav3 ({error})",
                "pip install 'glm-deploy[gpu]' on a GPU host",
            ) from None
        if not torch.cuda.is_available():
            raise EnvironmentMissing("reference compute needs a CUDA GPU", "run it on the GPU host")
        self._torch = torch
        self._device = device
        self._config = Config.from_directory(str(model_dir))
        self._tokenizer = Tokenizer.from_config(self._config)
        self._vocab_size = self._tokenizer.actual_vocab_size
        self._model: Any = None
        self._cache: Any = None
        self._cache_tokens = 0
        self.model_id = model_dir.name
        self.name = "exllamav3"
        self.version = str(getattr(exllamav3, "__version__", "") or _distribution_version("exllamav3"))
        self.versions = {"exllamav3": self.version, "torch": str(torch.__version__)}
        tokenizer_json = model_dir / "tokenizer.json"
        self.tokenizer_sha256 = (
            hashlib.sha256(tokenizer_json.read_bytes()).hexdigest() if tokenizer_json.is_file() else None
        )

    def load(self, context_tokens: int) -> dict[str, Any]:
        """Weights plus an FP16 cache of context_tokens (rounded up to a page), on one GPU or split over all."""
        from exllamav3 import Cache, Model

        torch = self._torch
        self._cache_tokens = -(-max(context_tokens, 1) // CACHE_PAGE_TOKENS) * CACHE_PAGE_TOKENS
        self._model = Model.from_config(self._config)
        self._cache = Cache(self._model, max_num_tokens=self._cache_tokens)  # FP16 layers by default
        gpus = torch.cuda.device_count()
        if self._device != "auto":
            self._model.load(self._device)
            placement = self._device
        elif gpus == 1:
            self._model.load("cuda:0")
            placement = "cuda:0"
        else:
            self._model.load()  # autosplit: module by module over every visible GPU, cache included
            placement = f"autosplit over {gpus} GPUs"
        return {"cache_mode": "FP16", "cache_tokens": self._cache_tokens, "placement": placement}

    def encode(self, text: str) -> list[int]:
        """Like TabbyAPI's completions with add_bos_token false: special tokens encoded, no BOS."""
        ids = self._tokenizer.encode(text, add_bos=False, encode_special_tokens=True)
        return [int(i) for i in ids.flatten().tolist()]

    def pieces(self) -> list[str]:
        """TabbyAPI keys top-K by get_id_to_piece_list(True)[id] (backends/exllamav3/model.py handle_logprobs)."""
        return list(self._tokenizer.get_id_to_piece_list(True))[: self._vocab_size]

    def logprobs_at(self, ids: list[int], counts: list[int]) -> Any:
        """Per n in counts: prefill ids[:n-1] into the cache, forward ids[n-1] alone; log-softmax of its logits."""
        torch = self._torch
        if self._model is None:
            raise RuntimeError("load() the model before asking for distributions")
        if max(counts) > self._cache_tokens:
            raise BadInput(
                f"a prompt needs {max(counts)} tokens, the cache holds {self._cache_tokens}", "load() more"
            )
        rows = []
        with torch.inference_mode():
            for n in counts:
                if n > 1:
                    self._model.forward(torch.tensor([ids[: n - 1]], dtype=torch.long), self._params(0))
                logits = self._model.forward(
                    torch.tensor([ids[n - 1 : n]], dtype=torch.long), self._params(n - 1)
                )
                rows.append(logits[0, -1, : self._vocab_size].float())
            return torch.log_softmax(torch.stack(rows), dim=-1).double().cpu().numpy()

    def plain_logprobs_at(self, ids: list[int], counts: list[int]) -> Any:
        """One forward over ids[:max(counts)] without a cache (exllamav3's model_diff convention): row n-1 is the
        distribution after ids[:n]. What benchmarks compare the served path with."""
        torch = self._torch
        with torch.inference_mode():
            input_ids = torch.tensor([ids[: max(counts)]], dtype=torch.long)
            logits = self._model.forward(input_ids)[0, :, : self._vocab_size].float()
            return torch.log_softmax(logits[[n - 1 for n in counts]], dim=-1).double().cpu().numpy()

    def _params(self, past_len: int) -> dict[str, Any]:
        """exllamav3's cached-attention arguments for one sequence starting at past_len."""
        return {
            "attn_mode": "flash_attn",
            "cache": self._cache,
            "past_len": past_len,
            "batch_shape": (1, self._cache_tokens),
        }

    def peak_memory_mib(self) -> list[float]:
        """Per visible GPU: the most memory torch reserved so far (weights, cache and transients)."""
        torch = self._torch
        return [round(torch.cuda.max_memory_reserved(i) / MIB, 1) for i in range(torch.cuda.device_count())]

    def close(self) -> None:
        """Free the GPU memory (a driver loads several models in one process)."""
        if self._model is not None:
            self._model.unload()


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
