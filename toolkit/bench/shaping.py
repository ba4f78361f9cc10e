"""Request shaping: prompts of an exact token length that the prompt cache cannot shorten, and request bodies.

Every prompt starts with its own header (four words chosen by a run nonce plus the prompt's number), so no two
prompts of a run -- or of two runs -- share a first token, and a prefix cache (TabbyAPI reuses cached pages of a
repeated prompt: 0.2-0.9 s prefill became 14-19 ms, ../shared/facts/tabbyapi.md) has nothing to reuse: every
request pays its full prefill. Seeded words follow. With the server's tokenizer (POST /v1/token/encode) each
prompt is fitted to the target: the longest run of words that stays within it (a bracketing search from a guess,
then bisection), topped up with one-token fillers; a good guess (the word count that fitted the previous prompt)
makes that two or three tokenizer requests per prompt.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river light garden window music "
    "market paper table letter voice field summer winter bridge station forest island valley mountain ocean"
)
WORDS = tuple(_WORD_TEXT.split())
HEADER_WORDS = 4
FILLERS = (" a", " I", " x", ".", ",", "!", ";", " the")  # short pieces that are one token in most BPEs
MAX_FILL_STEPS = 16  # a word is rarely more tokens than this
MAX_BRACKET_STEPS = 8
CHECK_PARALLEL = 8

Counter = Callable[[str], Awaitable[int]]


def header(number: int) -> str:
    """The distinct opening line of a prompt: `number` written in base len(WORDS) with words."""
    words = []
    for _ in range(HEADER_WORDS):
        number, digit = divmod(number, len(WORDS))
        words.append(WORDS[digit])
    return " ".join(words) + ":\n"


def body_words(seed: int, count: int) -> list[str]:
    """`count` seeded words (the same seed gives the same words, so every prompt of a run shares them)."""
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(count)]


@dataclass(frozen=True)
class Prompt:
    """A prompt's text, its length in the server's tokens (None without a tokenizer) and its word count."""

    text: str
    tokens: int | None
    words: int


class PromptFitter:
    """Fits header + seeded words (+ fillers) to a token target with the server's tokenizer."""

    def __init__(self, count: Counter, seed: int) -> None:
        self.count = count
        self.seed = seed
        self.words = body_words(seed, 64)

    def _text(self, opening: str, k: int, tail: str = "") -> str:
        return opening + " ".join(self.words[:k]) + tail

    async def _grow(self, opening: str, target: int) -> int:
        """Words enough to pass the target (a word is at least one token in a BPE; bounded at 8 x target)."""
        while len(self.words) < target + 16:
            self.words += body_words(self.seed + len(self.words), len(self.words))
        tokens = await self.count(self._text(opening, len(self.words)))
        while tokens <= target and len(self.words) < 8 * target + 64:
            self.words += body_words(self.seed + len(self.words), len(self.words))
            tokens = await self.count(self._text(opening, len(self.words)))
        return tokens

    async def fit(self, opening: str, target: int, guess: int | None = None) -> Prompt:
        """The longest word run k with count(opening + words[:k]) <= target, topped up with fillers; exact
        unless the opening alone is too long or no filler adds exactly the missing tokens."""
        known: dict[int, int] = {}

        async def at(k: int) -> int:
            if k not in known:
                known[k] = await self.count(self._text(opening, k))
            return known[k]

        top = len(self.words)
        if guess is None or guess > top:
            known[len(self.words)] = await self._grow(opening, target)
            top = len(self.words)
        low: int | None = None
        high: int | None = None
        k = min(max(guess if guess is not None else target, 0), top)
        for _ in range(MAX_BRACKET_STEPS):  # step by the miss: one word is about one token
            tokens = await at(k)
            if tokens <= target:
                low = k if low is None else max(low, k)
                if tokens == target or k == top:
                    break
                k = min(top, k + (target - tokens))
            else:
                high = k if high is None else min(high, k)
                if k == 0:
                    break
                k = max(0, k - (tokens - target))
            if low is not None and high is not None:
                break
        if low is None:
            low = 0
            if await at(0) > target:
                return Prompt(opening, await at(0), 0)
        if high is None:
            high = top + 1 if await at(top) <= target else top
            low = top if high > top else low
        while high - low > 1 and await at(low) < target:
            middle = (low + high) // 2
            if await at(middle) <= target:
                low = middle
            else:
                high = middle
        text, tokens = self._text(opening, low), await at(low)
        for _ in range(MAX_FILL_STEPS):
            if tokens >= target:
                break
            for filler in FILLERS:
                filled = await self.count(text + filler)
                if tokens < filled <= target:
                    text, tokens = text + filler, filled
                    break
            else:
                break
        return Prompt(text, tokens, low)


async def fitted_prompts(
    fitter: PromptFitter, target: int, first_number: int, n: int, guess: int | None
) -> list[Prompt]:
    """n prompts header(first_number + i) + words, each fitted to target (CHECK_PARALLEL tokenizer requests at
    once)."""
    limit = asyncio.Semaphore(CHECK_PARALLEL)

    async def one(index: int) -> Prompt:
        async with limit:
            return await fitter.fit(header(first_number + index), target, guess)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def unfitted_prompts(seed: int, words: int, first_number: int, n: int) -> list[Prompt]:
    """Prompts without a tokenizer: `words` words each; their token counts come from the server's usage."""
    text = " ".join(body_words(seed, words))
    return [Prompt(header(first_number + index) + text, None, words) for index in range(n)]


def request_body(endpoint: str, model: str | None, text: str, output_len: int) -> dict[str, Any]:
    """A streamed request that asks for exactly output_len tokens (EOS banned: TabbyAPI's ban_eos_token, alias
    ignore_eos, which vLLM also reads) and for usage in the last chunk (stream_options.include_usage)."""
    body: dict[str, Any] = {
        "max_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ban_eos_token": True,
        "ignore_eos": True,
    }
    if model:
        body["model"] = model
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def encode_body(endpoint: str, text: str) -> dict[str, Any]:
    """POST /v1/token/encode's body: a completion prompt as a string (the server's default BOS handling, as in
    generation), a chat prompt as messages (TabbyAPI applies the template, without the generation prompt)."""
    if endpoint == "chat":
        return {"text": [{"role": "user", "content": text}]}
    return {"text": text}


def prompt_overhead(built: Sequence[int | None], served: Sequence[int | None]) -> int:
    """Tokens the server adds to a counted prompt (chat generation prompt, BOS): the median difference seen."""
    differences = sorted(s - b for b, s in zip(built, served) if b is not None and s is not None)
    return differences[len(differences) // 2] if differences else 0
