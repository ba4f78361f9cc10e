"""The tiny model as a reference backend (duck-typed like toolkit.verify.reference.ReferenceBackend)."""

from __future__ import annotations

import numpy as np

from .model import TinyModel


class TinyModelBackend:
    """Exact next-token distributions of the test server's model, at full precision or at `bits`."""

    def __init__(self, bits: int | None = None, seed: int = 0) -> None:
        self.model = TinyModel(bits=bits, seed=seed)
        self.kind = "full_precision" if bits is None else "quantized"
        self.model_id = "tiny" if bits is None else f"tiny-{bits}bpw"
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
