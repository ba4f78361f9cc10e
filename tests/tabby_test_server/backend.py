"""The tiny model as a reference backend (duck-typed like toolkit.verify.reference.ReferenceBackend), and the
test double of the deployment reference's GPU boundary (reference_double, for toolkit.verify.reference_entry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .app import BPW_IN_NAME
from .model import TinyModel, whole_bits

DEFAULT_SEED = 0  # the server's default weight seed (app.py)


class TinyModelBackend:
    """Exact next-token distributions of the test server's model, at full precision or at `bits`."""

    name = "test-double:tabby_test_server"
    version = "tiny-numpy-model"

    def __init__(
        self, bits: int | None = None, seed: int = DEFAULT_SEED, model_id: str | None = None
    ) -> None:
        self.model = TinyModel(bits=bits, seed=seed)
        self.versions = {"test_double": "tabby_test_server tiny numpy model"}
        self.kind = "full_precision" if bits is None else "quantized"
        self.model_id = model_id or ("tiny" if bits is None else f"tiny-{bits}bpw")
        self.tokenizer_sha256 = self.model.tokenizer.identity()

    def encode(self, text: str) -> list[int]:
        """Token ids as the test server encodes a completion prompt."""
        return self.model.tokenizer.encode(text)

    def pieces(self) -> list[str]:
        """Decoded string per id, as the test server keys its top-K dicts."""
        return list(self.model.tokenizer.pieces)

    def logprobs_at(self, ids: list[int], counts: list[int]) -> np.ndarray:
        """Log-softmax after ids[:n] for each n."""
        return np.stack([self.model.logprobs(ids[:n]) for n in counts])

    def load(self, context_tokens: int) -> dict[str, Any]:
        """Nothing to load (the weights are made in __init__); the cache is the model's 6-token window."""
        return {"cache_mode": "FP16", "cache_tokens": context_tokens, "placement": "CPU (numpy)"}

    def peak_memory_mib(self) -> list[float] | None:
        """No GPU."""
        return None

    def close(self) -> None:
        """Nothing to free."""


def reference_double(model_dir: Path) -> TinyModelBackend:
    """Stand-in for exllamav3 loading model_dir, for images without a GPU stack (GLM_DEPLOY_REFERENCE_TEST_DOUBLE).

    The folder is the weights, as for exllamav3: its name gives the bits by the server's own default rule
    (`<number>bpw`, rounded like the server rounds, else full precision) and the seed is the server's default.
    A server told other bits or another seed (config.yml's test_server section, GLM_TEST_SERVER_*) therefore
    serves other weights than the folder's: what the KL check must catch.
    """
    from toolkit.errors import BadInput

    if not (model_dir / "config.json").is_file():
        raise BadInput(f"{model_dir} has no config.json", "pass the model folder")
    match = BPW_IN_NAME.search(model_dir.name)
    bits = whole_bits(float(match.group(1))) if match else None
    return TinyModelBackend(bits=bits, seed=DEFAULT_SEED, model_id=model_dir.name)
