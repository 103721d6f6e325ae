"""PagedCache in HF's own generate must give exactly what DynamicCache gives (fp32), share expanded
prompts and beams by reference, and keep its memory within one block per sequence of what it stores."""

import pytest
import torch
from transformers import DynamicCache

from hf_paged import BlockPool, KVCache, PagedCache
from hf_paged.execution.kv_cache import model_kv_cache
from hf_paged.execution.patches.attention import disable_paged_attention, enable_paged_attention

from conftest import build_tiny_model, left_pad, tiny_prompts


def _generate_both(model, inputs, cache_blocks=600, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    ref = model.generate(**inputs, past_key_values=DynamicCache(config=model.config), **kwargs)
    cache = PagedCache(model, num_blocks=cache_blocks)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        out = model.generate(**inputs, past_key_values=cache, **kwargs)
        used = cache.pool.num_used_blocks
    finally:
        cache.free()
    return ref, out, used


@pytest.fixture(scope="module")
def chat_batch(smollm2, chat_ids):
    _, tok = smollm2
    ids, mask = left_pad(chat_ids[:16], tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def test_greedy_smollm2_16_prompts_left_padded(smollm2, chat_batch):
    model, _ = smollm2
    ref, out, _ = _generate_both(model, chat_batch, max_new_tokens=32, do_sample=False)
    assert ref.shape == out.shape
    assert torch.equal(ref, out)


def test_seeded_sampling_and_num_return_sequences(smollm2, chat_batch):
    model, _ = smollm2
    inputs = {k: v[:4] for k, v in chat_batch.items()}
    ref, out, _ = _generate_both(model, inputs, seed=7, max_new_tokens=24, do_sample=True, top_k=20,
                                 num_return_sequences=2)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("num_beams,num_return", [(2, 1), (4, 2)])
def test_beam_search_equals_hf(smollm2, chat_batch, num_beams, num_return):
    model, _ = smollm2
    inputs = {k: v[:3] for k, v in chat_batch.items()}
    ref, out, _ = _generate_both(model, inputs, max_new_tokens=24, num_beams=num_beams,
                                 num_return_sequences=num_return, early_stopping=True)
    assert torch.equal(ref, out)


def test_beam_search_stores_a_long_prompt_once(smollm2):
    model, tok = smollm2
    prompt = tok("The history of the printing press is " * 80, return_tensors="pt").input_ids[:, :512]
    assert prompt.shape[1] == 512
    cache = PagedCache(model, num_blocks=400)
    seen = []
    real_update = cache.update

    def spy(k, v, layer_idx, *a, **kw):
        out = real_update(k, v, layer_idx, *a, **kw)
        if layer_idx == 0:
            seen.append(cache.pool.num_used_blocks)
        return out

    cache.update = spy
    try:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, max_new_tokens=8,
                       num_beams=4, early_stopping=True)
    finally:
        cache.free()
    # After the prefill the 4 beams hold the 32 prompt blocks once; each later step adds at most one
    # private partial block per beam (copy-on-write), never a copy of the prompt.
    assert seen[0] == 32
    assert max(seen) <= 32 + 4
    assert cache.pool.num_free_blocks == cache.pool.num_blocks


def test_memory_within_one_block_per_sequence(smollm2, chat_batch):
    model, _ = smollm2
    inputs = {k: v[:8] for k, v in chat_batch.items()}
    cache = PagedCache(model, num_blocks=300)
    try:
        model.generate(**inputs, past_key_values=cache, max_new_tokens=21, min_new_tokens=21, do_sample=False)
        stored = sum(row.num_tokens for row in cache.rows)  # rows keep their left padding, as DynamicCache does
        slots = cache.num_blocks_in_use * cache.pool.block_size
        assert stored <= slots < stored + len(cache.rows) * cache.pool.block_size
    finally:
        cache.free()


def test_tiny_architectures_greedy(tiny_model):
    name, model = tiny_model
    rows = tiny_prompts(5, seed=3)
    ids, mask = left_pad(rows, 0)
    ref, out, _ = _generate_both(model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=20,
                                 min_new_tokens=20, do_sample=False)
    assert torch.equal(ref, out), name


def test_tiny_architectures_beams(tiny_model):
    name, model = tiny_model
    rows = tiny_prompts(2, seed=5)
    ids, mask = left_pad(rows, 0)
    ref, out, _ = _generate_both(model, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=12,
                                 num_beams=3, num_return_sequences=2)
    assert torch.equal(ref, out), name


@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant"])
def test_assisted_generate_crops_rejected_candidates(tiny_model, assist):
    """HF's assisted decoding on a PagedCache: rejected candidates are cropped (their blocks go back), and the tokens
    are those of the same call on HF's own cache."""
    name, model = tiny_model
    prompt = tiny_prompts(1, seed=11, low=6, high=10)[0] * 4  # repeats itself: drafts that hold and that do not
    ids = torch.tensor([prompt])
    extra = {"prompt_lookup_num_tokens": 5} if assist == "prompt_lookup" else {"assistant_model": model}
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                do_sample=False, **extra)
    want = model.generate(**call)
    cache = PagedCache(model, block_size=4)
    try:
        got = model.generate(**call, past_key_values=cache)
        cached = cache.get_seq_length()
        assert cached == got.shape[1] - 1, name  # the last token is not yet in the cache
        assert cache.num_blocks_in_use == -(-cached // 4), name
    finally:
        cache.free()
    assert cache.pool.num_used_blocks == 0
    assert torch.equal(got, want), name


def test_crop_takes_a_count_to_remove_or_a_length_to_keep(smollm2):
    model, _ = smollm2
    cache = PagedCache(model, block_size=4)
    try:
        model(torch.arange(10, 23).unsqueeze(0), past_key_values=cache)  # 13 positions: 4 blocks
        cache.crop(-5)
        assert cache.get_seq_length() == 8 and cache.num_blocks_in_use == 2
        cache.crop(6)  # older transformers pass the length to keep
        assert cache.get_seq_length() == 6 and cache.num_blocks_in_use == 2
        cache.crop(0)
        assert cache.get_seq_length() == 6
        with pytest.raises(ValueError, match="^tokens_to_remove"):
            cache.crop(-7)
    finally:
        cache.free()


def test_paged_attention_selected_still_equals_dynamic(smollm2, chat_batch):
    """With the model set to hf_paged, PagedCache generate and plain forwards are unchanged."""
    model, _ = smollm2
    inputs = {k: v[:4] for k, v in chat_batch.items()}
    before_logits = model(**inputs).logits
    ref = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    enable_paged_attention(model)
    try:
        assert model.config._attn_implementation == "hf_paged"
        assert torch.equal(model(**inputs).logits, before_logits)
        with PagedCache(model, num_blocks=100) as cache:
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=16, do_sample=False)
        assert torch.equal(ref, out)
    finally:
        disable_paged_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_caches_share_one_kv_cache_and_pool(tmp_path):
    """Two caches on one ``KVCache`` and its ``BlockPool``: each takes its own blocks of the shared storage, neither
    touches the other's, both give DynamicCache's tokens; freeing returns the blocks and keeps the storage."""
    model = build_tiny_model("llama", tmp_path)
    kv_cache = model_kv_cache(model, num_blocks=64, block_size=4)
    assert kv_cache.kv.shape == (2, 2, 65, 4, model.config.num_key_value_heads, 16)
    pool = BlockPool(kv_cache.num_blocks, kv_cache.block_size)
    ids, mask = left_pad(tiny_prompts(3, seed=8), 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    first, second = PagedCache(model, kv_cache=kv_cache, pool=pool), PagedCache(model, kv_cache=kv_cache, pool=pool)
    assert first.kv_cache is second.kv_cache is kv_cache and first.pool is second.pool is pool
    try:
        out_first = model.generate(ids, past_key_values=first, **kwargs)
        first_blocks = sorted({b for row in first.rows for b in row.blocks})
        assert pool.num_used_blocks == len(first_blocks) == first.num_blocks_in_use > 0
        stored = kv_cache.kv[:, :, first_blocks].clone()
        out_second = model.generate(ids, past_key_values=second, **kwargs)
        second_blocks = {b for row in second.rows for b in row.blocks}
        assert second_blocks.isdisjoint(first_blocks)
        assert pool.num_used_blocks == len(first_blocks) + len(second_blocks)
        assert torch.equal(kv_cache.kv[:, :, first_blocks], stored)  # the second cache wrote only its own blocks
    finally:
        first.free()
        second.free()
    assert torch.equal(out_first, ref) and torch.equal(out_second, ref)
    assert pool.num_free_blocks == pool.num_blocks and kv_cache.kv.shape[2] == 65  # the storage stays


def test_a_given_kv_cache_does_not_grow():
    """A cache on a given ``KVCache`` is sized by it: a generation it cannot hold fails with MemoryError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_CONFIGS

    spec = dict(TINY_CONFIGS["llama"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    kv_cache = KVCache(2, config.num_key_value_heads, 16, block_size=4, num_blocks=2)
    cache = PagedCache(model, kv_cache=kv_cache)
    ids, mask = left_pad(tiny_prompts(2, seed=9, low=10, high=20), 0)
    with pytest.raises(MemoryError, match="too small"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    cache.free()
    assert cache.pool.num_blocks == kv_cache.num_blocks == 2 and cache.pool.num_free_blocks == 2
