"""One bad client cannot break the server for the others: out-of-range sampling fields, malformed JSON, a chat
template of its own, a huge prompt, a cross-site page, silent connections, two Authorization headers each get a 4xx
(or a normal answer), never a 5xx, and streams running beside them keep their exact text (a seeded fuzz of hostile
bodies). Also what well-behaved clients need: ``models.retrieve``, the key from the environment, no ``max_tokens``
on a small pool."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest

from server_process import launch_hf_paged

KEY = "env-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 49152  # the embedded model's


@pytest.fixture(scope="module")
def server():
    args = ["--kv-memory", "48MiB", "--served-model-name", "smollm2", "--header-timeout", "2", "--disable-access-log",
            "--log-level", "warning"]
    with launch_hf_paged(args, start_timeout=180, env={"HF_PAGED_API_KEY": KEY}) as s:
        yield s
    assert s.returncode == 0, s.log_tail()


def post(url: str, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={**AUTH, "Content-Type": "application/json",
                                                          **(headers or {})}, timeout=120, **kw)


def status_4xx(r: httpx.Response) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    return r.json()["error"]


def greedy_stream(url: str, prompt: str, max_tokens: int = 48) -> str:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
    return "".join(text)


HOSTILE_FIELDS = {
    "stop_token_ids": [[1_000_000], [-1], [VOCAB], ["x"], [2 ** 70]],
    "min_tokens": [1, 5, -1, 2 ** 70],
    "top_k": [2 ** 70, 2 ** 63, -5, VOCAB + 1, 0],
    "top_p": [0.9, 0.0, 1e-30, 2.0, -1],
    "temperature": [1.0, 1e-30, 1e30, -1, 0.5],
    "repetition_penalty": [1e-38, 1e38, 0, -1, 1.5],
    "presence_penalty": [2.0, -2.0, 1e9],
    "frequency_penalty": [2.0, -2.0, -1e9],
    "min_p": [1.0, 0.999999, -0.1, 2],
    "max_tokens": [1, 2 ** 70, -1, 0, 10 ** 9],
    "n": [2, 0, 10 ** 6],
    "seed": [2 ** 64, -(2 ** 63), 1],
    "logprobs": [20, 21, -1],
    "stop": [["\n"], [""], "", ["a"] * 1000],
    "prompt": [[VOCAB + 5], [[1, 2], [3, -1]], [], "", ["hi"] * 100, [[]]],
    "echo": [True],
    "ignore_eos": [True, "yes"],
}


def hostile_body(rng: random.Random) -> dict:
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4}
    for field in rng.sample(sorted(HOSTILE_FIELDS), rng.randint(1, 4)):
        body[field] = rng.choice(HOSTILE_FIELDS[field])
    return body


def test_hostile_requests_never_touch_good_streams(server):
    url = server.base_url
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    alone = [greedy_stream(url, p) for p in prompts]
    rng = random.Random(0)
    bodies = [hostile_body(rng) for _ in range(60)]
    bodies += [{"model": "smollm2", "prompt": "Hi", "max_tokens": 8, "stop_token_ids": [1_000_000], "min_tokens": 1},
               {"model": "smollm2", "prompt": "Hi", "max_tokens": 8, "top_k": 2 ** 70, "top_p": 0.9},
               {"model": "smollm2", "prompt": "Hi", "max_tokens": 8, "repetition_penalty": 1e-38, "temperature": 1},
               {"model": "smollm2", "prompt": "Hi", "max_tokens": 8, "stop_token_ids": [-1]}]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, greedy_stream(url, p)))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    statuses = []
    for body in bodies:
        r = post(url, "/v1/completions", body)
        statuses.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code == 200:
            assert all(c["finish_reason"] in ("length", "stop") for c in r.json()["choices"]), (body, r.text)
    for t in threads:
        t.join(300)
    assert [results.get(i) for i in range(len(prompts))] == alone
    assert statuses.count(400) > 10 and statuses.count(200) > 5  # both kinds were exercised
    stop_beyond_vocab, huge_top_k, tiny_penalty, negative_stop = statuses[-4:]
    assert stop_beyond_vocab == 400 and negative_stop == 400 and huge_top_k == 200 and tiny_penalty == 200
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    assert "hf_paged:num_requests_running" in metrics


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_malformed_json_is_a_400(server, path):
    url = server.base_url
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    big_int = b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    for raw in (deep, big_int, b'{"prompt": 1e999999}', b"\xff\xfe", b"[]"):
        assert status_4xx(post(url, path, raw))["code"] in ("invalid_json", "invalid_value")


def test_client_chat_templates_are_refused(server):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template_kwargs": {"chat_template": "{% for i in range(10**9) %}{% endfor %}"}}
    started = time.monotonic()
    error = status_4xx(post(server.base_url, "/v1/chat/completions", body))
    assert error["param"] == "chat_template_kwargs" and time.monotonic() - started < 5


def test_a_huge_prompt_does_not_block_the_event_loop(server):
    url = server.base_url
    body = {"model": "smollm2", "prompt": "word " * 780_000, "max_tokens": 2}  # 3.9 MB, under the body limit
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.setdefault("r", post(url, "/v1/completions", body)))
    sender.start()
    time.sleep(0.3)
    slowest = 0.0
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    sender.join()
    assert status_4xx(answer["r"])["code"] == "context_length_exceeded"
    assert slowest < 1.0


def test_cross_site_requests_are_refused(server):
    url = server.base_url
    body = '{"model": "smollm2", "prompt": "hi", "max_tokens": 1}'
    evil = post(url, "/v1/completions", body, {"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "forbidden_origin"
    host = url.split("://", 1)[1]
    same = post(url, "/v1/completions", body, {"Origin": f"http://{host}"})
    assert same.status_code == 200


def test_two_authorization_headers_are_refused(server):
    url = server.base_url
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers=[("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")])
    assert r.status_code == 401
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200  # the key came from HF_PAGED_API_KEY


def test_silent_connections_do_not_lock_others_out(server):
    host, port = server.base_url.split("://", 1)[1].split(":")
    silent = [socket.create_connection((host, int(port))) for _ in range(300)]
    try:
        started = time.monotonic()
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        silent[0].settimeout(10)
        assert silent[0].recv(1) == b""  # closed by the server: it never sent a request head
    finally:
        for s in silent:
            s.close()


def test_openai_client_retrieve_and_default_max_tokens(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    # No max_tokens on a 48 MiB pool (far less than the context): capped at what fits, never refused.
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi."}],
                                          extra_body={"ignore_eos": False})
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
