"""A tiny numeric language model standing in for "a GLM-4.7-sized GPU": real logits whose quality drops with bits.

Stdlib + numpy only (the test image has no pip packages). The tokenizer is byte-level with merged word pieces, and
like a real byte-level BPE its decode has collisions: the 128 high-byte ids all decode alone to U+FFFD, so a
TabbyAPI-style top-K dict keyed by decoded strings loses entries exactly as the real server does.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SPECIALS = ("<|endoftext|>", "<think>", "</think>")
EOS_ID = 0
THINK_ID = 1
THINK_END_ID = 2
BYTE_OFFSET = len(SPECIALS)

# Merged pieces: leading-space words and common fragments, never a trailing or inner space, so that a cut
# before a space is always a token boundary for the greedy longest-match encoder.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we can has more will if so no about up out into than them what when "
    "who would been time only some could new its also two may first like then other now over such our "
    "model token value data code list number function return print import self class while true false none "
    "sum count step result error water light house city river world people year day night small large first"
)
_FRAGMENTS = (
    "ing",
    "ed",
    "er",
    "es",
    "ly",
    "tion",
    "ment",
    "def",
    "for",
    "if",
    "    ",
    "\n\n",
    "()",
    "):",
    "==",
    "+=",
    "->",
    "123",
    "000",
    "the",
    "and",
    "in",
    "de",
    "la",
    "le",
    "en",
    "die",
    "der",
    "und",
)


def _pieces() -> list[bytes]:
    """The vocabulary as byte strings, in id order (specials, 256 bytes, merges)."""
    merges: list[bytes] = []
    for word in _WORDS.split():
        for piece in (" " + word, word):
            if piece.encode() not in merges:
                merges.append(piece.encode())
    for fragment in _FRAGMENTS:
        if fragment.encode() not in merges:
            merges.append(fragment.encode())
    return [s.encode() for s in SPECIALS] + [bytes([b]) for b in range(256)] + merges


class Tokenizer:
    """Greedy longest-match byte tokenizer with TabbyAPI-like pieces (decoded strings that collide)."""

    def __init__(self) -> None:
        self.vocab = _pieces()
        self.size = len(self.vocab)
        self._by_bytes = {piece: i for i, piece in enumerate(self.vocab) if i >= len(SPECIALS)}
        self._max_len = max(len(p) for p in self.vocab)
        # What get_id_to_piece_list(True) gives for a byte-level BPE: a lone continuation/lead byte decodes to U+FFFD.
        self.pieces = [piece.decode("utf-8", errors="replace") for piece in self.vocab]

    def encode(self, text: str, encode_special_tokens: bool = True) -> list[int]:
        """Token ids of text (no BOS: this model has none)."""
        data = text.encode("utf-8")
        ids: list[int] = []
        i = 0
        while i < len(data):
            if encode_special_tokens:
                special = next((n for n, s in enumerate(SPECIALS) if data.startswith(s.encode(), i)), None)
                if special is not None:
                    ids.append(special)
                    i += len(SPECIALS[special])
                    continue
            for length in range(min(self._max_len, len(data) - i), 0, -1):
                token = self._by_bytes.get(data[i : i + length])
                if token is not None:
                    ids.append(token)
                    i += length
                    break
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids (bytes joined first, so split multi-byte characters come back whole)."""
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def identity(self) -> str:
        """sha256 of the vocabulary: stands in for the sha256 of a tokenizer.json."""
        return hashlib.sha256(b"\0".join(self.vocab)).hexdigest()


@dataclass(frozen=True)
class Weights:
    """Parameters of the context MLP: embeddings, one hidden layer, output projection, unigram bias."""

    embed: np.ndarray
    hidden: np.ndarray
    hidden_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray


CONTEXT = 6
EMBED_DIM = 48
HIDDEN_DIM = 256
LOGIT_SCALE = 5.0


def make_weights(tokenizer: Tokenizer, seed: int = 0) -> Weights:
    """Deterministic random weights; the bias favours words and ASCII so text looks text-like and peaked."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.size
    bias = np.zeros(vocab)
    for i, piece in enumerate(tokenizer.vocab):
        if i < BYTE_OFFSET:
            bias[i] = -3.0 if i != EOS_ID else -1.0
        elif len(piece) > 1:
            bias[i] = 1.5
        elif piece.isalpha() or piece == b" ":
            bias[i] = 0.5
        elif piece[0] >= 0x80:
            bias[i] = -0.5
    return Weights(
        embed=rng.normal(0, 1.0, (vocab, EMBED_DIM)),
        hidden=rng.normal(0, 1.0 / np.sqrt(CONTEXT * EMBED_DIM), (HIDDEN_DIM, CONTEXT * EMBED_DIM)),
        hidden_bias=rng.normal(0, 0.1, HIDDEN_DIM),
        out=rng.normal(0, 1.0 / np.sqrt(HIDDEN_DIM), (vocab, HIDDEN_DIM)),
        out_bias=bias,
    )


def quantize_rows(matrix: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-row rounding to `bits` bits (what makes KL real and grow as bits drop)."""
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(matrix).max(axis=1, keepdims=True) / levels
    scale[scale == 0] = 1.0
    return np.clip(np.round(matrix / scale), -levels, levels) * scale


MIN_BITS, MAX_BITS = 2, 16  # symmetric rounding needs at least one level either side of zero


def whole_bits(bpw: float) -> int:
    """The integer bit width the quantizer uses for a bits-per-weight figure: rounded half up (3.84 -> 4, 2.5 -> 3).

    EXL3 quants have fractional averages (2.10, 2.57, 3.15, 3.84 bpw); this model rounds every weight of a row to
    the same whole number of bits, so the nearest width stands in for them.
    """
    bits = math.floor(bpw + 0.5)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{bpw} bits per weight rounds to {bits}; the tiny model takes {MIN_BITS} to {MAX_BITS}"
        )
    return bits


def quantize(weights: Weights, bits: int | None) -> Weights:
    """The weights at `bits` bits per weight (None: full precision, unchanged)."""
    if bits is None:
        return weights
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    return Weights(
        embed=quantize_rows(weights.embed, bits),
        hidden=quantize_rows(weights.hidden, bits),
        hidden_bias=weights.hidden_bias,
        out=quantize_rows(weights.out, bits),
        out_bias=weights.out_bias,
    )


class TinyModel:
    """next-token logits from the last CONTEXT tokens; teacher-forced and deterministic."""

    def __init__(self, bits: int | None = None, seed: int = 0) -> None:
        self.tokenizer = Tokenizer()
        self.bits = bits
        self.weights = quantize(make_weights(self.tokenizer, seed), bits)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (vocab,) of the token after ids."""
        context = ([EOS_ID] * CONTEXT + list(ids))[-CONTEXT:]
        w = self.weights
        x = w.embed[context].reshape(-1)
        h = np.tanh(w.hidden @ x + w.hidden_bias)
        return LOGIT_SCALE * (w.out @ h) + w.out_bias

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """Log-softmax of logits(ids), in float64."""
        z = self.logits(ids)
        z = z - z.max()
        return z - np.log(np.exp(z).sum())

    def generate(self, ids: list[int], max_tokens: int, stop_ids: tuple[int, ...] = (EOS_ID,)) -> list[int]:
        """Greedy continuation (deterministic, so tests can reason about it)."""
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(self.logprobs(list(ids) + out)))
            if token in stop_ids:
                break
            out.append(token)
        return out
