"""hf_paged.wrap: same object, HF-shaped output equal to HF generate, threads join one batch, clean
fallback with a logged reason, and unwrap restores the model exactly."""

import logging
import threading

import pytest
import torch

import hf_paged
from hf_paged.execution.patches.attention import disable_paged_attention, enable_paged_attention

from conftest import left_pad


@pytest.fixture
def wrapped(smollm2):
    model, tok = smollm2
    hf_paged.wrap(model, tok, num_blocks=512)
    try:
        yield model, tok
    finally:
        hf_paged.unwrap(model)


@pytest.fixture(scope="module")
def batch(smollm2, chat_ids):
    _, tok = smollm2
    ids, mask = left_pad(chat_ids[:6], tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def hf_reference(smollm2, batch):
    model, _ = smollm2
    return model.generate(**batch, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                          output_scores=True)


def test_wrap_keeps_the_object_and_matches_hf(wrapped, batch, hf_reference):
    model, _ = wrapped
    cls = type(model)
    assert isinstance(model, cls) and hf_paged.wrap(model) is model
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    assert out.shape == hf_reference.sequences.shape
    assert torch.equal(out, hf_reference.sequences)


def test_return_dict_with_scores(wrapped, batch, hf_reference):
    model, tok = wrapped
    out = model.generate(**batch, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
    assert torch.equal(out.sequences, hf_reference.sequences)
    assert len(out.scores) == len(hf_reference.scores)
    gen = hf_reference.sequences[:, batch["input_ids"].shape[1]:]
    for t, (ours, ref) in enumerate(zip(out.scores, hf_reference.scores)):
        # Compare rows still generating at step t (HF keeps computing finished rows on pad tokens).
        alive = [r for r in range(gen.shape[0]) if tok.eos_token_id not in gen[r, :t].tolist()]
        assert torch.allclose(ours[alive], ref[alive], atol=1e-4, rtol=1e-4)


def test_sampling_num_return_sequences_shape(wrapped, batch):
    model, _ = wrapped
    out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert out.shape == (18, batch["input_ids"].shape[1] + 8)
    assert torch.equal(out[::3, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_threads_join_one_batch(wrapped, batch, hf_reference):
    model, _ = wrapped
    engine = hf_paged.get_engine(model)
    steps_before = engine.metrics.steps
    width = batch["input_ids"].shape[1]
    results = [None] * 6
    gate = threading.Barrier(6)

    def worker(i):
        mask = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][mask].unsqueeze(0)
        gate.wait()
        results[i] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, res in enumerate(results):
        generated = res[0, int(batch["attention_mask"][i].sum()):]
        ref_row = hf_reference.sequences[i, width:]
        assert torch.equal(generated, ref_row[: len(generated)])  # HF pads its row after eos
    assert engine.metrics.steps - steps_before < 6 * 24


def test_unsupported_option_falls_back_with_reason(wrapped, batch, caplog):
    model, _ = wrapped
    inputs = {k: v[:2] for k, v in batch.items()}
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        out = model.generate(**inputs, max_new_tokens=10, num_beams=2, repetition_penalty=1.3)
        out2 = model.generate(**inputs, max_new_tokens=10, no_repeat_ngram_size=2)
    assert "beam search with repetition_penalty" in caplog.text and "no_repeat_ngram_size" in caplog.text
    hf_paged.unwrap(model)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=10, num_beams=2, repetition_penalty=1.3))
    assert torch.equal(out2, model.generate(**inputs, max_new_tokens=10, no_repeat_ngram_size=2))


def test_beam_search_runs_in_the_engine(wrapped, batch, caplog):
    model, _ = wrapped
    inputs = {k: v[:3] for k, v in batch.items()}
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        out = model.generate(**inputs, max_new_tokens=12, num_beams=3, num_return_sequences=2)
    assert "HF generate" not in caplog.text  # no fallback
    hf_paged.unwrap(model)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=12, num_beams=3, num_return_sequences=2))


def test_bad_generate_input_raises_value_error(wrapped, batch):
    model, _ = wrapped
    with pytest.raises(ValueError, match="top_p"):
        model.generate(**batch, max_new_tokens=4, do_sample=True, top_p=1.5)


def test_unwrap_restores_plain_forward(smollm2, batch):
    model, tok = smollm2
    before = model(**batch).logits
    hf_paged.wrap(model, tok, num_blocks=64)
    model.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"  # hf_paged is selected only inside the engine's forwards
    assert torch.equal(model(**batch).logits, before)  # paging is a property of the call
    hf_paged.unwrap(model)
    assert "generate" not in model.__dict__ and model.config._attn_implementation == "sdpa"
    assert torch.equal(model(**batch).logits, before)


def test_plain_forward_equals_base_for_tiny_architectures(tiny_model):
    name, model = tiny_model
    disable_paged_attention(model)  # the session's tiny models may come from an engine test that enabled it
    base = model.config._attn_implementation
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0)
    before = model(input_ids=ids, attention_mask=mask).logits
    enable_paged_attention(model)
    try:
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before), name
    finally:
        disable_paged_attention(model)
    assert model.config._attn_implementation == base


def test_model_that_cannot_be_paged_is_left_alone(smollm2, monkeypatch, caplog):
    model, _ = smollm2
    monkeypatch.setattr(model, "_can_set_attn_implementation", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        assert hf_paged.wrap(model) is model
    assert "generate" not in model.__dict__ and "AttentionInterface" in caplog.text
