"""HF stopping criteria on the engine: a wrapped ``generate`` given ``stopping_criteria`` runs on the engine (no
fallback) and stops each row where HF stops it: per-row criteria (a tensor per row) give HF's padded output exactly;
a batch-level criterion with per-row state, as lm-eval's ``MultiTokenEOSCriteria``, stops each row once its own
text has the stop sequence, and the text up to it equals HF's. Sampled batches with ``set_seed`` repeat exactly."""

import logging

import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_paged

from conftest import build_tiny_model, left_pad, tiny_prompts


class StopAtToken(StoppingCriteria):
    """Per row: the last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class MultiTokenEOS(StoppingCriteria):
    """lm-evaluation-harness's ``MultiTokenEOSCriteria`` (lm_eval/models/utils.py), on token ids: one answer for
    the whole batch, true once every row's tail after the prompt holds ``sequence``."""

    def __init__(self, sequence: list[int], initial_length: int, batch_size: int) -> None:
        self.sequence = sequence
        self.initial_length = initial_length
        self.done_tracker = [False] * batch_size

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        tails = input_ids[:, self.initial_length:].tolist()
        for i, done in enumerate(self.done_tracker):
            if not done:
                tail = tails[i]
                self.done_tracker[i] = any(tail[j : j + len(self.sequence)] == self.sequence
                                           for j in range(len(tail) - len(self.sequence) + 1))
        return False not in self.done_tracker


def _greedy(model, ids, mask, criteria):
    return model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                          eos_token_id=None, stopping_criteria=criteria)


def test_per_row_criteria_give_hf_output_on_the_engine(tiny_model_dir, caplog):
    model = build_tiny_model("llama", tiny_model_dir)
    ids, mask = left_pad(tiny_prompts(4, seed=51), 0)
    plain = _greedy(model, ids, mask, StoppingCriteriaList([StopAtToken(t) for t in (17, 99)]))
    hf_paged.wrap(model, num_blocks=64)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            paged = _greedy(model, ids, mask, StoppingCriteriaList([StopAtToken(t) for t in (17, 99)]))
        assert not [r for r in caplog.records if "HF generate" in r.getMessage()]  # no fallback
        assert hf_paged.get_engine(model).stats()["generation_tokens"] > 0
        assert torch.equal(paged, plain)
    finally:
        hf_paged.unwrap(model)


def test_batch_level_criteria_with_row_state_stop_each_row_at_its_sequence(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(5, seed=52)
    ids, mask = left_pad(prompts, 0)
    plain = _greedy(model, ids, mask, StoppingCriteriaList([MultiTokenEOS([0], 0, 5)]))
    # The stop "sequence": a token the rows generate, taken from HF's own output.
    stop = [int(plain[0, ids.shape[1] + 3])]
    plain = _greedy(model, ids, mask, StoppingCriteriaList([MultiTokenEOS(stop, ids.shape[1], 5)]))
    hf_paged.wrap(model, num_blocks=64)
    try:
        paged = _greedy(model, ids, mask, StoppingCriteriaList([MultiTokenEOS(stop, ids.shape[1], 5)]))
    finally:
        hf_paged.unwrap(model)

    def until_stop(row):  # what lm-eval keeps: the text before the stop sequence
        tail = row[ids.shape[1]:].tolist()
        return tail[: tail.index(stop[0])] if stop[0] in tail else tail

    assert [until_stop(r) for r in paged] == [until_stop(r) for r in plain]
    stopped = [stop[0] in r[ids.shape[1]:].tolist() for r in plain]
    assert any(stopped)
    for row, was_stopped in zip(paged, stopped):  # on the engine a row ends at its own stop
        tail = row[ids.shape[1]:].tolist()
        if was_stopped:
            assert tail[tail.index(stop[0]) + 1:] == [0] * (len(tail) - tail.index(stop[0]) - 1)


def test_seeded_sampled_batches_repeat(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    ids, mask = left_pad(tiny_prompts(6, seed=53), 0)
    hf_paged.wrap(model, num_blocks=128)
    try:
        runs = []
        for _ in range(4):
            transformers.set_seed(0)
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0,
                                       pad_token_id=0, eos_token_id=None))
        assert all(torch.equal(r, runs[0]) for r in runs)
        transformers.set_seed(1)
        other = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0,
                               eos_token_id=None)
        assert not torch.equal(other, runs[0])
    finally:
        hf_paged.unwrap(model)
