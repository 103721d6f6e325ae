"""The OpenAI-compatible server through the real ``openai`` client and raw HTTP, against ``python -m hf_paged.serve``
on a free loopback port (the session's ``hf_paged_server``): answers equal HF's own greedy ``generate``, streamed
equals non-streamed, n, stop strings, seeds, logprobs, echo, usage, /tokenize, /metrics; every bad request gets its
status and OpenAI's error shape, and the server stays healthy; a client that leaves mid-answer frees its KV blocks."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
import torch

MODEL = "smollm2"
PROMPT = "The three primary colours are"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def url(hf_paged_server) -> str:
    return hf_paged_server.base_url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """HF's own greedy ``generate`` on a separate copy of the model: what the server must answer."""
    from hf_paged.models import load_default_model

    model, tokenizer = load_default_model()

    def greedy(ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, len(ids):].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), new

    greedy.tokenizer = tokenizer
    return greedy


def metrics(url: str) -> dict[str, float]:
    """The /metrics samples (labels dropped, so one value per metric name and finish reason)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z0-9_:]+)(\{[^}]*\})? (\S+)$', line)
        if m:
            reason = re.search(r'finished_reason="(\w+)"', m.group(2) or "")
            out[m.group(1) + (f"[{reason.group(1)}]" if reason else "")] = float(m.group(3))
    return out


def wait_all_blocks_free(url: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["hf_paged:num_requests_running"] == 0 and m["hf_paged:num_requests_waiting"] == 0
                and m["hf_paged:kv_cache_free_blocks"] == m["hf_paged:kv_cache_total_blocks"]):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use {timeout} s after the last request: {m}")
        time.sleep(0.05)


def assert_healthy(url: str, client: openai.OpenAI) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


# ---- plain routes ----------------------------------------------------------------------------------------------
def test_health_models_metrics(url, client):
    assert httpx.get(url + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    m = metrics(url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count", "kv_cache_free_blocks", "kv_cache_total_blocks"):
        assert "hf_paged:" + name in m, name
    assert "hf_paged:request_success_total[abort]" in m


def test_tokenize_detokenize(url, reference):
    tok = reference.tokenizer
    r = httpx.post(url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == tok(PROMPT)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    chat = httpx.post(url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == tok(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False)["input_ids"]


# ---- completions and chat --------------------------------------------------------------------------------------
def test_completion_greedy_matches_hf_generate(client, reference):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    text, ids = reference(reference.tokenizer(PROMPT)["input_ids"], 12)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(reference.tokenizer(PROMPT)["input_ids"])
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.model == MODEL and out.object == "text_completion"


def test_completion_stream_equals_non_streamed(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices]) >= 3  # it came in pieces
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_greedy_matches_hf_generate_streamed_and_not(client, reference):
    tok = reference.tokenizer
    ids = tok(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    text, new_ids = reference(ids, 24)
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ("stop" if tok.eos_token_id in new_ids else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(new_ids)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(new_ids)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_n2_seeded_sampling_is_reproducible_and_streams_interleaved(url, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95, n=2, seed=1234)
    prefilled = metrics(url)["hf_paged:prompt_tokens_total"]
    a = client.completions.create(**kw)
    # the n samples are one engine request (a group): its prompt is taken in once, not once per sample
    assert metrics(url)["hf_paged:prompt_tokens_total"] - prefilled == a.usage.prompt_tokens
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert a.choices[0].text != a.choices[1].text  # choice i samples with seed + i
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == 4  # the prompt counts once
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in a.choices]
    other = client.completions.create(**{**kw, "seed": 99, "n": 1})
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0.8, seed=7, n=2)
    chat2 = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0.8, seed=7, n=2)
    assert [c.message.content for c in chat.choices] == [c.message.content for c in chat2.choices]
    assert other.choices[0].text  # a different seed still answers


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = free.split()
    assert len(words) >= 4, free
    stop = words[2]
    expected = free[: free.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                                                temperature=0, stop=stop, stream=True)]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and token in top and len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the sampled token is the likeliest
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert bytes(item.bytes).decode() == item.token
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, stream=True) if c.choices]
    tokens = [item.token for lp in streamed if lp for item in lp.content]
    assert tokens == [item.token for item in content]


def test_echo_and_token_prompts(client, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert out.choices[0].text == PROMPT + plain.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Paris is"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and plain.choices[0].text.startswith(batch.choices[0].text)


# ---- bad requests ----------------------------------------------------------------------------------------------
BAD = [
    # (path, body (dict, or raw bytes), status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "seed": "abc"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 9000}, 400, "prompt"),  # longer than the context
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 422, "suffix"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 422, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1}, 422, "echo"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 422, "best_of"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, 400,
     "response_format.type"),
    ("/v1/chat/completions", {"messages": QUESTION, "functions": [{"name": "f"}]}, 422, "functions"),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream": True, "n": 0}, 400, "n"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/does-not-exist", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}-{s}-{i}" for i, (p, _, s, _) in enumerate(BAD)])
def test_bad_request(url, path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_bad_requests_through_the_client_and_server_stays_healthy(url, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-2)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, functions=[{"name": "f", "parameters": {}}])
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'  # over the default 4 MiB
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert_healthy(url, client)
    wait_all_blocks_free(url)


# ---- disconnects -----------------------------------------------------------------------------------------------
def test_client_leaving_mid_stream_aborts_and_frees_blocks(url, client):
    aborted = metrics(url)["hf_paged:request_success_total[abort]"]
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    got = []
    for chunk in stream:
        got.append(chunk.choices[0].text)
        if len(got) == 3:
            break
    m = metrics(url)
    assert m["hf_paged:kv_cache_free_blocks"] < m["hf_paged:kv_cache_total_blocks"]  # it holds blocks now
    stream.close()  # the client goes away mid-answer
    m = wait_all_blocks_free(url, timeout=5)
    assert m["hf_paged:request_success_total[abort]"] == aborted + 1
    assert_healthy(url, client)


def test_client_leaving_a_non_streamed_request_aborts_it(url, client):
    aborted = metrics(url)["hf_paged:request_success_total[abort]"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "n": 2},
                   timeout=1.0)
    m = wait_all_blocks_free(url, timeout=5)
    assert m["hf_paged:request_success_total[abort]"] == aborted + 2
    assert_healthy(url, client)


# ---- apps in one process ---------------------------------------------------------------------------------------
class _StubEngine:
    """Just what create_app reads from an engine before any request."""

    max_model_len, vocab_size = 2048, 100
    pool = __import__("types").SimpleNamespace(num_blocks=10, block_size=16)

    def __init__(self, running: int) -> None:
        self.running = running

    def stats(self) -> dict:
        return {"running": self.running, "waiting": 0, "num_blocks": 10, "num_free_blocks": 10, "kv_cache_usage": 0.0,
                "prefix_cache_queries": 0, "prefix_cache_hits": 0, "preemptions": 0, "prompt_tokens": 0,
                "generation_tokens": 0}


def test_two_apps_in_one_process_keep_their_own_metrics():
    from fastapi.testclient import TestClient

    from hf_paged.serve import ServeConfig, create_app

    a = TestClient(create_app(_StubEngine(3), None, ServeConfig(model_name="a")))
    b = TestClient(create_app(_StubEngine(5), None, ServeConfig(model_name="b", api_key="k")))
    text_a = a.get("/metrics").text
    text_b = b.get("/metrics", headers={"Authorization": "Bearer k"}).text
    assert 'hf_paged:num_requests_running{engine="0",model_name="a"} 3.0' in text_a and 'model_name="b"' not in text_a
    assert 'hf_paged:num_requests_running{engine="0",model_name="b"} 5.0' in text_b and 'model_name="a"' not in text_b
    assert b.get("/metrics").status_code == 401 and a.get("/metrics").status_code == 200
