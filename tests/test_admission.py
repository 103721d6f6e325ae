"""The "never a wrong token" guard: a model runs on the engine only where it computes HF's tokens; anything else
falls back to plain HF with one logged reason, and a forward in which a layer's attention did not run through the
paged path is refused instead of answered."""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_paged
from hf_paged.execution.kernels.paged_attention import step_running
from hf_paged.execution.patches.fused_layers import LLAMA_EQUIVALENT

from conftest import left_pad, tiny_prompts

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def _tiny(model_type: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**_SIZES, **overrides})
    config.pad_token_id, config.eos_token_id = 0, None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch():
    return left_pad([[t % 128 for t in p] for p in tiny_prompts(4, seed=3, low=18, high=30)], 0)


def _greedy(model, **kwargs):
    ids, mask = _batch()
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


def _drop_kwargs(attention: torch.nn.Module, lose_metadata: bool) -> None:
    """Make one attention module call the attention function without the forward's keyword arguments (as
    StableLM's and Nemotron's layers do); with ``lose_metadata`` also outside the engine's step, as a layer that
    computes its attention some other way would."""
    original = type(attention).forward

    def forward(hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        with step_running(None) if lose_metadata else nullcontext():
            return original(attention, hidden_states, position_embeddings, attention_mask, past_key_values)

    attention.forward = forward


def test_layer_dropping_kwargs_still_gives_hf_tokens():
    """The step's metadata reaches the attention through the engine forward, not only through kwargs a layer may
    drop: such a layer is exact on the engine."""
    model = _tiny("llama")
    want = _greedy(model)
    _drop_kwargs(model.model.layers[1].self_attn, lose_metadata=False)
    hf_paged.wrap(model, None, num_blocks=64, block_size=8, fuse_layers=False)
    try:
        assert hf_paged.fallback_reason(model) is None
        assert torch.equal(_greedy(model), want)
        assert hf_paged.get_engine(model).stats()["generation_tokens"] > 0
    finally:
        hf_paged.unwrap(model)


def test_engine_refuses_a_layer_whose_attention_loses_the_step(caplog):
    """A layer whose attention runs without the step (plain SDPA over the whole flattened batch) is caught by the
    per-layer call check: the engine refuses the model at its probe step, and the wrapped generate gives HF's
    tokens through HF with the reason logged once."""
    model = _tiny("llama")
    want = _greedy(model)
    _drop_kwargs(model.model.layers[1].self_attn, lose_metadata=True)
    with pytest.raises(hf_paged.UnsupportedModel, match="layer 1: 0x"):
        hf_paged.LLMEngine(model, num_blocks=64, block_size=8)
    hf_paged.wrap(model, None, num_blocks=64, block_size=8)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            assert torch.equal(_greedy(model), want)
            assert torch.equal(_greedy(model), want)
        reasons = [r.getMessage() for r in caplog.records if "-> HF generate" in r.getMessage()]
        assert len(reasons) == 1 and "does not run through hf_paged's paged attention" in reasons[0]
        assert "paged attention" in hf_paged.fallback_reason(model)
    finally:
        hf_paged.unwrap(model)


def test_running_engine_fails_requests_instead_of_returning_wrong_tokens():
    """The check runs on every forward, not only at the probe: a layer that stops running the paged attention after
    the engine started fails the step's requests; no token reaches the caller."""
    model = _tiny("llama")
    with hf_paged.LLMEngine(model, num_blocks=64, block_size=8, fuse_layers=False) as engine:
        prompt = [t % 128 for t in tiny_prompts(1, seed=5, low=10, high=12)[0]]
        assert engine.generate([prompt], hf_paged.SamplingParams(max_new_tokens=4), use_tqdm=False)[0].token_ids
        _drop_kwargs(model.model.layers[0].self_attn, lose_metadata=True)
        seq = engine.submit(prompt, hf_paged.SamplingParams(max_new_tokens=4))
        seq.done.wait(60)
        assert isinstance(seq.error, hf_paged.UnsupportedModel)
        assert seq.output().token_ids == []


@pytest.mark.parametrize("name, value, feature", [
    ("s_aux", torch.zeros(2), "attention argument 's_aux'"),  # sinks, but not one per query head (4)
    ("position_bias", torch.zeros(1), "relative position bias"),
    ("block_indices", torch.zeros(1), "sparse attention"),
])
def test_unknown_attention_argument_is_refused(monkeypatch, name, value, feature):
    """An attention argument the kernels do not implement, or sinks of another shape than one logit per query head,
    are not ignored."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    paged = ALL_ATTENTION_FUNCTIONS["hf_paged"]

    def with_argument(module, query, key, value_, mask, **kwargs):
        return paged(module, query, key, value_, mask, **{name: value}, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "hf_paged", with_argument)
    with pytest.raises(hf_paged.UnsupportedModel, match=feature):
        hf_paged.LLMEngine(_tiny("llama"), num_blocks=64, block_size=8, fuse_layers=False)


def test_sinks_passed_by_a_llama_layer_are_computed(monkeypatch):
    """Sinks of one logit per query head change the output (the engine does not ignore them) and give what the
    eager attention with sinks computes: gpt-oss's ``eager_attention_forward`` as the reference (Llama's layers
    unfused: the fused ones call the paged attention without the interface, and sinks are not Llama's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.llama import modeling_llama

    model = _tiny("llama")
    sinks = torch.tensor([2.0, -1.0, 0.5, 3.0])
    for layer in model.model.layers:
        layer.self_attn.sinks = sinks
    paged = ALL_ATTENTION_FUNCTIONS["hf_paged"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "hf_paged",
                        lambda m, q, k, v, mask, **kw: paged(m, q, k, v, mask, s_aux=m.sinks, **kw))
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", modeling_gpt_oss.eager_attention_forward)
    model.set_attn_implementation("eager")
    want = _greedy(model)
    hf_paged.wrap(model, None, num_blocks=64, block_size=8, fuse_layers=False)
    try:
        assert hf_paged.fallback_reason(model) is None
        assert torch.equal(_greedy(model), want)
    finally:
        hf_paged.unwrap(model)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "hf_paged", paged)  # sinks dropped: the probe sees other logits
    hf_paged.wrap(model, None, num_blocks=64, block_size=8, fuse_layers=False)
    try:
        assert "logits differ" in hf_paged.fallback_reason(model) and torch.equal(_greedy(model), want)
    finally:
        hf_paged.unwrap(model)


