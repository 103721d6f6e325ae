"""The server's protections, on a server started with small limits and an API key: 401 without the key (every route
but /health; the chat page also takes HTTP Basic auth), 413 for big bodies (declared or chunked), 400 over the
prompt / max_tokens / n limits, 429 over the concurrency limit (and the slot comes back), OpenAI's error shape each
time; and SIGTERM: in-flight requests finish or are aborted within the grace period, new ones are refused, exit 0."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest

from server_process import launch_hf_paged

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ["--api-key", KEY, "--max-concurrent-requests", "2", "--max-body-bytes", "2KiB", "--max-tokens", "1000",
          "--max-n", "2", "--max-prompt-tokens", "50", "--kv-memory", "64MiB", "--served-model-name", "smollm2",
          "--disable-access-log", "--log-level", "warning"]


@pytest.fixture(scope="module")
def server():
    with launch_hf_paged(LIMITS, start_timeout=180) as s:
        yield s
    assert s.returncode == 0, s.log_tail()


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(url: str, body: dict, headers: dict | None = AUTH, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60, **kw)


def test_api_key_guards_every_route_but_health(server):
    url = server.base_url
    assert httpx.get(url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("GET", "/no-such-route")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, headers=headers, json={"prompt": "hi"})
            assert error_of(r, 401)["type"] == "authentication_error"
    assert httpx.get(url + "/v1/completions").headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/").headers["www-authenticate"].startswith("Basic")  # a browser asks for the key
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    page = httpx.get(url + "/", headers={"Authorization": f"Basic {basic}"})
    assert page.status_code == 200 and 'id="input"' in page.text
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_size_and_value_limits(server):
    url = server.base_url
    big = {"prompt": "word " * 600}  # over 2 KiB
    assert error_of(completion(url, big), 413)["code"] == "body_too_large"

    def chunked():
        yield json.dumps(big).encode()

    r = httpx.post(url + "/v1/completions", content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert error_of(r, 413)["code"] == "body_too_large"  # no Content-Length: counted as it arrives
    assert error_of(completion(url, {"prompt": "hi", "max_tokens": 1001}), 400)["param"] == "max_tokens"
    assert error_of(completion(url, {"prompt": "hi", "n": 3}), 400)["param"] == "n"
    long_prompt = {"prompt": " ".join(["cat"] * 60), "max_tokens": 1}
    assert error_of(completion(url, long_prompt), 400)["code"] == "context_length_exceeded"
    chat = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "hi " * 60}]})
    assert error_of(chat, 400)["code"] == "context_length_exceeded"
    assert completion(url, {"prompt": "Hi", "max_tokens": 2, "n": 2}).status_code == 200


def test_concurrency_limit_429_and_the_slot_comes_back(server):
    url = server.base_url
    body = {"prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
        with a.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as s1, \
                b.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as s2:
            assert s1.status_code == s2.status_code == 200
            lines = [s1.iter_lines(), s2.iter_lines()]  # (kept: a dropped iterator closes its connection)
            assert all(next(it).startswith("data: ") for it in lines)  # both are generating
            r = completion(url, {"prompt": "Hi", "max_tokens": 2})
            assert error_of(r, 429)["type"] == "rate_limit_error"
            r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
                "messages": [{"role": "user", "content": "Hi"}], "stream": True})
            error_of(r, 429)
    deadline = time.monotonic() + 10
    while True:  # the two streams were closed by their clients: their slots and blocks come back
        r = completion(url, {"prompt": "Hi", "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_sigterm_drains_then_exits_0():
    grace = 2.0
    with launch_hf_paged([*LIMITS, "--shutdown-grace", str(grace)], start_timeout=180) as server:
        url = server.base_url
        long_body = {"prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        short_body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", url + "/v1/completions", json=long_body, headers=AUTH) as long_stream, \
                    b.stream("POST", url + "/v1/completions", json=short_body, headers=AUTH) as short_stream:
                long_lines, short_lines = long_stream.iter_lines(), short_stream.iter_lines()
                first = next(long_lines)
                assert first.startswith("data: ")
                server.terminate()
                sent = time.monotonic()
                time.sleep(0.5)
                try:  # nothing new is admitted once draining: the connection is refused, or answered 503
                    r = httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, headers=AUTH, timeout=5)
                except httpx.ConnectError:
                    pass
                else:
                    error_of(r, 503)

                def finish(lines) -> tuple[str | None, bool]:
                    reason, done = None, False
                    for line in lines:
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
                    return reason, done

                assert finish(short_lines) == ("length", True)  # finished within the grace period
                assert finish(long_lines) == ("abort", True)  # aborted at its end, answer closed properly
                assert grace - 0.5 <= time.monotonic() - sent <= grace + 5
        assert server.wait(timeout=30) == 0
