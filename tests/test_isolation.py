"""No request can harm another inside the engine: fields are checked against the model before admission, sampling
parameters at the edges of their ranges sample (or fail that request alone), and a forward that fails in a batch
is run again sequence by sequence, so only the request that makes it fail fails; the pool never leaks."""

import pytest
import torch

from hf_paged import FinishReason, LLMEngine, SamplingParams

from conftest import build_tiny_model, tiny_prompts
from test_engine import hf_greedy

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return build_tiny_model("llama", tiny_model_dir)


def test_fields_checked_against_the_model(llama):
    vocab = llama.config.vocab_size
    with LLMEngine(llama, None, num_blocks=64) as engine:
        bad = [SamplingParams(stop_token_ids=[vocab], min_new_tokens=1), SamplingParams(stop_token_ids=[-1]),
               SamplingParams(temperature=float("inf")), SamplingParams(repetition_penalty=float("nan")),
               SamplingParams(top_p=float("nan"))]
        for params in bad:
            with pytest.raises(ValueError, match=r"^(stop_token_ids|temperature|repetition_penalty|top_p):"):
                engine.submit([1, 2, 3], params)
        with pytest.raises(ValueError, match="^prompt:"):
            engine.submit([1, vocab], GREEDY)
        assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_extreme_sampling_parameters_do_not_touch_the_others(llama):
    """A huge top_k, a vanishing repetition penalty, a tiny temperature: those requests finish (sampled or failed
    alone), and the greedy requests batched with them give HF's tokens."""
    prompts = tiny_prompts(4, seed=31)
    refs = hf_greedy(llama, prompts, 12, 0, set(), batch=4)
    hostile = [SamplingParams(max_new_tokens=12, temperature=1.0, top_k=2 ** 70, top_p=0.9, seed=1),
               SamplingParams(max_new_tokens=12, temperature=1.0, repetition_penalty=1e-38, seed=2),
               SamplingParams(max_new_tokens=12, temperature=1e-30, seed=3),
               SamplingParams(max_new_tokens=12, temperature=1.0, min_p=1.0, top_k=1, seed=4)]
    with LLMEngine(llama, None, num_blocks=128) as engine:
        outs = engine.generate(prompts + prompts, [GREEDY] * 4 + hostile, use_tqdm=False)
        assert [o.token_ids for o in outs[:4]] == refs
        vocab = llama.config.vocab_size
        for out in outs[4:]:
            assert out.finish_reason in (FinishReason.LENGTH, FinishReason.ERROR)
            assert all(0 <= t < vocab for t in out.token_ids)
        assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_failing_forward_fails_only_its_request(llama):
    """A sequence whose forward raises (here: a hook on the embedding refusing one token id) fails alone: the step
    runs again without it, and the sequences batched with it give HF's tokens."""
    prompts = tiny_prompts(4, seed=32)
    poison = 7
    prompts = [[t for t in p if t != poison] for p in prompts]
    refs = hf_greedy(llama, prompts, 12, 0, set(), batch=4)

    def refuse_poison(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned token")

    with LLMEngine(llama, None, num_blocks=128, enable_prefix_caching=True) as engine:
        handle = llama.get_input_embeddings().register_forward_pre_hook(refuse_poison)  # after the start-up probe
        try:
            outs = engine.generate(prompts[:2] + [prompts[2] + [poison]] + prompts[3:], GREEDY, use_tqdm=False)
        finally:
            handle.remove()
        assert outs[2].finish_reason == FinishReason.ERROR and "poisoned" in str(outs[2].error)
        assert [o.token_ids for i, o in enumerate(outs) if i != 2] == refs[:2] + refs[3:]
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        # The failed prompt's blocks were not cached: the same prompt without the poison runs exactly.
        assert engine.generate([prompts[2]], GREEDY, use_tqdm=False)[0].token_ids == refs[2]
