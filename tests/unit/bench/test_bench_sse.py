"""deploy bench's stream reading: SSE framing as servers send it, and what one chunk says."""

from __future__ import annotations

import json

import pytest

from toolkit.bench.sse import SseParser, read_chunk

TABBY_STREAM = (  # TabbyAPI's completion stream with include_usage: CRLF framing, a ping comment, usage last
    b'data: {"id":"chatcmpl-1","object":"text_completion","choices":[{"index":0,"text":"Hello",'
    b'"finish_reason":null}],"created":1,"model_name":"m"}\r\n\r\n'
    b": ping - 2026-12-02 05:00:00\r\n\r\n"
    b'data: {"id":"chatcmpl-1","object":"text_completion","choices":[{"index":0,"text":" w\xc3\xb6rld",'
    b'"finish_reason":null}],"created":1,"model_name":"m"}\r\n\r\n'
    b'data: {"id":"chatcmpl-1","object":"text_completion","choices":[{"index":0,"text":"","finish_reason":'
    b'"length"}],"created":1,"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10},'
    b'"model_name":"m"}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)


def test_events_survive_any_split_of_the_byte_stream():
    whole = SseParser().feed(TABBY_STREAM)
    assert len(whole) == 4 and whole[-1] == "[DONE]"
    assert json.loads(whole[1])["choices"][0]["text"] == " wörld"  # a UTF-8 character split by the network
    for cut in range(1, len(TABBY_STREAM)):
        parser = SseParser()
        assert parser.feed(TABBY_STREAM[:cut]) + parser.feed(TABBY_STREAM[cut:]) + parser.close() == whole


def test_lf_framing_multiline_data_and_an_unterminated_last_event():
    parser = SseParser()
    assert parser.feed(b"event: x\nid: 3\ndata: a\ndata:b\n\n: comment\n\ndata: tail") == ["a\nb"]
    assert parser.close() == ["tail"]
    assert parser.close() == []


def test_completion_chat_usage_error_and_done_chunks():
    text = read_chunk('{"choices":[{"index":0,"text":"x","finish_reason":null}]}')
    assert text.has_text and text.completion_tokens is None and not text.done
    reasoning = read_chunk(
        '{"choices":[{"index":0,"delta":{"reasoning_content":"hm"},"finish_reason":null}]}'
    )
    assert reasoning.has_text
    empty = read_chunk(
        '{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
        '"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}'
    )
    assert not empty.has_text and (empty.prompt_tokens, empty.completion_tokens) == (5, 9)
    assert empty.finish_reason == "length"
    error = read_chunk(
        '{"error":{"message":"Completion aborted. Please check the server console.","trace":null}}'
    )
    assert error.error == "Completion aborted. Please check the server console."
    assert read_chunk("[DONE]").done


@pytest.mark.parametrize("data", ["not json", "[1, 2]"])
def test_malformed_events_are_errors(data):
    assert read_chunk(data).error
