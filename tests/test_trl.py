"""TRL's ``GRPOTrainer`` (``use_vllm=False``) on a wrapped model, unchanged: its generation phase runs on the engine,
and after a few steps with each optimizer (fused AdamW, foreach AdamW, SGD) the wrapped model's greedy output equals
a fresh model's holding the trained weights: the engine never serves stale weights."""

from __future__ import annotations

import datasets  # test dependencies (lm_eval's and trl's): make test installs them
import pytest
import torch
import trl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_paged
from hf_paged.models import default_model_dir

PROMPTS = ["Hello there", "The sky is", "Once upon", "Numbers:"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.padding_side = "left"
    return tok


def _tiny_model(tok) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _greedy(model, tok) -> torch.Tensor:
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    return model.generate(**ids, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
def test_grpo_steps_then_the_engine_serves_the_trained_weights(tokenizer, tmp_path, optim):
    model = _tiny_model(tokenizer)
    before = _greedy(model, tokenizer)
    hf_paged.wrap(model, tokenizer)
    try:
        args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                              max_completion_length=16, max_steps=2, optim=optim, learning_rate=5e-2, report_to=[],
                              use_cpu=True, save_strategy="no", bf16=False, disable_tqdm=True)
        trainer = trl.GRPOTrainer(model=model, args=args, processing_class=tokenizer,
                                  reward_funcs=lambda completions, **_: [float(len(set(c))) for c in completions],
                                  train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS * 4}))
        trainer.train()
        engine = hf_paged.get_engine(model)
        assert engine.stats()["generation_tokens"] >= 2 * 8 * 16  # both steps' completions came from the engine
        after = _greedy(model, tokenizer)
    finally:
        hf_paged.unwrap(model)
    fresh = _tiny_model(tokenizer)
    fresh.load_state_dict(model.state_dict())
    expected = _greedy(fresh.eval(), tokenizer)
    assert not torch.equal(expected, before), "the steps should move the greedy tokens"
    assert torch.equal(after, expected)
