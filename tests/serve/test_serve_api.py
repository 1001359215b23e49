"""The server through the official openai client: answers equal the engine's, fields parse, errors are OpenAI's.

Reference answers come from `LLMEngine.generate` on a fresh engine of the same model (greedy), decoded by the
tokenizer and cut before the first stop string: no code of the server is involved in them.
"""

import asyncio
import json

import httpx
import openai
import pytest

from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.chat import encode_chat
from serve_helpers import MODEL, live_server, tiny_engine, tiny_model, tiny_served

PROMPTS = ["the quick brown fox", "x_1 = 5 + y", "answer question", "import data"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def reference(served, prompt_ids, max_tokens, stop=()):
    """(text, finish_reason, token ids) of a greedy generation by a fresh engine on the same model."""
    tok = served.tokenizer
    engine = tiny_engine(served.engine.model, tok.eos_id)
    (ids,) = engine.generate([prompt_ids], SamplingParams(temperature=0, max_new_tokens=max_tokens))
    finish = "stop" if ids[-1] == tok.eos_id else "length"
    text = tok.decode(ids[:-1] if finish == "stop" else ids)
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        return text[: min(hits)], "stop", ids
    return text, finish, ids


def boundary_stop(tok, ids) -> str:
    """A 4-character stop string that starts in one token and ends in a later one."""
    text = tok.decode(ids)
    for k in range(1, len(ids) - 1):
        b = len(tok.decode(ids[:k]))
        if 2 <= b <= len(text) - 2 and "\ufffd" not in text[b - 2 : b + 2] and text[:b] == tok.decode(ids[:k]):
            return text[b - 2 : b + 2]
    pytest.fail("no token boundary with plain text around it")


def test_greedy_completions_equal_the_engine_also_with_n_and_stop_strings(client, served):
    tok = served.tokenizer
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        text, finish, out_ids = reference(served, ids, 24)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, n=3)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert all(c.text == text and c.finish_reason == finish for c in r.choices)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3 * len(out_ids)
        stop = boundary_stop(tok, out_ids)
        text_s, finish_s, _ = reference(served, ids, 24, [stop])
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, n=2, stop=[stop])
        assert [(c.text, c.finish_reason) for c in r.choices] == [(text_s, "stop")] * 2
        assert stop not in r.choices[0].text and finish_s == "stop"


def test_greedy_chat_equals_the_engine_and_streaming_equals_not(client, served):
    tok = served.tokenizer
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "the lazy dog?"}]
    ids = encode_chat(tok, [{"role": "system", "content": "Be brief."}, messages[1]], add_generation_prompt=True).ids
    text, finish, _ = reference(served, ids, 30)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish and r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_seeded_sampling_streams_the_same_text_as_not_and_n_choices_differ(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "model token"}], max_tokens=20, temperature=1.0,
              seed=7, n=3)
    whole = client.chat.completions.create(**kw)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == [c.message.content for c in whole.choices]
    assert len(set(streamed)) > 1  # choices are seeded seed + i: different samples
    alone = client.chat.completions.create(**{**kw, "n": 1})
    assert alone.choices[0].message.content == streamed[0]  # choice 0 is the request with n = 1


def test_logprobs_in_openai_shapes_and_echo_equals_score(client, served):
    tok = served.tokenizer
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob  # greedy: the argmax
        assert entry.logprob <= 0 and entry.bytes is not None
    ids = tok.encode("the quick brown fox", bos=True)
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=1, temperature=0, echo=True,
                                  logprobs=2)
    (s,) = served.engine.score([ids], top_k=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(s.logprobs.tolist(), abs=1e-6)
    for t in range(1, len(ids)):
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(s.top_logprobs[t - 1, 0]), abs=1e-6)
    assert r.choices[0].text.startswith(tok.decode(ids)) and r.choices[1].index == 1
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(s.logprobs.tolist(), abs=1e-6)


def test_async_client_concurrent_requests(server, served):
    tok = served.tokenizer

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
                                          for p in PROMPTS * 3))

    results = asyncio.run(main())
    for prompt, r in zip(PROMPTS * 3, results):
        assert r.choices[0].text == reference(served, tok.encode(prompt, bos=True), 16)[0]


BAD_BODIES = [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[1]"),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "first"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": True}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 400}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "colour"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("body, param", BAD_BODIES)
def test_invalid_chat_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2], []]}, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2], [3, 99999]]}, "prompt[1]"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 300}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "stop": [""]}, "stop[0]"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
])
def test_invalid_completion_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("content", [b'{"model": ', b'{"model": "\xff\xfe"}', b"[1, 2]", b"null", b"\x00\x01"])
def test_malformed_bodies_are_400_and_the_server_serves_the_next_request(server, client, content):
    r = httpx.post(server + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_unknown_model_route_method_and_oversized_body(server):
    r = httpx.post(server + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"] == {
        "message": r.json()["error"]["message"], "type": "not_found_error", "param": "model", "code": "model_not_found"}
    assert httpx.get(server + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server + "/v1/completions").status_code == 405
    big = json.dumps({"model": MODEL, "prompt": "x" * (9 << 20)})
    r = httpx.post(server + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]


def test_api_key_request_id_models_health_and_metrics(served):
    with live_server(served, api_key="s3cret") as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                       headers={**auth, "X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
        assert len(httpx.get(url + "/health").headers["x-request-id"]) == 32  # generated when not sent
        assert httpx.get(url + "/health").json() == {"status": "ok"}  # no key needed
        text = httpx.get(url + "/metrics").text
        assert 'lmforge_http_requests_total{route="/v1/completions",status="401"} 1.0' in text
        assert 'lmforge_http_requests_total{route="/v1/completions",status="200"} 1.0' in text
        assert "lmforge_time_to_first_token_seconds_count 1.0" in text
        assert "lmforge_kv_cache_blocks_used 0.0" in text


def test_health_and_v1_are_503_until_the_model_is_loaded(tokenizer_path):
    import threading
    import time

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_served(tokenizer_path, tiny_model(3))

    with live_server(slow_load, wait_healthy=False) as url:
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.get(url + "/health").json() == {"status": "loading"}
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 200
