"""pipeline("text-generation", backend="hf_paged"): the same structure and text as transformers' own pipeline for
strings, lists, chats, return_full_text=False, num_return_sequences and construction/call-time generation kwargs;
a list goes to the engine at once and a generator / KeyDataset streams with many requests in flight; plain
pipeline(...) calls are untouched; bad engine options raise; disable() removes the flag."""

import logging

import pytest
import torch
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset
from transformers.pipelines.text_generation import TextGenerationPipeline

import hf_paged
from hf_paged import api
from hf_paged.models import default_model_dir
from hf_paged.integrations import pipeline as pipeline_patch

from conftest import CHAT_PROMPTS
from dropin_helpers import one_thread  # noqa: F401

GREEDY = dict(max_new_tokens=10, do_sample=False)


@pytest.fixture(scope="module")
def plain(smollm2):
    model, tok = smollm2
    return pipeline("text-generation", model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def paged():
    """Built from the model folder (the path route); its own model object, wrapped by the pipeline."""
    pipe = pipeline("text-generation", model=str(default_model_dir()), dtype=torch.float32, backend="hf_paged",
                    engine_options={"num_blocks": 256})
    yield pipe
    hf_paged.unwrap(pipe.model)


@pytest.fixture
def no_fallback(caplog):
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        yield
    assert "HF generate" not in caplog.text and "HF's pipeline" not in caplog.text


@pytest.mark.parametrize("case", ["string", "list", "chat", "chats", "new_text", "two_beams", "tensors"])
def test_same_output_as_transformers(plain, paged, no_fallback, case):
    inputs = {"string": "Once upon a time", "list": ["Hello, my name is", "The capital of France is"],
              "chat": [{"role": "user", "content": "What is 2+2?"}],
              "chats": [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:3]],
              "new_text": "The best way to learn is", "two_beams": "The weather today",
              "tensors": "One, two, three,"}[case]
    kwargs = dict(GREEDY)
    if case == "new_text":
        kwargs["return_full_text"] = False
    if case == "two_beams":  # greedy num_return_sequences > 1 needs beams in HF; sampling would not be comparable
        kwargs.update(num_beams=2, num_return_sequences=2)
    if case == "tensors":
        kwargs["return_tensors"] = True
    assert isinstance(paged, hf_paged.PagedTextGenerationPipeline)
    expected = plain(inputs, **kwargs)
    got = paged(inputs, **kwargs)
    assert got == expected
    if case == "two_beams":
        assert len(got) == 2 and got[0]["generated_text"] != got[1]["generated_text"]


def test_generation_kwargs_at_construction_and_call(smollm2, no_fallback):
    model, tok = smollm2
    plain = pipeline("text-generation", model=model, tokenizer=tok, max_new_tokens=6, do_sample=False)
    paged = pipeline("text-generation", model=str(default_model_dir()), dtype=torch.float32, backend="hf_paged",
                     max_new_tokens=6, do_sample=False, engine_options={"num_blocks": 64})
    try:
        assert paged("Tell me a joke") == plain("Tell me a joke")
        assert len(tok(paged("Tell me a joke", return_full_text=False)[0]["generated_text"]).input_ids) <= 6
        assert paged("Tell me a joke", max_new_tokens=9) == plain("Tell me a joke", max_new_tokens=9)
    finally:
        hf_paged.unwrap(paged.model)


def test_list_goes_to_the_engine_at_once(plain, paged, no_fallback):
    prompts = CHAT_PROMPTS[:8]
    engine = hf_paged.get_engine(paged.model)
    steps = engine.metrics.steps
    got = paged(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False, batch_size=2)
    # One by one (or two at a time) would take at least 8 * 8 / 2 steps; all at once takes about 8 + prefill steps.
    assert engine.metrics.steps - steps < 16
    assert got == plain(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False)


def test_generator_and_key_dataset_stream_with_many_in_flight(plain, paged, no_fallback):
    prompts = CHAT_PROMPTS[8:14]
    expected = plain(prompts, **GREEDY)
    engine = hf_paged.get_engine(paged.model)
    steps = engine.metrics.steps
    stream = paged((p for p in prompts), **GREEDY)
    assert not isinstance(stream, list)  # lazy, as HF's
    assert list(stream) == expected
    assert engine.metrics.steps - steps < 2 * GREEDY["max_new_tokens"]
    dataset = KeyDataset([{"text": p} for p in prompts], "text")
    assert list(paged(dataset, **GREEDY)) == expected


def test_option_the_engine_lacks_keeps_hf_iteration(plain, paged, caplog):
    prompts = CHAT_PROMPTS[:2]
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        got = paged(prompts, max_new_tokens=6, no_repeat_ngram_size=2, do_sample=False)
    assert "no_repeat_ngram_size" in caplog.text
    # do_sample=False: the text-generation pipeline samples by default, and unseeded samples differ run to run.
    assert got == plain(prompts, max_new_tokens=6, no_repeat_ngram_size=2, do_sample=False)


def test_plain_pipeline_is_untouched(smollm2):
    model, tok = smollm2
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    assert type(pipe) is TextGenerationPipeline
    assert not api.is_wrapped(model) and "generate" not in model.__dict__


def test_bad_engine_options_name_the_field(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="engine_options"):
        pipeline("text-generation", model=model, tokenizer=tok, backend="hf_paged", engine_options=["num_blocks"])
    with pytest.raises(ValueError, match="num_blockz"):
        pipeline("text-generation", model=model, tokenizer=tok, backend="hf_paged",
                 engine_options={"num_blockz": 8})
    assert not api.is_wrapped(model)


def test_disable_removes_the_flag(smollm2):
    model, tok = smollm2
    original = TextGenerationPipeline.__init__
    assert pipeline_patch.installed()
    hf_paged.disable()
    try:
        assert not pipeline_patch.installed()
        assert TextGenerationPipeline.__dict__["__init__"].__module__.startswith("transformers.")
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        assert type(pipe) is TextGenerationPipeline
    finally:
        pipeline_patch.install()
    assert TextGenerationPipeline.__init__ is original


def test_model_the_engine_cannot_serve_keeps_hf_with_one_reason(smollm2, plain, monkeypatch, caplog):
    model, tok = smollm2
    monkeypatch.setattr(model, "_can_set_attn_implementation", lambda: False)
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        pipe = pipeline("text-generation", model=model, tokenizer=tok, backend="hf_paged")
        got = pipe(CHAT_PROMPTS[:2], **GREEDY)
    assert not api.is_wrapped(model) and not pipe.served_by_engine
    reasons = [r.getMessage() for r in caplog.records if r.name == "hf_paged"]
    assert len(reasons) == 1 and "AttentionInterface" in reasons[0]
    monkeypatch.undo()
    assert got == plain(CHAT_PROMPTS[:2], **GREEDY)
