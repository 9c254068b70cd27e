"""`dpllama serve` as a client sees it: a real server process on 127.0.0.1 and the official `openai` client.
Most tests use stories260K (a token in about a millisecond); the oracle test uses SmolLM2."""
from __future__ import annotations

import os
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from dpllama.constrain import grammar
from dpllama.hub import MODELS
from dpllama.model.weights import Tensor, Weights
from dpllama.tokenizer.gguf import _bytes_to_unicode
from tests.helpers import (NO_THINKING, QWEN3_CHAT_TEMPLATE, llama2c_dir, random_weights, shared_models,
                           smollm2_gguf_path, tiny_qwen3, write_test_gguf)
from tests.serving import REPO, Server

openai = pytest.importorskip("openai", reason="the serve tests need the test extra's openai client")
http = pytest.importorskip("httpx2", reason="openai's HTTP client, for what the openai client does not send")

MODEL = "stories260K.bin"
ANY = grammar()                 # JSON mode's: any object
PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went", "One day, a big dog", "The sun was", "Ben had a red",
           "In the park", "A little bird"]


def stories_args(*extra: str) -> list[str]:
    d = llama2c_dir()
    return ["-m", str(d / "stories260K.bin"), "-z", str(d / "tok512.bin"), *extra]


@pytest.fixture(scope="module")
def server():
    with Server(*stories_args("--parallel", "8")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def metric(server: Server, name: str) -> float:
    text = http.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def streamed(client, **kw) -> tuple[str, str, list]:
    """The text, finish reason and chunks of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1], chunks


def complete(client, prompt: str, **kw):
    return client.completions.create(**{"model": MODEL, "prompt": prompt, "temperature": 0, **kw})


def test_health_models_tokenize_detokenize(server):
    assert http.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL     # GET /v1/models/{model}, which was a bare 404
    with pytest.raises(openai.NotFoundError) as e:
        server.client().models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    ids = http.post(f"{server.url}/tokenize", json={"content": "Once upon a time"}, timeout=10).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    assert http.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=10).json()["content"].strip() == \
        "Once upon a time"
    # the special tokens /tokenize shows, /detokenize shows too (it dropped them)
    ids = http.post(f"{server.url}/tokenize", json={"content": "Once", "add_special": True},
                    timeout=10).json()["tokens"]
    assert ids[0] == 1 and http.post(f"{server.url}/detokenize", json={"tokens": ids + [2]},
                                     timeout=10).json()["content"] == "<s>Once</s>"


def test_chat_and_completions_streamed_and_not(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text, finish, chunks = streamed(client, model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                    stream_options={"include_usage": True})
    assert whole.choices[0].message.content == text and text
    assert whole.choices[0].finish_reason == finish == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 20

    done = complete(client, "Once upon a time", max_tokens=12)
    pieces = list(complete(client, "Once upon a time", max_tokens=12, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    assert done.choices[0].text.startswith(", there was")      # llama2.c's greedy continuation
    assert done.usage.prompt_tokens == 5 and done.usage.completion_tokens == 12


def test_stop_strings_are_never_sent(client):
    full = complete(client, "Once upon a time", max_tokens=40).choices[0].text
    stop = full[15:19]
    cut = full[:full.index(stop)]
    done = complete(client, "Once upon a time", max_tokens=40, stop=[stop, "zzzz"])
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    pieces = list(complete(client, "Once upon a time", max_tokens=40, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == cut
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text(client):
    def sample(seed):
        return complete(client, "The cat", max_tokens=40, seed=seed, temperature=1.0).choices[0].text
    first = sample(42)
    assert sample(42) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].token == c.token and c.logprob <= 0      # greedy: the chosen is the likeliest
    done = complete(client, "Once upon a time", max_tokens=5, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == done.choices[0].text


def test_streamed_chunks_carry_logprobs_as_openai_sends_them(server):
    """Each kind of chunk's logprobs as OpenAI's streams carry them: chat's role chunk null, or an empty list where
    they are asked for; a text chunk its tokens'; the chunk with finish_reason null (it had an empty list); the
    usage chunk no choices. Completions' last chunk, its text "", has empty lists where they are asked for."""
    def chunks(path: str, **body) -> list[dict]:
        body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **body}
        with http.stream("POST", f"{server.url}{path}", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]", lines
        *choices, usage = [json.loads(line[6:]) for line in lines[:-1]]
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6, usage
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in choices), choices
        return [c["choices"][0] for c in choices]
    for asked in (False, True):
        role, *texts, last = chunks("/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}],
                                    logprobs=asked)
        assert role["delta"] == {"role": "assistant", "content": ""} and role["finish_reason"] is None
        assert role["logprobs"] == ({"content": []} if asked else None), role
        assert last == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}, last
        assert [len(t["logprobs"]["content"]) if asked else t["logprobs"] for t in texts] == \
            ([1] * 6 if asked else [None] * 6), texts
        *texts, last = chunks("/v1/completions", prompt="Once upon a time", **({"logprobs": 1} if asked else {}))
        empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        assert last == {"index": 0, "text": "", "logprobs": empty if asked else None, "finish_reason": "length"}, last
        assert [len(t["logprobs"]["tokens"]) if asked else t["logprobs"] for t in texts] == \
            ([1] * 6 if asked else [None] * 6), texts


