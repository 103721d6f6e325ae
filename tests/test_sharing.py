"""Sharing KV blocks inside the engine: beam search equal to HF's, parallel samples that prefill and
store their prompt once, and prefix caching that prefills only what is not cached."""

import time

import pytest

from hf_paged import LLMEngine, SamplingParams

from conftest import left_pad, tiny_prompts


def _hf_beams(model, prompts, pad, max_new, **kwargs):
    ids, mask = left_pad(prompts, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def _engine_beams(engine, prompts, max_new, k, nrs, pad, eos=True, **kwargs):
    params = SamplingParams(max_new_tokens=max_new, temperature=0, num_beams=k, num_return_sequences=nrs,
                            ignore_eos=not eos, **kwargs)
    outs = engine.generate(prompts, params, use_tqdm=False)
    rows = [s.token_ids for o in outs for s in o.samples]
    width = max(len(r) for r in rows)
    return [r + [pad] * (width - len(r)) for r in rows]


@pytest.mark.parametrize("k,nrs", [(2, 1), (4, 2)])
def test_beam_search_equals_hf_smollm2(smollm2, chat_ids, k, nrs):
    model, tok = smollm2
    prompts = chat_ids[:8]
    ref = _hf_beams(model, prompts, tok.pad_token_id, 24, num_beams=k, num_return_sequences=nrs)
    engine = LLMEngine(model, tok, num_blocks=600, enable_prefix_caching=False)
    ours = _engine_beams(engine, prompts, 24, k, nrs, tok.pad_token_id)
    # Both pad every returned sequence to the longest one with the pad token.
    assert ours == ref


@pytest.mark.parametrize("k,nrs", [(2, 1), (4, 2)])
def test_beam_search_equals_hf_tiny(tiny_model_dir, k, nrs):
    from conftest import build_tiny_model

    for name in ("llama", "gpt2"):
        model = build_tiny_model(name, tiny_model_dir / f"beams-{k}")
        prompts = tiny_prompts(3, seed=21)
        ref = _hf_beams(model, prompts, 0, 10, num_beams=k, num_return_sequences=nrs, eos_token_id=None)
        engine = LLMEngine(model, None, num_blocks=200, enable_prefix_caching=False)
        params = SamplingParams(max_new_tokens=10, temperature=0, num_beams=k, num_return_sequences=nrs,
                                ignore_eos=True)
        ours = [s.token_ids for o in engine.generate(prompts, params, use_tqdm=False) for s in o.samples]
        assert ours == ref, name


def test_beams_share_prompt_blocks(smollm2):
    model, tok = smollm2
    prompt = tok("The history of the printing press is " * 80)["input_ids"][:512]
    used = {}
    for share in (True, False):
        engine = LLMEngine(model, tok, num_blocks=600, enable_prefix_caching=False, share_blocks=share)
        engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, num_beams=4, ignore_eos=True),
                        use_tqdm=False)
        used[share] = engine.metrics.peak_blocks_in_use
    assert used[True] <= 32 + 4 + 4  # prompt once, plus each beam's private partial blocks
    assert used[False] >= 4 * 32


def test_parallel_sampling_prefills_and_stores_the_prompt_once(smollm2):
    model, tok = smollm2
    prompt = tok("Once upon a time in a land far away, " * 60)["input_ids"][:512]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, seed=42, n=4, ignore_eos=True)
    results = {}
    for share in (True, False):
        engine = LLMEngine(model, tok, num_blocks=600, enable_prefix_caching=False, share_blocks=share)
        seen = []
        real_step = engine.step

        def step():
            out = real_step()
            seen.append(engine.pool.num_used_blocks)
            return out

        engine.step = step
        out = engine.generate([prompt], params, use_tqdm=False)[0]
        results[share] = [s.token_ids for s in out.samples]
        assert len(out.samples) == 4 and all(len(s.token_ids) == 12 for s in out.samples)
        # The prompt is computed once: 512 prompt tokens + 11 decode steps of 4 samples.
        assert engine.runner.num_forward_tokens == 512 + 4 * 11
        if share:
            assert max(seen) <= 32 + 4  # 32 prompt blocks once + one private partial block per sample
        else:
            assert max(seen) >= 4 * 32
    assert results[True] == results[False]  # seeded samples do not depend on sharing
    assert len({tuple(r) for r in results[True]}) > 1  # four different samples
    engine = LLMEngine(model, tok, num_blocks=600)
    again = engine.generate([prompt], params, use_tqdm=False)[0]
    assert [s.token_ids for s in again.samples] == results[True]  # reproducible


def test_prefix_cache_prefills_only_unshared_tokens(smollm2):
    model, tok = smollm2
    system = tok("You are a careful assistant. Follow the policy below exactly. " * 90)["input_ids"][:1000]
    q1 = tok(" Question: what is the capital of France?")["input_ids"]
    q2 = tok(" Question: name a primary colour.")["input_ids"]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    cold = LLMEngine(model, tok, num_blocks=400, enable_prefix_caching=False)
    expected = cold.generate([system + q2], params, use_tqdm=False)[0].token_ids

    engine = LLMEngine(model, tok, num_blocks=400)
    engine.generate([system + q1], params, use_tqdm=False)
    before = engine.runner.num_forward_tokens
    out = engine.generate([system + q2], params, use_tqdm=False)[0]
    prefilled = engine.runner.num_forward_tokens - before - (len(out.token_ids) - 1)
    shared = (1000 // 16) * 16  # full blocks of the common prefix
    assert prefilled == len(system) + len(q2) - shared
    assert out.token_ids == expected
    assert engine.metrics.summary()["prefix_cache_hit_rate"] > 0

    before = engine.runner.num_forward_tokens
    salted = engine.generate([system + q2], SamplingParams(max_new_tokens=8, temperature=0, cache_salt="tenant-b"),
                             use_tqdm=False)[0]
    assert engine.runner.num_forward_tokens - before - (len(salted.token_ids) - 1) == len(system) + len(q2)
    assert salted.token_ids == expected


def test_prefix_cache_evicts_lru_when_the_pool_needs_blocks(smollm2):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=40)
    first = tok("alpha beta gamma delta " * 40)["input_ids"][:300]
    engine.generate([first], SamplingParams(max_new_tokens=2, temperature=0), use_tqdm=False)
    assert engine.pool.num_cached_blocks > 0
    other = tok("one two three four five " * 40)["input_ids"][:500]
    engine.generate([other], SamplingParams(max_new_tokens=2, temperature=0), use_tqdm=False)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks  # evicted as needed, nothing leaked


def test_n_samples_abort_frees_everything(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=300)
    seq = engine.submit(chat_ids[0], SamplingParams(max_new_tokens=300, temperature=1.0, n=3, ignore_eos=True),
                        request_id="group")
    while not (seq.group.live and seq.group.live[0].num_output_tokens > 2):
        time.sleep(0.01)
    engine.abort("group")
    assert seq.done.wait(30)
    assert seq.output().finish_reason.value == "abort"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