def test_window_other_than_the_layers_is_refused(monkeypatch):
    """The window a layer attends with is the one transformers masks its layer type with; an attention call that
    passes another one is refused rather than followed or ignored."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _tiny("mistral", sliding_window=8)
    assert hf_paged.admission.layer_windows(model) == {0: 8, 1: 8}
    paged = ALL_ATTENTION_FUNCTIONS["hf_paged"]

    def other_window(module, query, key, value, mask, sliding_window=None, **kwargs):
        return paged(module, query, key, value, mask, sliding_window=4, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "hf_paged", other_window)
    with pytest.raises(hf_paged.UnsupportedModel, match="layer 0 attends with window 4, its config says 8"):
        hf_paged.LLMEngine(model, num_blocks=64, block_size=8, fuse_layers=False)


def test_window_from_the_layer_type_when_the_call_passes_none():
    """Qwen2-MoE's attention does not pass its window to the attention function; HF masks its sliding layers all the
    same. The engine attends with the layer type's window, so prompts longer than it give HF's tokens."""
    model = _tiny("qwen2_moe", use_sliding_window=True, sliding_window=8, max_window_layers=2, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    assert hf_paged.admission.layer_windows(model) == {0: 8, 1: None}
    want = _greedy(model)
    hf_paged.wrap(model, None, num_blocks=64, block_size=8)
    try:
        assert hf_paged.fallback_reason(model) is None
        assert torch.equal(_greedy(model), want)
    finally:
        hf_paged.unwrap(model)


@pytest.mark.parametrize("model_type, overrides, feature", [
    # Its recurrent blocks keep their state outside transformers' Cache API (Mamba-style mixers that use it run).
    ("recurrent_gemma", dict(num_hidden_layers=2, hidden_size=64, lru_width=64, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=128,
                             block_types=["recurrent", "attention"]), "recurrent state"),
    ("deepseek_v32", dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                          num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          first_k_dense_replace=1, n_group=1, topk_group=1, index_head_dim=16, index_n_heads=2,
                          index_topk=4), "sparse attention"),
    ("mimo_v2_flash", dict(head_dim=16, v_head_dim=8, sliding_window=8, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32), "K/V head counts that differ between layers"),
])
def test_static_refusals_name_the_feature(model_type, overrides, feature, caplog):
    model = _tiny(model_type, **overrides)
    assert feature in hf_paged.admission.engine_refusal(model)
    with caplog.at_level(logging.WARNING, logger="hf_paged"):
        assert hf_paged.wrap(model, None, num_blocks=64) is model
    assert not hf_paged.api.is_wrapped(model)
    assert any(feature in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=feature.split(":")[0].split("(")[0]):
        hf_paged.PagedCache(model)


def test_mla_kv_cache_holds_each_width():
    """MLA on the engine: keys (nope + rope) and values at their own widths, one per query head, no padding; a
    PagedCache holds what transformers caches for MLA (the compressed latent and the rotary key, one head)."""
    model = _tiny("deepseek_v2", kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                  v_head_dim=12, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)
    assert hf_paged.admission.engine_refusal(model) is None
    engine = hf_paged.LLMEngine(model, num_blocks=32, block_size=8)
    try:
        kv = engine.kv_cache
        assert (kv.num_kv_heads, kv.head_dim, kv.head_dim_v) == (4, 24, 12) and kv.split
        assert kv.key_cache(0).shape == (33, 8, 4, 24) and kv.value_cache(1).shape == (33, 8, 4, 12)
        assert kv.bytes_per_block == 2 * 8 * 4 * (24 + 12) * 4 and kv.nbytes == 33 * kv.bytes_per_block
    finally:
        engine.close()
    engine = hf_paged.LLMEngine(model, num_blocks=32, block_size=8, kv_cache_dtype="int8")  # the probe passes
    try:
        kv = engine.kv_cache
        assert kv.quantized and kv.kv_v.dtype == torch.int8 and kv.value_cache(0).shape == (33, 8, 4, 12)
        assert len(engine.generate([[5, 9, 17, 3, 40, 2, 7, 11, 30]], hf_paged.SamplingParams(max_new_tokens=4),
                                   use_tqdm=False)[0].token_ids) == 4
    finally:
        engine.close()
    want = _greedy(model)
    cache = hf_paged.PagedCache(model)
    assert torch.equal(_greedy(model, past_key_values=cache), want)
    assert (cache.kv_cache.num_kv_heads, cache.kv_cache.head_dim, cache.kv_cache.head_dim_v) == (1, 16, 8)
    cache.free()


def test_nope_temperature_tuning_from_the_steps_positions():
    """Llama 4's NoPE layers scale their queries by position, which HF computes from its cache's length (the
    flattened engine batch would give every sequence positions from 0): the engine computes it from each token's own
    position, and only in its own forwards; a plain forward meanwhile keeps the model's flag."""
    model = _tiny("llama4_text", attention_chunk_size=8, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                  intermediate_size_mlp=128, no_rope_layer_interval=2, floor_scale=2, layer_types=None)
    tuned = [m for m in model.modules() if hf_paged.admission.temperature_tuned(m)]
    assert tuned and hf_paged.admission.layer_windows(model) == {0: 8, 1: None}
    assert repr(hf_paged.admission.layer_windows(model)[0]) == "ChunkedWindow(8)"
    ids = torch.tensor([[t % 128 for t in tiny_prompts(1, seed=5, low=20, high=21)[0]]])
    want = [model.generate(ids[:, : n], attention_mask=torch.ones_like(ids[:, : n]), max_new_tokens=6,
                           do_sample=False, pad_token_id=0)[0, n:].tolist() for n in (12, 20)]
    engine = hf_paged.LLMEngine(model, num_blocks=64, block_size=8)
    try:
        outs = engine.generate([ids[0, :12].tolist(), ids[0, :20].tolist()],
                               hf_paged.SamplingParams(max_new_tokens=6, temperature=0), use_tqdm=False)
        assert [o.token_ids for o in outs] == want
    finally:
        engine.close()
    assert all(m.__dict__["attn_temperature_tuning"] is True for m in tuned)  # the model's flag is back