def test_bad_requests_are_400_naming_the_parameter(server, client):
    def refused(**kw):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw})
        return e.value
    for kw, param in [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                      ({"logit_bias": {"1": 5}}, "logit_bias"), ({"temperature": 5}, "temperature"),
                      ({"top_logprobs": 2}, "top_logprobs"),
                      ({"messages": [{"role": "user", "content": "x " * 2000}]}, "messages")]:
        e = refused(**kw)
        assert e.status_code == 400 and e.body["param"] == param, (kw, e.body)
    # JSON mode and JSON schemas are served (below); a schema that the reply cannot be held to is refused
    pattern = {"type": "object", "properties": {"a": {"type": "string", "pattern": "x(?=y)"}}}
    for fmt, message in [({"type": "xml"}, 'Input should be {"type": "text"}, {"type": "json_object"} or {"type": '
                                           '"json_schema", "json_schema": {...}}, found an object'),
                         ("json_object", 'Input should be {"type": "text"}'),
                         ({"type": "text", "schema": {}}, 'text takes no field "schema"'),
                         ({"type": "json_object", "schema": []}, "schema should be a JSON schema (an object)"),
                         ({"type": "json_schema"}, 'json_schema should be an object: {"name": ..., "schema": {...}}'),
                         ({"type": "json_schema", "json_schema": {"name": 3}}, "json_schema.name should be of name "
                                                                               "(str), description (str), schema"),
                         ({"type": "json_schema", "json_schema": {"name": "x", "schema": pattern}},
                          'the JSON schema: #/properties/a: "pattern": a lookaround or named group at character 2'),
                         ({"type": "json_object", "schema": {"type": "array"}},
                          "the JSON schema: the schema's root must be an object")]:
        e = refused(response_format=fmt)
        assert e.status_code == 400 and e.body["param"] == "response_format", e.body
        assert e.body["message"].startswith("response_format: " + message), e.body
    e = refused(extra_body={"stream_options": {"include_obfuscation": True}}, stream=True)
    assert e.status_code == 400 and e.body["param"] == "stream_options.include_obfuscation", e.body
    # what clients send with every request, asking for nothing more than the server does, is served
    neutral = {"tools": [], "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none",
               "parallel_tool_calls": True, "store": False, "metadata": None}
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi", "tool_calls": []}],
                                          max_tokens=2, **neutral)
    assert done.choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model=MODEL, prompt="Once", max_tokens=2, best_of=1, suffix="", logit_bias={})
    assert done.choices[0].finish_reason in ("stop", "length")
    e = refused(model="gpt-4")
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    # a text too long for the context whatever its tokens (tok512: 7 bytes a token at most, 512 per slot) is
    # refused without being encoded, which for megabytes would hold every stream
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "Once upon a time " * 211)     # 3,587 characters
    assert e.value.body["param"] == "prompt" and e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["message"] == ("the prompt is 3587 characters, more than the context of 512 tokens per slot "
                                       "holds (a token is at most 7 bytes)")
    r = http.post(f"{server.url}/tokenize", json={"content": "a" * 3585}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "content", r.text
    assert len(http.post(f"{server.url}/tokenize", json={"content": "a" * 3584}, timeout=10).json()["tokens"]) > 512
    # work in Python that grows with the body, refused before it is done: it would hold every stream
    r = http.post(f"{server.url}/detokenize", json={"tokens": [300] * 513}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "513 token ids, more than the context of 512 per slot"
    assert len(http.post(f"{server.url}/detokenize", json={"tokens": [300] * 512}, timeout=10).json()["content"]) > 512
    e = refused(messages=[{"role": "user", "content": ""}] * 513)
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages"
    r = http.post(f"{server.url}/v1/chat/completions", content=b'{"model": ', timeout=10,
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_json_mode_replies_are_json_from_their_first_token(client):
    """response_format json_object, chat and completions, streamed and not: stories260K, a model of children's
    stories, writes a JSON object's start from its first token (where it wrote a story) and goes on within one; cut
    by max_tokens, finish_reason is "length" (SmolLM2's objects close: test_json_mode_on_smollm2)."""
    messages = [{"role": "user", "content": "Hi"}]
    story = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                           response_format={"type": "json_object"})
    text, finish, _ = streamed(client, model=MODEL, messages=messages, max_tokens=40, temperature=0,
                               response_format={"type": "json_object"})
    assert whole.choices[0].message.content == text != story.choices[0].message.content
    assert text.lstrip().startswith("{") and ANY.feed(ANY.open, text.encode()) is not None, text
    assert whole.choices[0].finish_reason == finish == "length" and whole.usage.completion_tokens == 40
    for seed in (1, 2):
        done = complete(client, "Once upon a time", max_tokens=30, temperature=1.0, seed=seed,
                        extra_body={"response_format": {"type": "json_object"}}).choices[0]
        assert ANY.feed(ANY.open, done.text.encode()) is not None and done.finish_reason == "length", done


def test_json_schema_replies_are_its_documents_from_their_first_token(client):
    """response_format json_schema (Structured Outputs), chat and completions, streamed and not, and llama-server's
    json_object with a schema: stories260K's replies follow the schema from their first token, properties in its
    order, as far as max_tokens lets them go (SmolLM2's close: test_json_schema_on_smollm2)."""
    schema = {"type": "object", "properties": {"hero": {"type": "string"}, "mood": {"enum": ["happy", "sad"]},
                                               "age": {"type": "integer"}}, "required": ["hero", "mood", "age"]}
    g = grammar(schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                           response_format=fmt)
    text, finish, _ = streamed(client, model=MODEL, messages=messages, max_tokens=40, temperature=0,
                               response_format=fmt)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == finish
    assert re.match(r'\s*\{\s*"hero"', text) and g.feed(g.open, text.encode()) is not None, text
    for fmt in (fmt, {"type": "json_object", "schema": schema}):
        done = complete(client, "Once upon a time", max_tokens=30, temperature=1.0, seed=1,
                        extra_body={"response_format": fmt}).choices[0]
        assert g.feed(g.open, done.text.encode()) is not None, done


def test_stream_options_without_stream_are_refused(server):
    """stream_options on a request that does not stream is OpenAI's 400 (it was ignored), for chat and completions,
    stream false, null or absent; stream_options null is the default, and include_usage null in a stream too."""
    bodies = {"/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2},
              "/v1/completions": {"model": MODEL, "prompt": "Once", "max_tokens": 2}}
    for path, body in bodies.items():
        for stream in ({}, {"stream": False}, {"stream": None}):
            r = http.post(f"{server.url}{path}", json={**body, **stream, "stream_options": {"include_usage": True}},
                          timeout=60)
            assert r.status_code == 400 and r.json()["error"] == {
                "message": "stream_options is only allowed when stream is true", "type": "invalid_request_error",
                "param": "stream_options", "code": None}, (path, stream, r.text)
        r = http.post(f"{server.url}{path}", json={**body, "stream": False, "stream_options": None}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        with http.stream("POST", f"{server.url}{path}", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": None}},
                         timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and events[-1] == "data: [DONE]", events
        assert all("usage" not in json.loads(e[6:]) for e in events[:-1]), events


def test_a_body_longer_than_any_prompt_can_use_is_413(server):
    """A body is refused past 6 x ctx x the longest token's bytes + 64 KiB (tok512: 6 x 512 x 7 + 65,536), counted
    as it arrives, with a Content-Length or without (chunked), and read to its end so that the client gets the
    answer; at the limit the body is parsed and its prompt refused as too long for the context."""
    limit = 6 * 512 * 7 + 65536
    url = f"{server.url}/v1/completions"

    def body(size: int) -> bytes:
        head = f'{{"model": "{MODEL}", "max_tokens": 2, "prompt": "'.encode()
        return head + b"a" * (size - len(head) - 2) + b'"}'
    for size, chunked in ((limit + 1, False), (limit + 1, True), (8 << 20, False)):
        data = body(size)
        content = (data[i:i + 65536] for i in range(0, len(data), 65536)) if chunked else data
        r = http.post(url, content=content, timeout=60, headers={"content-type": "application/json"})
        assert r.status_code == 413, (size, chunked, r.text)
        assert r.json()["error"] == {"message": f"the request body is {size} bytes, more than the {limit} that any "
                                                "request can use with this model's context per slot",
                                     "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    r = http.post(url, content=body(limit), timeout=60, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert complete(server.client(), "Once upon a time", max_tokens=2).choices[0].finish_reason == "length"


def test_extreme_and_malformed_bodies_get_answers_not_server_errors(server):
    """Bodies a fuzzer sends: numbers JSON cannot hold (NaN, Infinity), values past any sensible range, lone
    surrogates, ids outside the vocabulary, values of the wrong JSON type. Each gets a 4xx in OpenAI's error shape
    naming the parameter as sent (messages[0].content, not pydantic's messages.0.content.str) or a normal completion
    of at most 2 tokens, never a 5xx, and the server stays healthy."""
    chat, completions = "/v1/chat/completions", "/v1/completions"
    hi = '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
    # the wrong JSON type, which pydantic's lax mode served as something else ("1" as 1, true as 1, 0 as false)
    refused = [(chat, f'{{"model": "{MODEL}", {hi}, "temperature": true}}', "temperature"),
               (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": "1"}}',
                "max_tokens"),
               (chat, f'{{"model": "{MODEL}", {hi}, "seed": "7"}}', "seed"),
               (chat, f'{{"model": "{MODEL}", {hi}, "stream": "false"}}', "stream"),
               (chat, f'{{"model": "{MODEL}", {hi}, "logprobs": 1}}', "logprobs"),
               (chat, f'{{"model": "{MODEL}", {hi}, "n": true}}', "n"),
               (chat, f'{{"model": "{MODEL}", {hi}, "stream": true, "stream_options": {{"include_usage": "yes"}}}}',
                "stream_options.include_usage"),
               (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": 5}}]}}', "messages[0].content"),
               (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": ["Hi"]}}]}}',
                "messages[0].content[0]"),
               (completions, f'{{"model": "{MODEL}", "prompt": "Once", "logprobs": true}}', "logprobs"),
               (completions, f'{{"model": "{MODEL}", "prompt": "Once", "echo": 0}}', "echo"),
               (completions, f'{{"model": "{MODEL}", "prompt": [1, true]}}', "prompt[1]"),
               (completions, f'{{"model": "{MODEL}", "prompt": 5}}', "prompt"),
               ("/tokenize", '{"content": "Hi", "add_special": "1"}', "add_special"),
               ("/detokenize", '{"tokens": [true]}', "tokens[0]"),
               (chat, f'{{"model": "{MODEL}", {hi}, "temperature": NaN}}', "temperature"),
               (chat, f'{{"model": "{MODEL}", {hi}, "top_p": NaN}}', "top_p"),
               (chat, f'{{"model": "{MODEL}", {hi}, "presence_penalty": -Infinity}}', "presence_penalty"),
               (chat, f'{{"model": "{MODEL}", {hi}, "repeat_penalty": Infinity}}', "repeat_penalty"),
               (chat, f'{{"model": "{MODEL}", {hi}, "max_tokens": 1.5}}', "max_tokens"),
               (chat, f'{{"model": "{MODEL}", {hi}, "stop": [1]}}', "stop[0]"),
               (completions, f'{{"model": "{MODEL}", "prompt": [], "max_tokens": 2}}', "prompt"),
               (completions, f'{{"model": "{MODEL}", "prompt": [-1], "max_tokens": 2}}', "prompt"),
               (completions, f'{{"model": "{MODEL}", "prompt": [512], "max_tokens": 2}}', "prompt"),
               ("/detokenize", '{"tokens": [9223372036854775808]}', "tokens"),
               ("/detokenize", '{"tokens": [1.5]}', "tokens[0]")]
    served = [(chat, f'{{"model": "{MODEL}", {hi}, "top_k": 1000000000000, "temperature": 0.5}}'),
              (chat, f'{{"model": "{MODEL}", {hi}, "seed": {2 ** 80}, "temperature": 0.5}}'),
              (chat, f'{{"model": "{MODEL}", {hi}, "seed": -5, "temperature": 0.5}}'),
              (chat, f'{{"model": "{MODEL}", {hi}, "repeat_last_n": 1000000000000, "frequency_penalty": 1}}'),
              (chat, f'{{"model": "{MODEL}", {hi}, "repeat_last_n": 0, "repeat_penalty": 1.5}}'),
              (chat, f'{{"model": "{MODEL}", {hi}, "repeat_penalty": 1e-38}}'),     # logits / 1e-38 overflow
              (chat, f'{{"model": "{MODEL}", {hi}, "repeat_penalty": 1e-38, "repeat_last_n": -1}}'),   # on the host
              (chat, f'{{"model": "{MODEL}", {hi}, "stop": ["", ""]}}'),
              (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\ud800"}}], "max_tokens": 2}}'),
              (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": {10 ** 20}}}'),
              (completions, f'{{"model": "{MODEL}", "prompt": [1, 2, 3], "max_tokens": 2}}'),
              # null is the default, as OpenAI takes it (it was refused where the default is not null)
              (chat, f'{{"model": "{MODEL}", {hi}, "temperature": null, "top_p": null, "stream": null, "n": null}}'),
              (completions, f'{{"model": "{MODEL}", "prompt": "Once", "max_tokens": 2, "echo": null, '
                            f'"stream_options": null}}'),
              # a whole number written as JSON may write it
              (completions, f'{{"model": "{MODEL}", "prompt": [1.0, 2], "max_tokens": 2.0, "seed": 1.0}}')]
    post = lambda path, body: http.post(f"{server.url}{path}", content=body.encode(), timeout=60,
                                        headers={"content-type": "application/json"})
    for path, body, param in refused:
        r = post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    # what the field should be and what it was; a body that is not an object, or not UTF-8, says so
    for path, body, message in [
            (chat, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": "1"}}',
             'max_tokens: Input should be a valid integer, found "1"'),
            (completions, f'{{"model": "{MODEL}", "prompt": "Once", "stop": 5}}',
             "stop: Input should be a string or a list of strings, found 5"),
            (completions, "[]", "the body should be a JSON object, found an array of 0"),
            ("/tokenize", '"Hi"', 'the body should be a JSON object, found "Hi"'),
            ("/detokenize", '{"tokens": "\u00ff"}', 'tokens: Input should be a valid list, found "\\u00ff"')]:
        assert post(path, body).json()["error"]["message"] == message, body
    r = http.post(f"{server.url}{completions}", content=b'{"model": "\xff"}', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON: 'utf-8' "
                                                                            "codec can't decode byte 0xff"), r.text
    # a temperature that is 0 in float32 is greedy, as on the device, with log-probabilities (drawn on the host)
    # too, where it divided the logits by 0 and drew the same nonsense token every time
    greedy = json.loads(f'{{"model": "{MODEL}", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}}')
    texts = [post(completions, json.dumps({**greedy, **kw})).json()["choices"][0]["text"]
             for kw in ({}, {"temperature": 1e-300, "logprobs": 1}, {"temperature": 1e-300})]
    assert texts[1:] == texts[:1] * 2, texts
    for path, body in served:
        r = post(path, body)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (body, r.text)
    # JSON whatever the Content-Type says: none, curl -d's form type, text
    body = f'{{"model": "{MODEL}", "prompt": "Once", "max_tokens": 2, "temperature": 0}}'.encode()
    want = post(completions, body.decode()).json()["choices"][0]["text"]
    for kind in (None, "application/x-www-form-urlencoded", "text/plain"):
        r = http.post(f"{server.url}{completions}", content=body, timeout=60,
                      headers={"content-type": kind} if kind else {})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (kind, r.text)
    # OpenAI's "developer" messages are its newer models' system prompt
    said = [post(chat, json.dumps({"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]})).json() for role in
        ("system", "developer")]
    assert said[0]["choices"][0]["message"] == said[1]["choices"][0]["message"], said
    # a client gone before its body is whole: 499 in the log (nobody reads it), not a 500 and a traceback
    for path in (chat, "/tokenize"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
            c.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"model\"".encode())
        assert server.wait_for(f"dpllama: 127.0.0.1 POST {path} 499 ", 10)
    assert not [line for line in server.lines if "Traceback" in line or line.startswith("ERROR")], \
        "\n".join(server.lines)
    assert http.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize("option, message", [(("--parallel", "0"), "--parallel must be at least 1, found 0"),
                                             (("--batch-size", "0"), "--batch-size must be at least 1, found 0"),
                                             (("--port", "70000"), "--port must be between 0 and 65535, found 70000"),
                                             (("--api-key", " , "), "--api-key ' , ': no key in it (from the command "
                                              "line or $DPLLAMA_API_KEY); leave it out for a server without keys"),
                                             (("--drain-timeout", "inf"), "--drain-timeout must be between 0 and 86400 "
                                              "seconds, found inf"),
                                             (("--api-key-file", "/dev/zero"), "--api-key-file /dev/zero: not a regular "
                                              "file"),
                                             (("--chat-template-kwargs", "[]"), "--chat-template-kwargs must be a JSON "
                                              "object, found '[]'"),
                                             (("--chat-template-kwargs", '{"eos_token": ""}'), "--chat-template-kwargs "
                                              """'{"eos_token": ""}': eos_token is the chat template's own variable, """
                                              "which dpllama sets")])
def test_bad_options_are_one_line_errors(repo_root, option, message):
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "serve", *stories_args(*option)], capture_output=True,
                       text=True, cwd=repo_root, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"dpllama: error: {message}"], r.stderr


def test_api_key_file_that_is_not_text(repo_root, tmp_path):
    keys = tmp_path / "keys"
    keys.write_bytes(b"key\n\xff\xfe\n")
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "serve", *stories_args("--api-key-file", str(keys))],
                       capture_output=True, text=True, cwd=repo_root, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"dpllama: error: --api-key-file {keys}: not UTF-8 text (byte 4)"], r.stderr


@pytest.mark.parametrize("variable, value, message", [
    ("ACTIVATION_BITS", "7", "--activation-bits: must be 16 or 8, found '7'"),
    ("REASONING_FORMAT", "deepseek-legacy",
     "--reasoning-format: must be auto, deepseek or none, found 'deepseek-legacy'")])
def test_bad_option_from_the_environment_stops_before_listening(repo_root, variable, value, message):
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "serve", *stories_args()], capture_output=True,
                       text=True, cwd=repo_root, timeout=60, env=dict(os.environ, **{f"DPLLAMA_{variable}": value}))
    assert r.returncode == 2 and "listening" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(f"argument {message}"), r.stderr


def test_chat_template_kwargs_from_the_environment_are_checked_before_listening(repo_root):
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "serve", *stories_args()], capture_output=True,
                       text=True, cwd=repo_root, timeout=60, env=dict(os.environ, DPLLAMA_CHAT_TEMPLATE_KWARGS="true"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "dpllama: error: --chat-template-kwargs must be a JSON object, found 'true'"], r.stderr


def test_chat_template_kwargs_of_the_server_and_of_a_request(tmp_path):
    """--chat-template-kwargs are extra variables of the chat template for every chat request; a request's
    chat_template_kwargs go over them (null or {}: the server's alone). Qwen3's template thinks unless
    enable_thinking is false; the prompt's tokens (usage.prompt_tokens) show how it rendered. A request's that is
    not an object, or sets one of the template's own variables, is a 400 naming it."""
    from dpllama.tokenizer import load_gguf_tokenizer
    path = tmp_path / "qwen3.gguf"
    tiny_qwen3(path, QWEN3_CHAT_TEMPLATE)
    tok = load_gguf_tokenizer(path)
    hi = {"model": "qwen3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with Server("-m", str(path), "--model-name", "qwen3", "--chat-template-kwargs", '{"enable_thinking": false}') as s:
        for kwargs, tail in (({}, NO_THINKING), ({"chat_template_kwargs": None}, NO_THINKING),
                             ({"chat_template_kwargs": {}}, NO_THINKING),
                             ({"chat_template_kwargs": {"enable_thinking": True}}, ""),
                             ({"chat_template_kwargs": {"enable_thinking": None}}, "")):
            r = http.post(f"{s.url}/v1/chat/completions", json={**hi, **kwargs}, timeout=60)
            want = tok.encode(f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{tail}", parse_special=True)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), (kwargs, r.text)
        for kwargs, message in (("enable_thinking", 'Input should be a valid dictionary, found "enable_thinking"'),
                                ([], "Input should be a valid dictionary, found an array of 0"),
                                ({"messages": []}, "messages is the chat template's own variable, which dpllama sets")):
            r = http.post(f"{s.url}/v1/chat/completions", json={**hi, "chat_template_kwargs": kwargs}, timeout=60)
            assert r.status_code == 400 and r.json()["error"] == {
                "message": f"chat_template_kwargs: {message}",
                "type": "invalid_request_error", "param": "chat_template_kwargs", "code": None}, r.text


# Replies a model gives greedily, each after the prompt's last token (the script's first): a thought in whole tags,
# one in tags cut in two tokens (with a "<" in it that is no tag), and one that a template opens (the prompt ends in
# "<think>\n"); the end-of-text token ends each
SCRIPTS = {"A": ["A", "<think>", "\n\n", "Hm", " so", " \n", "</think>", "\n\n\n", "Yes", ".", "<|im_end|>"],
           "B": ["B", "<th", "ink>", "x", "<", "y", "</", "think>", " ", "No", "<|im_end|>"],
           "C": ["\n", "Why", "</think", ">", "Ok", "<|im_end|>"]}
THOUGHTS = {"A": ("Hm so", "Yes."), "B": ("x<y", "No"), "C": ("Why", "Ok")}    # reasoning_content, content
# the conversation's text, and a "<think>\n" after it with the template variable think (C's)
SCRIPTED_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if think %}<think>\n{% endif %}"


def scripted_gguf(path, scripts: dict = SCRIPTS, template: str = SCRIPTED_TEMPLATE,
                  tags: tuple = ("<think>", "</think>"), seq_len: int = 64) -> None:
    """A GGUF whose greedy reply to a prompt that ends in a script's first token is the rest of that script (a token
    other than the end-of-text one appears once in all the scripts: what follows it is the script's next). Its one
    layer adds nothing to the residual stream (its output projections are zero), so that the last hidden state is
    the RMS-normalized embedding of the latest token; the embeddings are random unit vectors, and the LM head's row
    of each token of a script is 10 times the embedding of the token before it there (the sum of them for the
    end-of-text token, which ends every script): its logit is 75 or more, the others' below 40. Byte-level BPE
    with the scripts' tokens added, the `tags` user-defined, as <think> and </think> are in Qwen3's vocabulary."""
    from tests.test_tokenizer import gpt2_fields
    fields = gpt2_fields(**{"tokenizer.chat_template": template})
    tokens, chars, tags = fields["tokenizer.ggml.tokens"], _bytes_to_unicode(), set(tags)
    forms = {t: t if t in tokens or t in tags else "".join(chars[b] for b in t.encode())     # as the vocabulary has it
             for script in scripts.values() for t in script}
    added = sorted(set(forms.values()) - set(tokens))
    tokens += added
    fields["tokenizer.ggml.token_type"] += [4 if t in tags else 1 for t in added]
    ids = {t: tokens.index(form) for t, form in forms.items()}
    w = random_weights(dim=64, hidden=32, n_layers=1, vocab=len(tokens), seq_len=seq_len, shared=False)
    rng = np.random.default_rng(1)
    embedding = rng.standard_normal((len(tokens), 64))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    head = np.zeros_like(embedding)
    for script in scripts.values():
        for before, token in zip(script, script[1:]):
            head[ids[token]] += 10 * embedding[ids[before]]
    zero = {name: Tensor.f32(np.zeros((getattr(w.layers[0], name).rows, getattr(w.layers[0], name).cols)))
            for name in ("wo", "w2")}
    write_test_gguf(path, Weights(w.config, Tensor.f32(embedding), [replace(w.layers[0], **zero)],
                                  np.ones(64, np.float32), Tensor.f32(head)), tokenizer=fields)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinker") / "thinker.gguf"
    scripted_gguf(path)
    with Server("-m", str(path), "--model-name", "thinker", "--parallel", "2") as s:
        yield s


def scripted(script: str, **body) -> dict:
    """A greedy chat request for a script's reply (C's prompt opens the thinking in the template)."""
    kwargs = {"chat_template_kwargs": {"think": True}} if script == "C" else {}
    return {"model": "thinker", "messages": [{"role": "user", "content": script}], "temperature": 0, **kwargs, **body}


def chat_events(server: Server, body: dict) -> list[dict]:
    """A streamed chat completion's chunks' choices (the usage chunk's, [], left out)."""
    with http.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
    return [c["choices"][0] for c in map(lambda line: json.loads(line[6:]), lines[:-1]) if c["choices"]]


def thought(choices: list[dict]) -> tuple[str, str]:
    """A stream's reasoning_content and content, each delta holding one of them, the reasoning's all first."""
    deltas = [c["delta"] for c in choices[1:]]      # after the role's
    kinds = [next(iter(d), None) for d in deltas]
    assert all(len(d) == 1 for d in deltas[:-1]) and deltas[-1] == {}, deltas
    assert kinds[:-1] == sorted(kinds[:-1], key=["reasoning_content", "content"].index), deltas
    return tuple("".join(d.get(k, "") for d in deltas) for k in ("reasoning_content", "content"))


def test_thinking_is_sent_as_reasoning_content(thinker):
    """--reasoning-format's default (auto): a reply's thinking is message.reasoning_content, less the whitespace around
    it, and the content is the answer after </think>; streamed, reasoning_content deltas come first, then content
    ones, and no part of a tag is in either, whole tokens or cut ("<th" + "ink>": held back until decided); with the
    thinking opened by the template, the reply is a thought from its first token. Usage and the log-probabilities,
    per token, are as they were."""
    for script, (reasoning, content) in THOUGHTS.items():
        tokens = len(SCRIPTS[script]) - 1
        whole = http.post(f"{thinker.url}/v1/chat/completions", json=scripted(script, logprobs=True), timeout=60).json()
        choice = whole["choices"][0]
        assert choice["message"] == {"role": "assistant", "reasoning_content": reasoning, "content": content}, whole
        assert choice["finish_reason"] == "stop" and whole["usage"]["completion_tokens"] == tokens, whole
        assert [t["token"] for t in choice["logprobs"]["content"]] == SCRIPTS[script][1:-1], whole     # as before:
        # the end-of-text token counted in the usage, not among them
        choices = chat_events(thinker, scripted(script, logprobs=True, stream_options={"include_usage": True}))
        assert thought(choices) == (reasoning, content), choices
        assert [t["token"] for c in choices[1:-1] for t in c["logprobs"]["content"]] == SCRIPTS[script][1:-1], choices
        for c in choices[1:-1]:
            text = next(iter(c["delta"].values()))
            assert not re.search(r"<t|</|k>|ink|think", text) and c["logprobs"]["content"], (script, choices)
    # the openai client's message and delta have it
    client = thinker.client()
    message = client.chat.completions.create(**scripted("A")).choices[0].message
    assert (message.reasoning_content, message.content) == THOUGHTS["A"]
    chunks = list(client.chat.completions.create(**scripted("B"), stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "x<y"


def test_a_reply_cut_in_its_thinking_is_reasoning_content_only(thinker):
    """max_tokens or a stop string inside the thinking: reasoning_content so far, content "" (a stop string applies to
    the whole reply, the thinking too, as llama-server's). The start of a tag that the reply ends in is text (B's "</",
    which llama-server drops); a reply of only <think> has no reasoning_content, as llama-server's; a stop in the
    answer cuts the content."""
    for body, reasoning, content, finish in ((scripted("A", max_tokens=4), "Hm so", "", "length"),
                                             (scripted("B", max_tokens=6), "x<y</", "", "length"),
                                             (scripted("C", max_tokens=1), "Why", "", "length"),
                                             (scripted("A", stop=[" so"]), "Hm", "", "stop"),
                                             (scripted("A", stop=["."]), "Hm so", "Yes", "stop"),
                                             (scripted("A", max_tokens=1), None, "", "length")):
        r = http.post(f"{thinker.url}/v1/chat/completions", json=body, timeout=60).json()
        choice = r["choices"][0]
        assert (choice["message"].get("reasoning_content"), choice["message"]["content"], choice["finish_reason"]) \
            == (reasoning, content, finish), (body, r)
        choices = chat_events(thinker, body)
        assert thought(choices) == (reasoning or "", content) and choices[-1]["finish_reason"] == finish, choices


def test_reasoning_format_of_a_request(thinker):
    """A request's reasoning_format: none leaves the thinking in the content, streamed or not, as it came (after an
    opened one, the rest of it and </think>); auto and deepseek, or null (the server's), take it out. Anything else is
    a 400 naming it, and completions, whose text is raw, have no such parameter."""
    for script, raw in (("A", "".join(SCRIPTS["A"][1:-1])), ("C", "Why</think>Ok")):
        r = http.post(f"{thinker.url}/v1/chat/completions", json=scripted(script, reasoning_format="none"), timeout=60)
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": raw}, r.text
        assert thought(chat_events(thinker, scripted(script, reasoning_format="none"))) == ("", raw)
    for value in ("auto", "deepseek", None):
        r = http.post(f"{thinker.url}/v1/chat/completions", json=scripted("B", reasoning_format=value), timeout=60)
        assert r.json()["choices"][0]["message"]["reasoning_content"] == "x<y", (value, r.text)
    for value in ("deepseek-legacy", "None", 1, True, ["none"]):
        r = http.post(f"{thinker.url}/v1/chat/completions", json=scripted("A", reasoning_format=value), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format", (value, r.text)
        assert r.json()["error"]["message"].startswith("reasoning_format: Input should be 'auto', 'deepseek' or "
                                                       "'none', found "), r.text
    r = http.post(f"{thinker.url}/v1/completions", json={"model": "thinker", "prompt": "A", "reasoning_format": "none"},
                  timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
    done = http.post(f"{thinker.url}/v1/completions", json={"model": "thinker", "prompt": "A", "temperature": 0},
                     timeout=60).json()
    assert done["choices"][0]["text"] == "".join(SCRIPTS["A"][1:-1]), done


def test_reasoning_format_none_of_the_server(tmp_path):
    """--reasoning-format none (here from $DPLLAMA_REASONING_FORMAT): the thinking stays in the content; a request's
    deepseek takes it out."""
    path = tmp_path / "thinker.gguf"
    scripted_gguf(path)
    with Server("-m", str(path), "--model-name", "thinker", env={"DPLLAMA_REASONING_FORMAT": "none"}) as s:
        for value, message in ((None, {"content": "".join(SCRIPTS["B"][1:-1])}),
                               ("deepseek", {"reasoning_content": "x<y", "content": "No"})):
            r = http.post(f"{s.url}/v1/chat/completions", json=scripted("B", reasoning_format=value), timeout=60)
            assert r.json()["choices"][0]["message"] == {"role": "assistant", **message}, r.text


def test_thinking_splits_a_reply_the_same_however_its_text_comes():
    """The split of a reply's text (Thinking, in the server) is the same whole or cut anywhere into up to three
    pieces, and what it lets go of a piece is never taken back (part of a tag, whitespace that ends a thought):
    whitespace before <think> stays in the content, a <think> after </think> thinks on, the start of a tag that the
    text ends in is text, and a thinking the prompt opened has no <think> of its own."""
    from itertools import combinations
    from dpllama.serve.app import Thinking
    cases = {("<think>\n\nHm so \n</think>\n\n\nYes.", False): ("Hm so", "Yes."),
             ("  <think>a</think>b ", False): ("a", "  b "),
             ("<think>a</think> <think> b </think> c", False): ("ab", "c"),
             ("<think>x<y</thinking>", False): ("x<y</thinking>", ""),
             ("Hi <think>", False): ("", "Hi <think>"), ("\n<th", False): ("", "\n<th"),
             ("\nWhy </think>Ok", True): ("Why", "Ok"), ("<think>W </th", True): ("W </th", "")}
    for (text, opened), want in cases.items():
        for n in range(3):
            for cuts in combinations(range(1, len(text)), n):
                thinking, got = Thinking(True, opened), ("", "")
                for start, end in zip((0, *cuts), (*cuts, len(text))):
                    got = tuple(map(str.__add__, got, thinking.push(text[start:end])))
                    assert want[0].startswith(got[0]) and want[1].startswith(got[1]), (text, cuts, got)
                assert tuple(map(str.__add__, got, thinking.push("", final=True))) == want, (text, opened, cuts)


def test_missing_model_file_stops_before_listening(repo_root, tmp_path):
    missing = tmp_path / "nope.gguf"
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "serve", "-m", str(missing), "--port", "0"],
                       capture_output=True, text=True, cwd=repo_root, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"dpllama: error: {missing}: model file not found (known names: {', '.join(MODELS)}; "
        f"or hf:OWNER/REPO/FILE.gguf)"], r.stderr


def test_api_keys_from_options_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one a line\nfile-key\n")
    with Server(*stories_args("--api-key", "k1,k2", "--api-key-file", str(keys)),
                env={"DPLLAMA_MAX_WAITING": "3"}) as s:
        for key in ("k1", "k2", "file-key"):
            assert s.client(key).models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert http.get(f"{s.url}/health", timeout=10).status_code == 200     # probes need no key
        # the key is checked before the body is read: without one, a body is not even parsed
        r = http.post(f"{s.url}/v1/chat/completions", content=b'{"model": ', timeout=10,
                      headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


def test_full_queue_is_429_and_a_gone_client_cancels_its_request():
    """One slot and four places in the queue: of ten long requests at once, some are refused with 429. A stream
    closed while it runs, and one closed while it waits behind four others, end as cancelled in the metrics."""
    with Server(*stories_args("--parallel", "1", "--max-waiting", "4")) as s:
        client = s.client()

        def long_request(_):
            try:
                complete(client, "Once upon a time", max_tokens=400)
                return 200
            except openai.APIStatusError as e:
                return e.status_code
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(long_request, range(10)))
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert metric(s, 'dpllama_requests_rejected_total{status="429"}') == codes.count(429)

        def cancelled(n):
            deadline = time.monotonic() + 10
            while metric(s, 'dpllama_requests_finished_total{reason="cancelled"}') < n and time.monotonic() < deadline:
                time.sleep(0.02)
            return metric(s, 'dpllama_requests_finished_total{reason="cancelled"}') == n
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
        with http.Client(timeout=30) as c:
            with c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
                next(r.iter_lines())      # its first token: it runs, and its connection closes now
            assert cancelled(1), "\n".join(s.lines)
            with ThreadPoolExecutor(4) as pool:
                ahead = [pool.submit(long_request, i) for i in range(4)]
                deadline = time.monotonic() + 10
                while metric(s, "dpllama_requests_waiting") < 3 and time.monotonic() < deadline:
                    time.sleep(0.005)
                with c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
                    assert r.status_code == 200     # and closed at once, behind at least three others
                assert [f.result() for f in ahead] == [200] * 4
        assert cancelled(2), "\n".join(s.lines)
        assert metric(s, "dpllama_requests_running") == 0 and metric(s, "dpllama_requests_waiting") == 0
        assert sum("finish=cancelled" in line for line in s.lines) == 2


def test_a_follow_up_reuses_the_slots_cached_prefix():
    """One slot: a follow-up whose prompt extends the previous request's prompt and reply reads only what is new
    (usage's cached_tokens, the metrics), and answers as it does with nothing cached."""
    with Server(*stories_args("--parallel", "1")) as s:
        client = s.client()
        first = complete(client, "Once upon a time", max_tokens=24)
        follow_up = "Once upon a time" + first.choices[0].text + " Then"
        reused = complete(client, follow_up, max_tokens=24)
        cached = reused.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # all of the first prompt and most of its reply (text re-encoded may split differently at the seam)
        assert first.usage.prompt_tokens <= cached < reused.usage.prompt_tokens
        assert metric(s, "dpllama_prompt_tokens_cached_total") == cached
        complete(client, "Zebras", max_tokens=4)                 # the slot now holds something else
        again = complete(client, follow_up, max_tokens=24)
        assert again.usage.prompt_tokens_details.cached_tokens <= 1    # BOS at most
        assert again.choices[0].text == reused.choices[0].text


def test_two_conversations_on_two_slots_keep_their_slots():
    """Two slots, two conversations taking turns: each follow-up reads only its new text. A new conversation shares
    BOS with the slot the other left, which the longest prefix alone chose over the empty slot: each turn then
    took the other's slot and read its whole conversation again."""
    with Server(*stories_args("--parallel", "2")) as s:
        client, prompts = s.client(), ["Once upon a time", "The cat sat on"]
        firsts = [complete(client, p, max_tokens=16) for p in prompts]
        for p, first in zip(prompts, firsts):
            again = complete(client, p + first.choices[0].text + " Then", max_tokens=8)
            assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens, (p, again.usage)


def test_sigterm_finishes_the_running_stream_then_exits():
    s = Server(*stories_args())
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True}
        with http.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
        with pytest.raises(http.ConnectError):
            http.get(f"{s.url}/health", timeout=5)
        assert s.wait_for("dpllama: SIGTERM: ", 10).endswith("those running have 30 s to finish")
        assert s.wait_for("dpllama: stopped", 10)
    finally:
        s.stop()


def test_sigterm_while_the_model_loads_stops_at_once(tmp_path):
    """SIGTERM while /health still says 503 stops the server within 2 s, with one line and status 0, where it waited
    for the whole load. Empty kernel caches, dpllama's and PoCL's, make the load compile (~5 s on 2 cores)."""
    (tmp_path / "pocl").mkdir()
    s = Server(*stories_args(), ready="dpllama: listening",
               env={"DPLLAMA_HOME": str(tmp_path / "home"), "POCL_CACHE_DIR": str(tmp_path / "pocl")})
    try:
        assert http.get(f"{s.url}/health", timeout=10).status_code == 503
        s.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert s.proc.wait(30) == 0
        assert time.monotonic() - start < 2, "\n".join(s.lines)
        assert s.wait_for("dpllama: SIGTERM: ", 5) == "dpllama: SIGTERM: stopped while the model was loading"
        assert not [line for line in s.lines if line.startswith(("dpllama: ready", "dpllama: stopped", "Traceback"))], \
            "\n".join(s.lines)
    finally:
        s.stop()


def test_sigterm_answers_what_the_drain_time_cuts_off_with_503():
    """--drain-timeout 1 and a stream that needs ~10 s (SmolLM2, 2,000 tokens): 1 s after SIGTERM the engine cancels
    it, and its stream ends with an error event, as the request waiting behind it gets a 503, before the connections
    close; no traceback in the log (uvicorn's own deadline, which cancelled the responses' tasks, logged them)."""
    with Server("-m", str(smollm2_gguf_path()), "--drain-timeout", "1", "--model-name", "smollm2") as s:
        body = {"model": "smollm2", "prompt": "Once", "max_tokens": 2000, "temperature": 0, "stream": True}
        with ThreadPoolExecutor(1) as pool, http.Client(timeout=60) as c, \
                c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            behind = pool.submit(http.post, f"{s.url}/v1/completions", json={**body, "stream": False}, timeout=60)
            deadline = time.monotonic() + 30
            while metric(s, "dpllama_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
            assert json.loads(rest[-1][6:])["error"] == {"message": "the server shut down before the request was done",
                                                         "type": "unavailable_error", "param": None, "code": None}
            answer = behind.result()
        assert answer.status_code == 503 and "shut down" in answer.json()["error"]["message"]
        assert s.proc.wait(30) == 0
        assert s.wait_for("dpllama: stopped", 10)
        assert s.wait_for("dpllama: SIGTERM: ", 1).endswith("those running have 1 s to finish")
        assert sum("finish=cancelled" in line for line in s.lines) == 2, "\n".join(s.lines)
        assert not [line for line in s.lines if "Traceback" in line or line.startswith("ERROR")], "\n".join(s.lines)


def test_sigterm_answers_a_body_still_arriving_with_503_at_once():
    """A request whose body has not all come when SIGTERM does is not running yet: it gets its 503 at once, not a
    bare 500 from uvicorn at the drain time's end (30 s here) plus 10 s, with a traceback in the log."""
    with Server(*stories_args()) as s:
        body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=20) as c:
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(1)       # the server has the request's head (nothing it says tells when)
            s.proc.send_signal(signal.SIGTERM)
            pieces = [c.recv(65536)]        # the head and the body may come apart; the server closes after them
            while pieces[-1]:
                pieces.append(c.recv(65536))
            answer = b"".join(pieces).decode()
        assert answer.startswith("HTTP/1.1 503 "), answer
        assert json.loads(answer.split("\r\n\r\n", 1)[1])["error"]["message"] == "the server is shutting down"
        assert s.proc.wait(30) == 0
        assert not [line for line in s.lines if "Traceback" in line or line.startswith("ERROR")], "\n".join(s.lines)


def test_ctrl_c_stops_the_server_as_sigterm_does():
    with Server(*stories_args()) as s:
        assert complete(s.client(), "Once", max_tokens=2).choices[0].finish_reason == "length"
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(30) == 0
        assert s.wait_for("dpllama: SIGINT: ", 10) and s.wait_for("dpllama: stopped", 10)


def test_sigterm_stops_the_server_once_nobody_reads_its_log():
    """`dpllama serve 2>&1 | head`, or a log shipper gone: writing the log fails (EPIPE), and the server goes on
    serving, then stops at SIGTERM with status 0 (the handler's log line used to raise before it stopped anything,
    so that only SIGKILL ended it)."""
    proc = subprocess.Popen([sys.executable, "-m", "dpllama.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                             *stories_args()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        lines = []
        while not lines or not lines[-1].startswith("dpllama: ready"):
            lines.append(proc.stderr.readline())
            assert lines[-1], lines
        url = re.search(r"http://127\.0\.0\.1:\d+", "".join(lines)).group(0)
        proc.stderr.close()
        done = http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 2}, timeout=30)
        assert done.status_code == 200 and http.get(f"{url}/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_eight_concurrent_greedy_streams_match_their_solo_outputs(server, client):
    def solo(prompt):
        return complete(client, prompt, max_tokens=48).choices[0].text
    alone = [solo(p) for p in PROMPTS]

    def stream(prompt):
        return "".join(p.choices[0].text for p in complete(client, prompt, max_tokens=48, stream=True))
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, PROMPTS))
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_detokenize_gives_special_tokens_text():
    """/detokenize renders special tokens' text, as llama-server's does, so that /tokenize's ids (its special tokens
    parsed) come back as the text they came from; it dropped them. A completion's text still leaves them out."""
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with Server("-m", str(smollm2_gguf_path()), "--ctx", "64", "--model-name", "smollm2") as s:
        tokens = http.post(f"{s.url}/tokenize", json={"content": chat, "with_pieces": True},
                           timeout=10).json()["tokens"]
        ids = [t["id"] for t in tokens]
        assert [t["piece"] for t in tokens if t["id"] == ids[0]] == ["<|im_start|>"] * 3, tokens
        assert http.post(f"{s.url}/detokenize", json={"tokens": ids}, timeout=10).json() == {"content": chat}
        done = s.client().completions.create(model="smollm2", prompt=ids, max_tokens=24, temperature=0).choices[0]
        assert done.finish_reason == "stop" and "<|im_end|>" not in done.text and done.text, done


def test_json_mode_on_smollm2():
    """SmolLM2 asked for JSON with response_format json_object: each reply, greedy (whole and streamed, alike) or
    sampled with a seed, chat or completion, is one object that json.loads reads as a dict, and finish_reason is
    "stop" as it closes; cut short by max_tokens it is "length" and the text no JSON, as OpenAI's."""
    ask = [{"role": "user", "content": "Reply in JSON: the name and age of a person called Bob who is 30."}]
    with Server("-m", str(smollm2_gguf_path()), "--parallel", "2", "--ctx", "512", "--model-name", "smollm2") as s:
        client = s.client()

        def chat(**kw):
            return client.chat.completions.create(**{"model": "smollm2", "messages": ask, "max_tokens": 200,
                                                     "response_format": {"type": "json_object"}, **kw})
        whole = chat(temperature=0).choices[0]
        text, finish, _ = streamed(client, model="smollm2", messages=ask, max_tokens=200, temperature=0,
                                   response_format={"type": "json_object"})
        assert (whole.message.content, whole.finish_reason) == (text, finish) == (text, "stop")
        assert json.loads(text)["name"] == "Bob", text
        for seed in (1, 2, 3):
            done = chat(temperature=0.7, seed=seed).choices[0]
            assert isinstance(json.loads(done.message.content), dict) and done.finish_reason == "stop", done
        done = client.completions.create(model="smollm2", prompt="A JSON object:", max_tokens=200, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}}).choices[0]
        assert isinstance(json.loads(done.text), dict) and done.finish_reason == "stop", done
        cut = chat(temperature=0, max_tokens=5).choices[0]
        assert cut.finish_reason == "length" and cut.message.content == text[:len(cut.message.content)], cut
        with pytest.raises(ValueError):
            json.loads(cut.message.content)


def test_json_schema_on_smollm2():
    """Structured Outputs as the official client asks for them: `chat.completions.parse` with a Pydantic model (which
    it sends as a strict json_schema: $defs, $ref, enums, anyOf with null, maxItems) gives the model back, greedy and sampled,
    finish_reason "stop" as the object closes; the greedy reply is the same streamed."""
    from enum import Enum
    from typing import Optional
    from pydantic import BaseModel, Field

    class Color(str, Enum):
        red = "red"
        green = "green"
        blue = "blue"

    class Pet(BaseModel):
        name: str
        color: Color

    class Person(BaseModel):
        name: str
        age: int
        nickname: Optional[str]
        pets: list[Pet] = Field(max_length=2)     # maxItems: greedy, SmolLM2 lists pets until the tokens run out

    ask = [{"role": "user", "content": "Describe Bob, who is 30 and has a green cat called Tom, in JSON."}]
    with Server("-m", str(smollm2_gguf_path()), "--parallel", "2", "--ctx", "512", "--model-name", "smollm2") as s:
        client = s.client()
        replies = []
        for kw in ({"temperature": 0}, {"temperature": 0.7, "seed": 1}, {"temperature": 0.7, "seed": 2}):
            done = client.chat.completions.parse(model="smollm2", messages=ask, max_tokens=200, response_format=Person,
                                                 **kw).choices[0]
            assert done.finish_reason == "stop" and isinstance(done.message.parsed, Person), done
            replies.append(done.message)
        assert replies[0].parsed.name == "Bob" and replies[0].parsed.age == 30, replies[0].content
        schema = Person.model_json_schema()
        text, finish, _ = streamed(client, model="smollm2", messages=ask, max_tokens=200, temperature=0,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "Person", "schema": schema}})
        assert finish == "stop" and Person.model_validate_json(text), text


def test_smollm2_oracles_beside_fifteen_others():
    """fp32_greedy.json's continuations, each of 16 requests at once on 16 slots (so in batched passes of up to
    16 rows), as the single-sequence path gives them (tests/test_smollm2.py)."""
    oracle = json.loads((shared_models("smollm2") / "fp32_greedy.json").read_text())
    cases = {c["name"]: c for c in oracle["cases"]}
    with Server("-m", str(smollm2_gguf_path()), "--parallel", "16", "--ctx", "128", "--model-name", "smollm2") as s:
        client = s.client()

        def run(name):
            case = cases[name]
            return client.completions.create(model="smollm2", prompt=case["prompt_token_ids"], temperature=0,
                                             max_tokens=len(case["output_token_ids"])).choices[0].text
        names = ["raw_once_upon_a_time"] * 4 + ["chat_capital_of_france"] * 12
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(run, names))
        assert got == [cases[n]["output_text"] for n in names]
        chat = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert chat.choices[0].message.content == "The capital of France is Paris."
        assert chat.choices[0].finish_reason == "stop"
        # cut by max_tokens inside a character, whose bytes end as U+FFFD: a stop that only that last character
        # completes cuts the text there, and the reply says so
        french = {"model": "smollm2", "prompt": "Les élèves français aiment", "max_tokens": 60, "temperature": 0}
        whole = client.completions.create(**french).choices[0]
        assert whole.text.endswith("t \ufffd") and whole.finish_reason == "length", whole
        cut = client.completions.create(**french, stop=["t \ufffd"]).choices[0]
        assert (cut.text, cut.finish_reason) == (whole.text[:-3], "stop")
