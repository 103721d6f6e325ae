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
