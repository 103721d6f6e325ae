"""Hugging Face streamers on a wrapped ``generate``, fed from the engine.

**HF streamers.** A ``TextStreamer``, ``TextIteratorStreamer`` or any ``BaseStreamer`` passed to a wrapped
``model.generate(..., streamer=...)`` receives what HF's own ``generate`` sends it, in the same order and shapes:
``put(input_ids)`` once with the prompt (``[1, prompt_len]``, as passed, padding included), then
``put(tensor([token]))`` for each new token as the engine samples it, then ``end()``. The calls happen in the
caller's thread, while the request runs in the engine's shared batch with every other request. Like HF, a streamer
takes one sequence: a batch of several rows, ``num_return_sequences > 1`` or beam search is handed to HF's
``generate`` (which rejects the combinations it rejects).

Text deltas for applications are ``hf_paged.stream_text`` / ``astream_text`` (in ``api``), the engine's
``LLMEngine.stream_text`` / ``astream_text``.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from .core.sequence import RequestOutput, SamplingParams


def streamer_fallback_reason(input_ids: torch.Tensor, num_return_sequences: int, num_beams: int) -> str | None:
    """Why a streamed ``generate`` call cannot run on the engine (HF's own limits for streamers), or None."""
    rows = input_ids.shape[0] if input_ids.dim() > 1 else 1
    if num_beams > 1:
        return "streamer with beam search"
    if rows * num_return_sequences > 1:
        return "streamer with more than one sequence (HF streamers take batch size 1)"
    return None


def iter_stream_tokens(seq: Any) -> Iterator[int]:
    """Token ids of a sequence submitted with ``stream=True`` (its ``StreamDelta``s), as they are sampled, until it
    finishes."""
    while True:
        delta = seq.stream.get()
        yield from delta.token_ids
        if delta.finish_reason is not None:
            return


def generate_with_streamer(engine: Any, prompt_ids: list[int], params: SamplingParams, streamer: Any,
                           input_ids: torch.Tensor) -> RequestOutput:
    """Run one request on ``engine`` and feed ``streamer`` as HF's ``generate`` would; returns the request's output.

    If the streamer raises, the request is aborted (its KV blocks freed) and the error propagates."""
    streamer.put(input_ids.detach().cpu() if input_ids.dim() > 1 else input_ids.detach().cpu().unsqueeze(0))
    seq = engine.submit(prompt_ids, params, stream=True)
    try:
        for token in iter_stream_tokens(seq):
            streamer.put(torch.tensor([token], dtype=input_ids.dtype))
    except BaseException:
        engine.abort(seq.request_id)
        seq.done.wait()
        raise
    seq.done.wait()
    streamer.end()
    if seq.error is not None:
        raise RuntimeError("hf_paged engine failed a request") from seq.error
    return seq.output()
