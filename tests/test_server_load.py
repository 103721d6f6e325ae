"""Load on the server (loopback only, bounded): 200 concurrent streamed chat requests through the real ``openai``
client, every fifth one disconnected by the client after its first words. Every answer that completes equals the same
request run alone (greedy); no request fails; afterwards no request runs and every KV block is free (from /metrics).
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from conftest import CHAT_PROMPTS
from test_server import metrics, wait_all_blocks_free

MODEL = "smollm2"
NUM_REQUESTS = 200
LEAVE_EVERY = 5  # 20% of the clients leave mid-answer
MAX_TOKENS = 12
PROMPTS = CHAT_PROMPTS[:10]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


@pytest.mark.timeout(300)
def test_200_concurrent_streams_with_disconnects(hf_paged_server):
    url = hf_paged_server.base_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    t0 = time.monotonic()
    alone = []  # each prompt run alone: the reference
    for i in range(len(PROMPTS)):
        out = client.chat.completions.create(model=MODEL, messages=_messages(i), max_tokens=MAX_TOKENS, temperature=0)
        alone.append((out.choices[0].message.content, out.choices[0].finish_reason))
    wait_all_blocks_free(url)
    before = metrics(url)
    print(f"references in {time.monotonic() - t0:.1f} s")

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str, str | None]:
        stream = await aclient.chat.completions.create(model=MODEL, messages=_messages(i), max_tokens=MAX_TOKENS,
                                                       temperature=0, stream=True)
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if i % LEAVE_EVERY == 0 and text:
                await stream.close()  # the client goes away mid-answer
                return "left", text, None
        return "done", text, finish

    async def main() -> list[tuple[str, str, str | None]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=240) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(NUM_REQUESTS)))

    started = time.monotonic()
    results = asyncio.run(main())  # any failed request (4xx / 5xx) raises here
    elapsed = time.monotonic() - started
    done = [(i, r) for i, r in enumerate(results) if r[0] == "done"]
    left = [(i, r) for i, r in enumerate(results) if r[0] == "left"]
    assert len(left) == NUM_REQUESTS // LEAVE_EVERY and len(done) == NUM_REQUESTS - len(left)
    for i, (_, text, finish) in done:
        assert (text, finish) == alone[i % len(PROMPTS)], f"request {i} differs from the same request run alone"
    for i, (_, text, _) in left:
        assert alone[i % len(PROMPTS)][0].startswith(text)
    after = wait_all_blocks_free(url, timeout=15)
    key = "hf_paged:request_success_total[{}]"
    assert after[key.format("error")] == before[key.format("error")]
    assert after[key.format("stop")] + after[key.format("length")] - before[key.format("stop")] \
        - before[key.format("length")] >= len(done)
    # Most leavers were still generating when they left: their requests were aborted, not run to the end.
    assert after[key.format("abort")] - before[key.format("abort")] >= len(left) // 2
    assert after["hf_paged:num_requests_running"] == 0 and after["hf_paged:kv_cache_usage_perc"] == 0
    print(f"{NUM_REQUESTS} concurrent streams in {elapsed:.1f} s")
