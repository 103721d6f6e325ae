"""Weights always current: after any kind of update between two engine calls (fused / foreach AdamW, SGD, writes
through ``.data``, ``copy_``, ``load_state_dict``), the engine's greedy tokens equal HF's on the model as it is now;
packed copies of unchanged weights are kept; ``refresh_weights`` and ``reset_prefix_cache`` for what no check sees."""

import pytest
import torch

from hf_paged import LLMEngine, SamplingParams

from conftest import build_tiny_model, tiny_prompts
from test_engine import hf_greedy

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


def _train_step(model, optimizer) -> None:
    ids = torch.tensor([tiny_prompts(1, seed=5)[0]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss * 50  # large enough to move greedy tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def _data_write(model) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * 0.05)


def _copy(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p * 1.05)


def _load_state_dict(model) -> None:
    state = {k: v * 0.9 for k, v in model.state_dict().items()}
    model.load_state_dict(state)


UPDATES = {
    "adamw_fused": lambda m: _train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)),
    "adamw_foreach": lambda m: _train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True)),
    "sgd": lambda m: _train_step(m, torch.optim.SGD(m.parameters(), lr=1.0)),
    "data_write": _data_write,
    "copy": _copy,
    "load_state_dict": _load_state_dict,
}


@pytest.mark.parametrize("update", list(UPDATES))
def test_engine_sees_every_kind_of_weight_update(tiny_model_dir, update):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=41)
    with LLMEngine(model, None, num_blocks=64) as engine:
        before = [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
        assert before == hf_greedy(model, prompts, 10, 0, set(), batch=3)
        UPDATES[update](model)
        refs = hf_greedy(model, prompts, 10, 0, set(), batch=3)
        assert refs != before, "the update should move the greedy tokens"
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs


def test_unchanged_weights_keep_their_packed_copies(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(2, seed=42)
    with LLMEngine(model, None, num_blocks=64) as engine:
        engine.generate(prompts, GREEDY, use_tqdm=False)
        runner = engine.runner
        if not runner.packed:
            pytest.skip("no packed linears on this machine (oneDNN unavailable)")
        first = dict(runner.forwards)
        lm_head = model.get_output_embeddings().weight
        lm_head.data.mul_(1.01)  # one weight, through .data: no version counter moves
        refs = hf_greedy(model, prompts, 10, 0, set(), batch=2)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs
        kept = [m for m, f in runner.forwards.items() if first.get(m) is f]
        assert kept and model.get_output_embeddings() not in kept


def test_refresh_weights_and_reset_prefix_cache(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(2, seed=43)
    with LLMEngine(model, None, num_blocks=64, enable_prefix_caching=True) as engine:
        engine.generate(prompts, GREEDY, use_tqdm=False)
        with torch.no_grad():  # one element through .data: may fall between the sampled fingerprint's elements
            model.model.embed_tokens.weight.data[prompts[0][0]] += 3.0
        engine.refresh_weights()
        refs = hf_greedy(model, prompts, 10, 0, set(), batch=2)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs
        engine.reset_prefix_cache()
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]


def test_sleep_frees_the_pool_and_the_next_request_wakes_it(tiny_model_dir):
    """vLLM's sleep / wake_up for RL loops: the KV memory and packed weights are freed while training runs; the next
    request brings them back, with the weights as they are then."""
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=44)
    with LLMEngine(model, None, num_blocks=64, enable_prefix_caching=True) as engine:
        engine.generate(prompts, GREEDY, use_tqdm=False)
        engine.sleep()
        assert engine.kv_cache.kv.numel() == 0 and not engine.runner.forwards
        UPDATES["adamw_fused"](model)
        refs = hf_greedy(model, prompts, 10, 0, set(), batch=3)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs
        assert engine.kv_cache.kv.numel() > 0
        engine.sleep()
        engine.wake_up()
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs


def test_load_weights_names_and_copies(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(2, seed=45)
    with LLMEngine(model, None, num_blocks=64) as engine:
        engine.generate(prompts, GREEDY, use_tqdm=False)
        new = [(name, p.detach() * 1.1) for name, p in model.named_parameters()]
        engine.load_weights(new)
        refs = hf_greedy(model, prompts, 10, 0, set(), batch=2)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == refs
        with pytest.raises(ValueError, match="^weights: no parameter named 'nope'"):
            engine.load_weights([("nope", torch.zeros(1))])


def test_peft_merge_adapter_is_seen(tiny_model_dir):
    """PEFT's ``merge_adapter`` writes the merged weights through ``.data``: the engine serves them after it."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model("llama", tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    base = peft_model.get_base_model()
    prompts = tiny_prompts(3, seed=46)
    with peft_model.disable_adapter():
        plain = hf_greedy(base, prompts, 10, 0, set(), batch=3)
    with LLMEngine(base, None, num_blocks=64) as engine:
        with peft_model.disable_adapter():
            assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == plain
        peft_model.merge_adapter()
        merged = hf_greedy(base, prompts, 10, 0, set(), batch=3)
        assert merged != plain
        assert [o.token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)] == merged
