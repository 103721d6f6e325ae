"""Sliding-window memory: on a model whose every layer attends within a window (Mistral-style), a sequence gives back
the blocks that fell out of the window as it generates, so a generation of several windows holds at most the window
plus one block; the tokens stay HF's (greedy, n > 1 sampling sharing blocks, prefix caching, preemption), and the pool
is whole again afterwards."""

import pytest

from hf_paged import LLMEngine, SamplingParams

from conftest import build_tiny_model, tiny_prompts
from test_engine import hf_greedy

WINDOW, BLOCK = 12, 4  # tests/conftest.py's tiny Mistral


@pytest.fixture(scope="module")
def mistral(tiny_model_dir):
    model = build_tiny_model("mistral", tiny_model_dir)
    assert model.config.sliding_window == WINDOW
    return model


def test_a_long_generation_holds_only_the_window(mistral):
    prompt = tiny_prompts(1, seed=61, low=5, high=6)[0]
    new = 4 * WINDOW
    ref = hf_greedy(mistral, [prompt], new, 0, set(), batch=1)
    with LLMEngine(mistral, None, num_blocks=64, block_size=BLOCK, enable_prefix_caching=False) as engine:
        assert engine.kv.window == WINDOW
        out = engine.generate([prompt], SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True),
                              use_tqdm=False)
        assert out[0].token_ids == ref[0]
        full_length = -(-(len(prompt) + new) // BLOCK)
        assert engine.metrics.peak_blocks_in_use <= WINDOW // BLOCK + 1 < full_length
        assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_many_sequences_prefix_cache_samples_and_preemption(mistral):
    prompts = tiny_prompts(6, seed=62, low=20, high=30)
    refs = hf_greedy(mistral, prompts, 40, 0, set(), batch=6)
    # A pool too small for six full-length sequences: the window lets them all run, preempting at first.
    with LLMEngine(mistral, None, num_blocks=24, block_size=BLOCK, enable_prefix_caching=True) as engine:
        greedy = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
        assert [o.token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)] == refs
        again = engine.generate(prompts[:2], greedy, use_tqdm=False)  # prefix-cache hits on the prompts
        assert [o.token_ids for o in again] == refs[:2]
        sampled = engine.generate(prompts[:2], SamplingParams(max_new_tokens=30, temperature=1.0, n=3, seed=5,
                                                              ignore_eos=True), use_tqdm=False)
        assert all(len(s.token_ids) == 30 for o in sampled for s in o.samples)
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
