"""HF streamers on a wrapped generate: the same put/end calls and text as HF's generate (oracle: transformers
itself, greedy fp32), two streams interleaving in one engine batch, fallback for what HF streamers cannot take, an
aborted stream freeing its blocks; and the text-delta iterators (hf_paged.stream_text / astream_text)."""

import asyncio
import io
import logging
import threading
from contextlib import redirect_stdout

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

import hf_paged

from conftest import left_pad
from dropin_helpers import one_thread  # noqa: F401


class RecordingStreamer(BaseStreamer):
    """Every call as HF makes it: ("put", shape, values) / ("end",)."""

    def __init__(self, log=None, name=None, lock=None):
        self.calls = []
        self.log, self.name, self.lock = log, name, lock

    def put(self, value):
        self.calls.append(("put", tuple(value.shape), value.tolist(), value.dtype))
        if self.log is not None:
            with self.lock:
                self.log.append(self.name)

    def end(self):
        self.calls.append(("end",))


@pytest.fixture(scope="module")
def chat_inputs(smollm2):
    _, tok = smollm2
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


@pytest.fixture
def wrapped(smollm2):
    model, tok = smollm2
    hf_paged.wrap(model, tok, num_blocks=128)
    try:
        yield model, tok
    finally:
        hf_paged.unwrap(model)


def _iterator_chunks(model, tok, inputs, **kwargs):
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **kwargs))
    thread.start()
    chunks = list(streamer)
    thread.join()
    return chunks


def test_streamer_calls_equal_hf(smollm2, chat_inputs, caplog):
    model, tok = smollm2
    ref = RecordingStreamer()
    ref_out = model.generate(**chat_inputs, max_new_tokens=12, do_sample=False, streamer=ref)
    hf_paged.wrap(model, tok, num_blocks=64)
    try:
        ours = RecordingStreamer()
        with caplog.at_level(logging.INFO, logger="hf_paged"):
            out = model.generate(**chat_inputs, max_new_tokens=12, do_sample=False, streamer=ours)
    finally:
        hf_paged.unwrap(model)
    assert "HF generate" not in caplog.text  # the engine served it
    assert torch.equal(out, ref_out)
    assert ours.calls == ref.calls  # prompt [1, L] once, then tensor([token]) per token, then end()
    assert ours.calls[0][1] == tuple(chat_inputs["input_ids"].shape) and ours.calls[1][1] == (1,)


def test_text_iterator_and_text_streamer_match_hf(smollm2, chat_inputs):
    model, tok = smollm2
    ref_chunks = _iterator_chunks(model, tok, chat_inputs, max_new_tokens=20, do_sample=False)
    ref_printed = io.StringIO()
    with redirect_stdout(ref_printed):
        model.generate(**chat_inputs, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tok))
    hf_paged.wrap(model, tok, num_blocks=64)
    try:
        chunks = _iterator_chunks(model, tok, chat_inputs, max_new_tokens=20, do_sample=False)
        printed = io.StringIO()
        with redirect_stdout(printed):
            model.generate(**chat_inputs, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tok))
    finally:
        hf_paged.unwrap(model)
    assert chunks == ref_chunks and "".join(chunks).strip()
    assert printed.getvalue() == ref_printed.getvalue()


def test_two_streams_interleave_in_one_batch(wrapped, chat_ids):
    model, tok = wrapped
    engine = hf_paged.get_engine(model)
    prompts = [torch.tensor([chat_ids[0]]), torch.tensor([chat_ids[3]])]
    n_new = 24
    # The oracle: each prompt alone through HF's own generate.
    hf_paged.unwrap(model)
    refs = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False) for p in prompts]
    hf_paged.wrap(model, tok, num_blocks=128)
    engine = hf_paged.get_engine(model)
    steps_before = engine.metrics.steps
    log, lock = [], threading.Lock()
    streamers = [RecordingStreamer(log, name, lock) for name in "ab"]
    results = [None, None]
    gate = threading.Barrier(2)

    def run(i):
        gate.wait()
        results[i] = model.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), max_new_tokens=n_new,
                                    min_new_tokens=n_new, do_sample=False, streamer=streamers[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(results[i], refs[i])
        tokens = [c[2][0] for c in streamers[i].calls[1:-1]]
        assert tokens == refs[i][0, prompts[i].shape[1]:].tolist()
    # Both streams received tokens while the other was still streaming, from one shared batch.
    a = [k for k, name in enumerate(log) if name == "a"]
    b = [k for k, name in enumerate(log) if name == "b"]
    assert a[1] < b[-1] and b[1] < a[-1], "".join(log)
    assert engine.metrics.steps - steps_before < 2 * n_new


def test_streamer_on_a_batch_falls_back_like_hf(wrapped, chat_ids, caplog):
    model, tok = wrapped
    ids, mask = left_pad(chat_ids[:2], tok.pad_token_id)
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, streamer=TextStreamer(tok))
    assert "streamer with more than one sequence" in caplog.text


def test_failing_streamer_aborts_its_request(wrapped, chat_inputs):
    model, _ = wrapped

    class Boom(BaseStreamer):
        def __init__(self):
            self.seen = 0

        def put(self, value):
            self.seen += 1
            if self.seen == 4:
                raise RuntimeError("consumer gone")

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="consumer gone"):
        model.generate(**chat_inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False, streamer=Boom())
    # the leak check (conftest) verifies the aborted request's blocks are free; the engine still serves
    assert model.generate(**chat_inputs, max_new_tokens=3, do_sample=False).shape[1] == \
        chat_inputs["input_ids"].shape[1] + 3


def test_stream_text_and_astream_text(wrapped, chat_ids):
    model, tok = wrapped
    params = hf_paged.SamplingParams(max_new_tokens=12, temperature=0)
    whole = hf_paged.get_engine(model).generate([chat_ids[1]], params, use_tqdm=False)[0]
    deltas = list(hf_paged.stream_text(model, chat_ids[1], params))
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason is not None and deltas[-1].output.token_ids == whole.token_ids

    async def collect():
        return [d async for d in hf_paged.astream_text(model, chat_ids[1], params)]

    adeltas = asyncio.run(collect())
    assert "".join(d.text for d in adeltas) == whole.text
