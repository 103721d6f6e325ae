"""PEFT LoRA models, as people load them (get_peft_model, PeftModel.from_pretrained), wrapped: the same greedy
tokens as the unwrapped model (oracle: transformers + peft themselves), with unmerged random adapters on every
projection, on o_proj/down_proj only (the fused attention and MLP paths around a LoRA layer), and for an adapter
injected after the engine already ran."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import hf_paged

from conftest import build_tiny_model, left_pad, tiny_prompts
from dropin_helpers import one_thread  # noqa: F401

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(targets, task_type="CAUSAL_LM"):
    # init_lora_weights=False: random A and B, so the adapter changes the output (B = 0 would not)
    return LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type=task_type)


@pytest.fixture(scope="module")
def batch():
    return left_pad(tiny_prompts(4, seed=11), 0)


def greedy(model, batch, n=12):
    ids, mask = batch
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("targets", [ALL_PROJECTIONS, ["o_proj", "down_proj"]], ids=["all", "o_down"])
@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None], ids=["causal_lm", "generic"])
def test_get_peft_model_wrapped_equals_unwrapped(tiny_model_dir, batch, targets, task_type):
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model("llama", tiny_model_dir), lora(targets, task_type)).eval()
    expected = greedy(model, batch)
    with model.disable_adapter():
        assert not torch.equal(greedy(model, batch), expected)  # the adapter matters
    hf_paged.wrap(model, None, num_blocks=64)
    try:
        assert torch.equal(greedy(model, batch), expected)
        assert hf_paged.get_engine(model).metrics.steps > 0
    finally:
        hf_paged.unwrap(model)


def test_peft_model_from_pretrained(tiny_model_dir, tmp_path, batch):
    torch.manual_seed(1)
    trained = get_peft_model(build_tiny_model("llama", tiny_model_dir), lora(ALL_PROJECTIONS))
    trained.save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(build_tiny_model("llama", tiny_model_dir), tmp_path / "adapter").eval()
    expected = greedy(model, batch)
    hf_paged.wrap(model, None, num_blocks=64)
    try:
        assert torch.equal(greedy(model, batch), expected)
    finally:
        hf_paged.unwrap(model)


def test_adapter_added_after_the_engine_ran(tiny_model_dir, batch):
    base = build_tiny_model("llama", tiny_model_dir)
    base_tokens = greedy(base, batch)
    hf_paged.wrap(base, None, num_blocks=64)
    try:
        assert torch.equal(greedy(base, batch), base_tokens)  # the engine built its fused / packed forwards
        torch.manual_seed(2)
        model = get_peft_model(base, lora(ALL_PROJECTIONS)).eval()  # LoRA layers injected into the wrapped base
        ours = greedy(model, batch)  # PeftModel.generate -> the base's (wrapped) generate
    finally:
        hf_paged.unwrap(base)
    assert torch.equal(ours, greedy(model, batch))  # HF + peft, unwrapped
    assert not torch.equal(ours, base_tokens)
