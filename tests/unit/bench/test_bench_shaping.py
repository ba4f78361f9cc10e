"""deploy bench's prompts: exact lengths in the server's tokens, never a shared prefix, bounded tokenizer use."""

from __future__ import annotations

import asyncio

import pytest

from tests.tabby_test_server.model import Tokenizer
from tests.tabby_test_server.server import chat_prompt
from toolkit.bench import shaping


class CountingTokenizer:
    """The test server's tokenizer as the counter, counting how often it was asked."""

    def __init__(self, template: bool = False) -> None:
        self.tokenizer = Tokenizer()
        self.template = template
        self.calls = 0

    async def __call__(self, text: str) -> int:
        self.calls += 1
        if self.template:
            text = chat_prompt([{"role": "user", "content": text}], add_generation_prompt=False)
        return len(self.tokenizer.encode(text))


FILL_CALLS = shaping.MAX_FILL_STEPS * len(shaping.FILLERS)


@pytest.mark.parametrize("target", [12, 100, 1000])
def test_prompts_hit_the_exact_length_with_bounded_tokenizer_use(target):
    count = CountingTokenizer()
    fitter = shaping.PromptFitter(count, seed=3)
    first = asyncio.run(fitter.fit(shaping.header(0), target))
    assert first.tokens == target == len(count.tokenizer.encode(first.text))
    assert count.calls <= 3 * target.bit_length() + shaping.MAX_BRACKET_STEPS + FILL_CALLS
    count.calls = 0
    prompts = asyncio.run(shaping.fitted_prompts(fitter, target, first_number=1, n=20, guess=first.words))
    assert [p.tokens for p in prompts] == [target] * 20
    assert all(p.tokens == len(count.tokenizer.encode(p.text)) for p in prompts)
    assert count.calls <= 20 * 6, "a good guess keeps it to a few tokenizer requests per prompt"


def test_chat_prompts_count_through_the_template():
    count = CountingTokenizer(template=True)
    fitter = shaping.PromptFitter(count, seed=1)
    first = asyncio.run(fitter.fit(shaping.header(5), 300))
    prompts = asyncio.run(shaping.fitted_prompts(fitter, 300, first_number=6, n=4, guess=first.words))
    assert [p.tokens for p in [first, *prompts]] == [300] * 5


def test_no_two_prompts_share_a_prefix_past_their_header_line():
    tokenizer = Tokenizer()
    batches = [shaping.unfitted_prompts(seed=0, words=3, first_number=first, n=50) for first in (0, 50)]
    prompts = [p for batch in batches for p in batch]
    heads = [tuple(tokenizer.encode(p.text)[: len(tokenizer.encode(p.text.split("\n")[0]))]) for p in prompts]
    assert len(set(heads)) == len(prompts) == 100


def test_request_body_asks_for_a_stream_of_exactly_output_len_tokens_with_usage():
    body = shaping.request_body("chat", "m", "hi", 64)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["model"] == "m"
    assert body["max_tokens"] == 64 and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ban_eos_token"] and body["ignore_eos"]
    assert shaping.request_body("completions", None, "hi", 8)["prompt"] == "hi"


def test_prompt_overhead_is_the_median_difference():
    assert shaping.prompt_overhead([300, 300, 300], [311, 311, 312]) == 11
    assert shaping.prompt_overhead([None], [5]) == 0
