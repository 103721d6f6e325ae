"""Hybrid and state-space models on the engine: per-sequence recurrent states in slots beside the paged K/V, under
continuous batching (16 concurrent requests of different lengths, chunked prefill, preemption), ``n > 1`` (forked
states) and beam search, each equal to HF's own generate; the slots come back to the pool; and a mixer that cannot
continue a state over several tokens is found by the engine's probe and continued one token at a time."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_paged
from hf_paged import LLMEngine, SamplingParams
from hf_paged.core.block_pool import BlockPool, BlockTable, StateSlots

from conftest import tiny_prompts
from model_zoo import build_model
from test_engine import hf_greedy

NEW = 12


@pytest.fixture(scope="module", params=["qwen3_next", "falcon_h1"])
def hybrid(request):
    return build_model(request.param)


def _greedy(n=NEW):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_sixteen_concurrent_requests_with_chunks_and_preemption_equal_hf(hybrid):
    prompts = tiny_prompts(16, seed=71, low=3, high=40)
    refs = hf_greedy(hybrid, prompts, NEW, 0, set(), batch=1)
    # A token budget below most prompts (chunked prefill continues states) and a pool too small for all 16 at once.
    with LLMEngine(hybrid, None, num_blocks=24, block_size=4, max_num_batched_tokens=16) as engine:
        assert engine.runner.recurrent is not None and not engine.kv.enable_prefix_caching
        outs = engine.generate(prompts, _greedy(), use_tqdm=False)
        assert [o.token_ids for o in outs] == refs
        assert engine.scheduler.num_preemptions > 0
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        assert engine.pool.states.num_used == 0
        # The K/V pool holds the attention layers only (Falcon-H1's layers each have attention and a mixer).
        assert sorted(engine.kv_cache.rows) == sorted(engine.runner.layer_windows)
        if hybrid.config.model_type == "qwen3_next":
            assert set(engine.kv_cache.rows).isdisjoint(engine.runner.recurrent.layers)


def test_n_samples_fork_the_state(hybrid):
    """Sample i of an ``n = 2`` request (seed s) is the single request with seed s + i: the fork copied the prompt's
    state, and the two samples then kept their own."""
    prompt = tiny_prompts(1, seed=72, low=10, high=11)[0]
    params = dict(max_new_tokens=NEW, temperature=1.0, ignore_eos=True)
    with LLMEngine(hybrid, None, num_blocks=64, block_size=4) as engine:
        pair = engine.generate([prompt], SamplingParams(n=2, seed=11, **params), use_tqdm=False)[0]
        singles = [engine.generate([prompt], SamplingParams(seed=s, **params), use_tqdm=False)[0]
                   for s in (11, 12)]
        assert [s.token_ids for s in pair.samples] == [s.token_ids for s in singles]
        assert pair.samples[0].token_ids != pair.samples[1].token_ids
        assert engine.pool.states.num_used == 0


def test_beams_and_batches_through_wrap_equal_hf(hybrid):
    prompts = tiny_prompts(3, seed=73, low=5, high=20)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                  eos_token_id=None)
    want = hybrid.generate(**kwargs)
    wrapped = hf_paged.wrap(hybrid, None, block_size=4, num_blocks=128)
    try:
        assert hf_paged.fallback_reason(wrapped) is None
        assert torch.equal(wrapped.generate(**kwargs), want)
    finally:
        hf_paged.unwrap(wrapped)


def test_a_mixer_that_restarts_its_state_on_several_tokens_continues_token_by_token():
    """Jamba's multi-token scan starts from zeros whatever state it is given: the probe's continued prefill finds it
    (one-step prefills would not), the engine then continues states one token at a time, and chunked prefill gives
    HF's tokens. A model continued the same way in both probes would be refused."""
    jamba = build_model("jamba")
    prompts = tiny_prompts(4, seed=74, low=10, high=30)
    refs = hf_greedy(jamba, prompts, NEW, 0, set(), batch=1)
    with LLMEngine(jamba, None, num_blocks=64, block_size=4, max_num_batched_tokens=8) as engine:
        assert engine.runner.recurrent.stepwise
        assert [o.token_ids for o in engine.generate(prompts, _greedy(), use_tqdm=False)] == refs
    with LLMEngine(build_model("qwen3_next"), None, num_blocks=64, block_size=4) as engine:
        assert not engine.runner.recurrent.stepwise  # a state continued over many tokens at once where exact


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "step", "fork", "copy", "free"]), st.integers(0, 7)),
                min_size=1, max_size=40))
def test_state_slots_follow_forks_and_frees(ops):
    """A model of the runner's state tensor: every step the queued copies are done (all sources read first), then each
    live table writes a new value into its slot. A forked table starts from its parent's value at the fork; live
    tables never share a slot; freeing everything gives every slot back."""
    pool = BlockPool(64, 2)
    pool.states = StateSlots()
    state: dict[int, float] = {}
    live: list[tuple[BlockTable, list]] = []  # table, [value it holds]
    counter = [0.0]

    def step():
        copies = pool.states.take_copies()
        values = {dst: state.get(src) for src, dst in copies}
        state.update(values)
        for table, expected in live:
            if table.state is not None:
                if expected[0] is not None:
                    assert state.get(table.state) == expected[0]
                counter[0] += 1
                state[table.state] = expected[0] = counter[0]

    for op, i in ops:
        if op == "new" or not live:
            table = BlockTable(pool)
            table.append_slots(1)
            live.append((table, [None]))
        elif op == "step":
            step()
        elif op in ("fork", "copy"):
            table, expected = live[i % len(live)]
            child = table.fork() if op == "fork" else table.copy()
            live.append((child, [expected[0]]))
        else:
            table, _ = live.pop(i % len(live))
            table.free()
        slots = [t.state for t, _ in live]
        assert len(set(slots)) == len(slots)
    step()
    for table, _ in live:
        table.free()
    assert pool.states.num_used == 0 and pool.num_free_blocks == pool.num_blocks


def test_speculation_is_refused_or_skipped_for_recurrent_state(hybrid):
    """A recurrent state cannot be rolled back past rejected drafts: an engine asked to speculate refuses, and a
    request asking for it (HF's ``prompt_lookup_num_tokens``) decodes without it, with HF's tokens."""
    with pytest.raises(ValueError, match="speculative"):
        LLMEngine(hybrid, None, num_blocks=32, block_size=4, speculative={"method": "ngram", "num_tokens": 3})
    prompt = tiny_prompts(1, seed=75, low=12, high=13)[0] * 2  # repeats: prompt lookup would find drafts
    ids = torch.tensor([prompt])
    want = hybrid.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    wrapped = hf_paged.wrap(hybrid, None, block_size=4, num_blocks=64)
    try:
        got = wrapped.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                               prompt_lookup_num_tokens=3)
        assert torch.equal(got, want)
        assert "spec_decode_num_drafts" not in hf_paged.get_engine(wrapped).stats()
    finally:
        hf_paged.unwrap(wrapped)
