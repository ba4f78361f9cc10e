"""exllamav3 as a ReferenceBackend: exact next-token distributions from a local model dir (extra `gpu`).

exllamav3 loads unquantized HF checkpoints (BF16) as well as EXL3 quants, so `deploy reference compute` on the
BF16 original gives the full-precision reference (../shared/facts/exllamav3.md). torch and exllamav3 are imported
here, lazily, so the rest of the toolkit never needs them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import BadInput, EnvironmentMissing
from .reference import KIND_FULL_PRECISION, KIND_QUANTIZED


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
    """A model loaded on one device; forward() over a whole prompt gives every position's logits at once."""

    def __init__(self, model_dir: Path, device: str = "cuda:0") -> None:
        if not model_dir.is_dir():
            raise BadInput(f"--model-dir {model_dir} is not a folder", "pass the model's folder")
        self.kind = KIND_QUANTIZED if _is_quantized(model_dir) else KIND_FULL_PRECISION
        try:
            import torch
            from exllamav3 import Config, Model, Tokenizer
        except ImportError as error:
            raise EnvironmentMissing(
                f"reference compute needs torch and exllamav3 ({error})",
                "pip install 'glm-deploy[gpu]' on a GPU host",
            ) from None
        if not torch.cuda.is_available():
            raise EnvironmentMissing("reference compute needs a CUDA GPU", "run it on the GPU host")
        self._torch = torch
        config = Config.from_directory(str(model_dir))
        self._model = Model.from_config(config)
        self._model.load(device)
        self._tokenizer = Tokenizer.from_config(config)
        self._vocab_size = self._tokenizer.actual_vocab_size
        self.model_id = model_dir.name
        tokenizer_json = model_dir / "tokenizer.json"
        self.tokenizer_sha256 = (
            hashlib.sha256(tokenizer_json.read_bytes()).hexdigest() if tokenizer_json.is_file() else None
        )

    def encode(self, text: str) -> list[int]:
        """Like TabbyAPI's completions with add_bos_token false: special tokens encoded, no BOS."""
        ids = self._tokenizer.encode(text, add_bos=False, encode_special_tokens=True)
        return [int(i) for i in ids.flatten().tolist()]

    def pieces(self) -> list[str]:
        """TabbyAPI keys top-K by get_id_to_piece_list(True)[id] (backends/exllamav3/model.py handle_logprobs)."""
        return list(self._tokenizer.get_id_to_piece_list(True))[: self._vocab_size]

    def logprobs_at(self, ids: list[int], counts: list[int]) -> Any:
        """One forward over ids[:max(counts)]: row n-1 of the logits is the distribution after ids[:n]."""
        torch = self._torch
        length = max(counts)
        with torch.inference_mode():
            input_ids = torch.tensor([ids[:length]], dtype=torch.long)
            logits = self._model.forward(input_ids)[0, :, : self._vocab_size].float()
            rows = logits[[n - 1 for n in counts]]
            return torch.log_softmax(rows, dim=-1).double().cpu().numpy()

    def close(self) -> None:
        """Free the GPU memory (a driver loads several models in one process)."""
        self._model.unload()