def test_paged_cache_refuses_mismatched_kv_from_a_given_kv_cache():
    model = _tiny("llama")
    kv_cache = hf_paged.KVCache(2, 2, 8, num_blocks=8, block_size=8)  # head_dim 8, the model's is 16
    pool = hf_paged.BlockPool(kv_cache.num_blocks, kv_cache.block_size)
    ids, mask = _batch()
    for cache in (hf_paged.PagedCache(kv_cache=kv_cache), hf_paged.PagedCache(kv_cache=kv_cache, pool=pool)):
        with pytest.raises(ValueError, match="past_key_values: layer 0"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=cache)
        assert cache.kv_cache is kv_cache and kv_cache.head_dim == 8  # a given cache is never re-shaped
    assert pool.num_free_blocks == pool.num_blocks and not kv_cache.kv.any()


def test_granite_decoder_layer_is_not_fused_but_its_parts_are():
    """Granite's attention, MLP and norms compute Llama's; its decoder layer does not (residual multiplier): the
    fused path takes the parts and leaves the layer to its own forward, and the tokens are HF's."""
    model = _tiny("granite", residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2,
                  logits_scaling=2.0)
    want = _greedy(model)
    hf_paged.wrap(model, None, num_blocks=64, block_size=8)
    try:
        assert torch.equal(_greedy(model), want)
        engine = hf_paged.get_engine(model)
        fused = {type(f).__name__ for f in engine.runner.forwards.values()}
        if engine.plan.fused_layers:
            assert "_FusedAttention" in fused and "_FusedDecoderLayer" not in fused
    finally:
        hf_paged.unwrap(model)


def _code(fn):
    code = inspect.unwrap(fn).__code__
    return code.co_code, code.co_consts, code.co_names


@pytest.mark.parametrize("kind, name", [(k, n) for k, names in LLAMA_EQUIVALENT.items() for n in names])
def test_fused_allowlist_matches_llama(kind, name):
    """Each class the fused path takes for Llama's computes Llama's forward (its code is Llama's; for attention,
    so are the rotary functions its module calls): a transformers release that changes one fails here."""
    import importlib

    from transformers.models.llama import modeling_llama as llama

    folder, cls_name = name.split(".")
    module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    cls = getattr(module, cls_name)
    reference = {"attention": llama.LlamaAttention, "mlp": llama.LlamaMLP, "rms_norm": llama.LlamaRMSNorm,
                 "decoder_layer": llama.LlamaDecoderLayer}[kind]
    assert _code(cls.forward) == _code(reference.forward)
    if kind == "attention":
        for fn in ("apply_rotary_pos_emb", "rotate_half"):
            assert _code(getattr(module, fn)) == _code(getattr(llama, fn))
