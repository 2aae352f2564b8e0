"""The OpenAI wire format's pure pieces (segmentation/serving/openai_format.py): reading requests, refusing
what greedy PaliGemma cannot do with the field named, and the shapes of answers, chunks, models and errors."""

from __future__ import annotations

import json

import pytest

from segmentation.serving.openai_format import (
    OpenAIError,
    OpenAIErrorShape,
    chunk,
    completion,
    error_body,
    logprobs_content,
    model_list,
    parse_chat_request,
    sse,
    usage_chunk,
)

IMAGE = "data:image/png;base64,iVBORw0KGgo="


def request(*parts, **fields) -> dict:
    content = list(parts) or [{"type": "text", "text": "cat ; dog"}, {"type": "image_url", "image_url": {"url": IMAGE}}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **fields}


def refused(body, cap: int = 512) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_chat_request(body, max_tokens_cap=cap)
    assert caught.value.status == 400
    return caught.value


def test_a_plain_request():
    chat = parse_chat_request(request(), max_tokens_cap=512)
    assert (chat.model, chat.prompt, chat.task, chat.image_base64, chat.image_url) == \
        ("demo", "cat ; dog", "segment", IMAGE, None)
    assert (chat.stream, chat.include_usage, chat.logprobs, chat.max_tokens, chat.mask_format) == \
        (False, False, False, None, "rle")


def test_the_task_word_and_text_parts_around_the_image():
    chat = parse_chat_request(request({"type": "text", "text": "  Detect car"},
                                      {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                                      {"type": "text", "text": "; bus "}), max_tokens_cap=512)
    assert (chat.prompt, chat.task, chat.image_url, chat.image_base64) == \
        ("Detect car ; bus", "detect", "https://example.com/x.png", None)
    assert parse_chat_request(request({"type": "image_url", "image_url": IMAGE}, {"type": "text", "text": "segment x"}),
                              max_tokens_cap=512).task == "segment"  # image_url as a bare string works too


def test_streaming_usage_logprobs_limits_and_extensions():
    chat = parse_chat_request(request(stream=True, stream_options={"include_usage": True}, logprobs=True,
                                      top_logprobs=0, max_completion_tokens=40, temperature=0, n=1, top_p=0.9,
                                      seed=7, user="u", mask_format="png", labels_from_prompt=True, stop=None),
                              max_tokens_cap=512)
    assert (chat.stream, chat.include_usage, chat.logprobs, chat.max_tokens, chat.mask_format,
            chat.labels_from_prompt) == (True, True, True, 40, "png", True)
    assert parse_chat_request(request(max_tokens=9, max_completion_tokens=9), max_tokens_cap=512).max_tokens == 9


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"temperature": 0.7}, "temperature", "greedy decoding only"),
    ({"n": 2}, "n", "greedy decoding only"),
    ({"top_logprobs": 3}, "top_logprobs", "not supported"),
    ({"stop": ["\n"]}, "stop", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "must be text"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"max_tokens": 0}, "max_tokens", "1 to 512"),
    ({"max_tokens": 513}, "max_tokens", "1 to 512"),
    ({"max_tokens": "10"}, "max_tokens", "positive integer"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"mask-format": "png"}, "mask-format", "Unrecognized request argument"),
    ({"model": ""}, "model", "model is required"),
])
def test_what_is_refused_names_its_field(fields, param, words):
    error = refused(request(**fields))
    assert error.param == param and words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("messages", "words"), [
    ([], "messages is required"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": []}], "no system prompt"),
    ([{"role": "assistant", "content": "hi"}], "one user message"),
    ([{"role": "user", "content": "segment cat"}], "no image was sent"),
    ([{"role": "user", "content": [{"type": "text", "text": "cat"}]}], "no image was sent"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}] * 2}], "2 images were sent"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "text or image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}], "data: URL or an http"),
])
def test_messages_hold_one_user_turn_with_one_image(messages, words):
    error = refused({"model": "demo", "messages": messages})
    assert words in error.message and error.param.startswith("messages")


def test_not_a_json_object():
    assert "JSON object" in refused([1, 2]).message


def test_completion_chunk_and_usage_shapes():
    body = completion(ident="chatcmpl-1", created=5, model="demo", content="<loc0001> cat",
                      segmentation={"objects": []}, finish_reason="length", prompt_tokens=260, completion_tokens=3,
                      logprobs=logprobs_content(["<loc0001>", " cat"], [-0.5, -1.0]))
    [choice] = body["choices"]
    assert body["object"] == "chat.completion" and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "<loc0001> cat", "refusal": None,
                                 "segmentation": {"objects": []}}
    assert body["usage"] == {"prompt_tokens": 260, "completion_tokens": 3, "total_tokens": 263}
    assert choice["logprobs"]["content"][1] == {"token": " cat", "logprob": -1.0, "bytes": [32, 99, 97, 116],
                                                "top_logprobs": []}
    piece = chunk(ident="c", created=5, model="demo", delta={"content": "x"}, include_usage=True)
    assert piece["object"] == "chat.completion.chunk" and piece["usage"] is None
    assert piece["choices"] == [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]
    assert "usage" not in chunk(ident="c", created=5, model="demo", delta={})
    last = usage_chunk(ident="c", created=5, model="demo", prompt_tokens=2, completion_tokens=3)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    assert sse(piece) == "data: " + json.dumps(piece, separators=(",", ":")) + "\n\n"
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_models_list_adapters_with_their_parent():
    listed = model_list([{"id": "base", "image_size": 224, "default": True},
                         {"id": "acme/lora", "image_size": 224, "default": False, "base": "base"}], created=9)
    assert listed["object"] == "list"
    base, adapter = listed["data"]
    assert base == {"id": "base", "object": "model", "created": 9, "owned_by": "paligemma-segmentation",
                    "root": "base", "parent": None, "image_size": 224, "default": True}
    assert (adapter["parent"], adapter["root"]) == ("base", "base")


@pytest.mark.parametrize(("status", "kind", "code"), [
    (400, "invalid_request_error", None), (401, "invalid_request_error", "invalid_api_key"),
    (404, "invalid_request_error", "not_found"), (413, "invalid_request_error", "request_too_large"),
    (429, "rate_limit_error", "rate_limit_exceeded"), (503, "server_error", "overloaded"), (500, "server_error", None),
])
def test_error_bodies(status, kind, code):
    assert error_body("why", status, param="p") == {"error": {"message": "why", "type": kind, "param": "p",
                                                              "code": code}}


def test_the_error_shape_for_the_service_s_error_answers():
    body = OpenAIErrorShape.body("missing or wrong API key", 401)
    assert json.loads(body) == error_body("missing or wrong API key", 401)
    assert OpenAIErrorShape.message(body) == "missing or wrong API key"
    for other in (b'{"error": "plain"}', b'[{"error": "a"}]', b"Not Found", b'{"error": {"type": "x"}}'):
        assert OpenAIErrorShape.message(other) is None
