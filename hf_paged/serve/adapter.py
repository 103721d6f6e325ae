"""The server's side of one ``LLMEngine``: admission, the engine requests in flight, shutdown and per-request metrics.

An API request becomes one engine request per prompt, its sequence built once (``engine.make_sequence``, which
validates it) and handed to ``engine.astream_text``; ``n`` samples are the engine's own group (one prefill, the
prompt's blocks shared), whose samples stream under the ids ``<request id>-<i>``. Every delta lands in its
``Sample``. A client that leaves, or a stream closed early, aborts its engine requests at once: their KV blocks go
back to the pool in the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from ..core.sequence import Sequence, StreamDelta
from .config import ServeConfig
from .inputs import EngineInput, Limits, engine_error
from .metrics import ServerMetrics
from .outputs import Sample
from .protocol import APIError

OnDelta = Callable[[Sample, StreamDelta], Awaitable[None]]


@dataclass
class Job:
    """An admitted API request: each prompt's engine sequence with its samples, and its admission slot."""

    prompts: list[tuple[Sequence, list[Sample]]]
    release: Callable[[], None]

    @property
    def samples(self) -> list[Sample]:
        return [s for _, samples in self.prompts for s in samples]


class EngineAdapter:
    """One app's engine, its limits and metrics, and the requests it runs."""

    def __init__(self, engine: Any, config: ServeConfig) -> None:
        self.engine = engine
        self.limits = Limits(config, int(engine.max_model_len), engine.vocab_size,
                             engine.pool.num_blocks * engine.pool.block_size)
        self.metrics = ServerMetrics(engine.stats, config.model_name, self.limits.max_model_len)
        self.in_flight = 0  # admitted API requests
        self.live_request_ids: set[str] = set()  # engine requests not finished yet
        self.draining = False
        self.created = int(time.time())
        # One thread: requests are parsed, templated and tokenized in turn, never in the event loop (which keeps
        # answering /health and streaming) and never two at once on the tokenizer.
        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="hf_paged-prepare")

    async def off_loop(self, work: Callable[[], Any]) -> Any:
        """``work()`` on the request-preparing thread; its exceptions (``APIError``) reach the caller."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, work)

    # ---- admission and shutdown ----------------------------------------------------------------------------
    def start(self, request: EngineInput, request_id: str) -> Job:
        """Take a slot (429 when none is free) and build the request's sequences, validated by the engine before
        any answer starts (ValueError -> 400)."""
        release = self._admit()
        n, prompts = request.params.n, []
        try:
            for p, ids in enumerate(request.prompts):
                seq = self.engine.make_sequence(ids, request.params, f"{request_id}-{p}")
                ids_of = [seq.request_id] if n == 1 else [f"{seq.request_id}-{i}" for i in range(n)]
                prompts.append((seq, [Sample(p * n + i, p, rid) for i, rid in enumerate(ids_of)]))
        except ValueError as exc:
            release()
            raise engine_error(exc) from None
        except BaseException:
            release()
            raise
        return Job(prompts, release)

    def _admit(self) -> Callable[[], None]:
        limit = self.limits.config.max_concurrent_requests
        if self.in_flight >= limit:
            raise APIError(429, f"too many concurrent requests (limit {limit}); retry later", code="too_many_requests")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
        return release

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Stop admitting; abort whatever is still running ``shutdown_grace_s`` later. Callable from a signal
        handler: the abort is scheduled on the event loop."""
        if self.draining:
            return
        self.draining = True
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, self.limits.config.shutdown_grace_s, self.abort_all)

    def abort_all(self) -> None:
        for request_id in list(self.live_request_ids):
            self.engine.abort(request_id)

    # ---- running -------------------------------------------------------------------------------------------
    async def run(self, job: Job, client_gone: Awaitable[None]) -> None:
        """Run the job to its end, then release its slot; ``client_gone`` returning first aborts it."""
        work = asyncio.ensure_future(asyncio.gather(*(self._run_prompt(seq, samples) for seq, samples in job.prompts)))
        gone = asyncio.ensure_future(client_gone)
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            job.release()
        if work.cancelled():
            raise APIError(400, "the client disconnected", code="client_disconnected")  # nobody reads it
        work.result()

    async def stream(self, job: Job) -> AsyncIterator[tuple[Sample, StreamDelta]]:
        """Each delta that carries something, with its sample, as it comes (prompts interleaved); leaving early
        aborts the job's engine requests."""
        queue: asyncio.Queue = asyncio.Queue()

        async def put(sample: Sample, delta: StreamDelta) -> None:
            if delta.text or delta.token_ids or delta.finish_reason is not None:
                queue.put_nowait((sample, delta))

        tasks = [asyncio.ensure_future(self._run_prompt(seq, samples, put)) for seq, samples in job.prompts]
        for t in tasks:
            t.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            pending = len(tasks)
            while pending:
                item = await queue.get()
                if item is None:
                    pending -= 1
                else:
                    yield item
            for t in tasks:
                t.result()  # an engine failure surfaces here
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _run_prompt(self, seq: Sequence, samples: list[Sample], on_delta: OnDelta | None = None) -> None:
        """Run one engine request to its end (or until cancelled: then it is aborted), filling its samples. The
        group's own last delta ends the samples it never started (aborted or failed before they forked)."""
        by_id = {s.request_id: s for s in samples}
        last: dict[str, float] = {}  # when each sample's previous tokens came: the inter-token latency
        self.live_request_ids.add(seq.request_id)
        try:
            async with contextlib.aclosing(self.engine.astream_text(seq)) as deltas:
                async for delta in deltas:
                    own = by_id.get(delta.request_id)
                    for sample in [own] if own is not None else [s for s in samples if s.finish_reason is None]:
                        if delta.token_ids:
                            last[sample.request_id] = self.metrics.record_tokens(len(delta.token_ids),
                                                                                 last.get(sample.request_id))
                        sample.add(delta)
                        if sample.finish_reason is not None:
                            timing = delta.output.metrics if own is not None and delta.output is not None else {}
                            self.metrics.record_finished(sample.finish_reason, seq.num_prompt_tokens,
                                                         len(sample.token_ids), timing)
                        if on_delta is not None:
                            await on_delta(sample, delta)
        finally:
            self.live_request_ids.discard(seq.request_id)
            for sample in samples:  # cancelled (client gone) or failed before its end: the request was aborted
                if sample.finish_reason is None:
                    self.metrics.record_finished("abort", seq.num_prompt_tokens, len(sample.token_ids), {})
