"""A zoo of tiny random models: one per architecture that ``AutoModelForCausalLM`` maps in the installed transformers.

``ARCHITECTURES`` lists every model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; ``tiny_config(model_type)`` gives a
tiny fp32 config (hidden 64, 2-4 layers, 4 query / 2 KV heads of 16 where the config allows, vocab 256) with the
architecture's special features switched on and set to bite at short lengths (sliding windows of 8, attention chunks
of 8, several experts with top-2 routing, MLA, hybrid attention + recurrent layers, soft-capping, multipliers, ...),
or raises ``Skip(reason)`` where the architecture cannot be built and run from a config alone.
``build_model`` builds it (seeded, eval mode); ``PROMPTS`` are four token-id prompts longer than every window and
chunk, ``padded_batch`` left-pads them the way HF generation expects.

Sizes are generic (``_GENERIC``: applied to whichever of those fields a config class has); ``OVERRIDES`` holds each
architecture's own fields (nested dicts for sub-configs). A ``layer_types`` / ``mlp_layer_types`` field whose default
mixes several kinds is shrunk to one layer of each kind (first-occurrence order) unless an override sets it.

Every config was checked to give non-degenerate greedy tokens on the four prompts (not one token repeated, rows not
all equal) that depend on the prompts' start: changing all but the last 12 tokens of each prompt changes the
continuation of at least two of the four (sliding windows and recurrent state must not hide a wrong attention pattern).
Exceptions, left as transformers computes them: xlm (see its override).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ARCHITECTURES: list[str] = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = 256
WINDOW = 8  # sliding windows / attention chunks / local-attention spans: shorter than every prompt
MAX_PARAMS = 5_000_000  # a "tiny" config above this is a bug in this file (refused before allocating)


class Skip(Exception):
    """This architecture cannot be built and run from a config here; the message says why."""


# ---- generic sizes: set on whichever of these fields a config class has ----------------------------------------
_GENERIC: dict[str, Any] = {
    # width
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "emb_dim": 64,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    # heads (GQA 4 -> 2 where the config has a KV-head field)
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4, "num_decoder_attention_heads": 4,
    "num_encoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "head_dim": 16, "d_head": 16, "dim_head": 16, "kv_channels": 16, "attention_head_size": 16,
    # MLP / experts
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "n_inner": 128,
    "dff": 128, "d_inner": 128, "ffn_hidden_size": 128, "dim_ff": 128, "feed_forward_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_ffn_hidden_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "num_experts_per_token": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "n_shared_experts": 1, "moe_num_shared_experts": 1,
    # multi-head latent attention (v head dim != qk head dim = nope + rope)
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12,
    # sparse-attention indexers (DSA): top-k smaller than the prompts
    "index_topk": WINDOW, "index_head_dim": 16, "index_n_heads": 2,
    # vocab / positions / init / special tokens
    "vocab_size": VOCAB, "max_position_embeddings": 512, "n_positions": 512, "max_seq_len": 512,
    "max_target_positions": 512, "n_ctx": 512, "context_length": 512,
    # init std 0.1 and untied output embeddings: with tied ones (or std 0.02) the last prompt token's own embedding
    # dominates the logits and greedy decoding repeats one token whatever attention computes
    "initializer_range": 0.1, "init_std": 0.1, "tie_word_embeddings": False,
    "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
}

# Sub-configs of multimodal / composite configs that are built but never run here (vision, audio towers).
_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "head_dim": 16, "num_layers": 1, "depth": 1, "embed_dim": 32,
          "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
          "projection_dim": 32, "out_hidden_size": 64, "vocab_size": VOCAB, "num_blocks": 1,
          "nemo_conv_channels": 32, "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32,
          "adapter_in_dim": 32, "adapter_input_size": 32, "adapter_out_dim": 64, "num_local_experts": 4}

_MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=WINDOW,
               use_mamba_kernels=False)
_SLIDE = dict(sliding_window=WINDOW)
_QWEN_SWA = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 0 full, then sliding
_GATED_DELTANET = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4)
_DECODER = dict(is_decoder=True)  # encoders used as decoders: causal self-attention only with is_decoder
_BLT_PART = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
_INKLING = dict(sliding_window_size=WINDOW, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                d_rel=4, rel_extent=16)
# dots3: the sliding layers have their own MLA geometry (a per-layer config)
_DOTS3_SWA = dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=48, swa_kv_lora_rank=32,
                  swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=12)
# qwen4_exp: QSA indexer (budget 16 tokens in blocks of 4), hyper-connections, per-layer n-gram embeddings (PLE)
_QWEN4 = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4,
              hc_lowrank=16, ple_layer_ids=[1], ple_embed_dim=32, ngram_vocab_size_base=1000, heads_per_ngram=2,
              split_ngram_parts=4, make_ngram_vocab_size_divisible_by=8)

OVERRIDES: dict[str, dict[str, Any]] = {
    "afmoe": dict(_SLIDE, num_dense_layers=1, global_attn_every_n_layers=2, mup_enabled=True),
    "aria_text": dict(moe_num_shared_experts=1),
    "bailing_hybrid": dict(layer_group_size=2, linear_head_dim=16, linear_num_heads=4, num_shared_experts=1),
    "bamba": dict(_MAMBA2, attn_layer_indices=[1]),  # [mamba2, attention]
    "beam": dict(_SLIDE),
    "bert": _DECODER, "bert-generation": _DECODER, "camembert": _DECODER, "data2vec-text": _DECODER,
    "big_bird": dict(_DECODER, attention_type="original_full"),  # block-sparse attention is encoder-only
    # num_hidden_layers: HF generate builds DynamicCache(config), which reads it; BltConfig has no such field
    "blt": dict(num_hidden_layers=2, encoder_hash_byte_group_vocab=64, encoder_hash_byte_group_size=[3, 4],
                local_attention_window_len=WINDOW, patcher_config=dict(_BLT_PART, sliding_window=WINDOW),
                encoder_config=dict(_BLT_PART, hidden_size_global=64),
                decoder_config=dict(_BLT_PART, hidden_size_global=64)),
    "codegen": dict(rotary_dim=8),  # partial rotary: 8 of 16
    "cohere": dict(use_qk_norm=True),
    "cohere2": dict(_SLIDE),
    "cohere2_moe": dict(_SLIDE, mlp_layer_types=["dense", "sparse"], num_shared_experts=1),
    "cohere_compass_text": dict(_SLIDE, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "cwm": dict(_SLIDE),
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define
    "dbrx": dict(attn_config={"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 0.5},
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    "deepseek_v2": dict(first_k_dense_replace=1, n_shared_experts=1),
    "deepseek_v3": dict(first_k_dense_replace=1),
    "deepseek_v32": dict(first_k_dense_replace=1),
    "deepseek_v4": dict(_SLIDE, o_groups=2, o_lora_rank=32,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": WINDOW}),
    "doge": dict(keep_window_size=WINDOW, is_moe=True, num_experts=16, num_experts_per_tok=2),  # experts: a square
    "dots1": dict(_SLIDE, max_window_layers=1, first_k_dense_replace=1, layer_types=None),
    "dots3_note": dict(text_config=dict(_SLIDE, **_DOTS3_SWA)),
    "dots3_note_text": dict(_SLIDE, **_DOTS3_SWA),
    "electra": dict(_DECODER, embedding_size=32),
    "ernie": _DECODER,
    "exaone4": dict(_SLIDE, sliding_window_pattern=2),
    "exaone_moe": dict(_SLIDE, sliding_window_pattern=2),
    "falcon_h1": dict(_MAMBA2, mamba_d_ssm=128, embedding_multiplier=2.0, lm_head_multiplier=0.5,
                      key_multiplier=0.8, attention_in_multiplier=1.2, attention_out_multiplier=0.9,
                      mlp_multipliers=[1.1, 0.9], ssm_in_multiplier=1.2, ssm_out_multiplier=0.8),
    "falcon_mamba": dict(state_size=8, time_step_rank=8, expand=2),
    "flint": dict(_SLIDE, mlp_only_layers=[0]),
    "gemma2": dict(_SLIDE, query_pre_attn_scalar=16),  # both soft-cappings stay on (their defaults)
    "gemma3": dict(text_config=dict(_SLIDE, query_pre_attn_scalar=16), mm_tokens_per_image=4),
    "gemma3_text": dict(_SLIDE, query_pre_attn_scalar=16, final_logit_softcapping=30.0),
    # KV sharing: the last 2 of 4 layers reuse K/V of the earlier layer of their type; AltUp, LAuReL, per-layer
    # inputs and activation sparsity on
    "gemma3n_text": dict(_SLIDE, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                         laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                         intermediate_size=128),
    "gemma4": dict(text_config=dict(_SLIDE, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB)),
    "gemma4_text": dict(_SLIDE, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB),
    "gemma4_unified": dict(text_config=dict(_SLIDE)),
    "gemma4_unified_text": dict(_SLIDE),
    "glm4_moe": dict(first_k_dense_replace=1, use_qk_norm=True),
    "glm_moe_dsa": dict(first_k_dense_replace=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "gpt_neox": dict(rotary_pct=0.25),
    "gpt_oss": dict(_SLIDE),  # attention sinks are always on
    "gptj": dict(rotary_dim=8),
    "granite": dict(_MULTIPLIERS),
    "granite_swa": dict(_MULTIPLIERS, **_SLIDE),
    "granitemoe": dict(_MULTIPLIERS),
    "granitemoe_swa": dict(_MULTIPLIERS, **_SLIDE),
    "granitemoehybrid": dict(_MULTIPLIERS, **_MAMBA2, shared_intermediate_size=64,
                             layer_types=["linear_attention", "full_attention"]),
    "granitemoeshared": dict(_MULTIPLIERS, shared_intermediate_size=64),
    # one layer per stack, run H_cycles * (L_cycles + 1) = 4 times (4 cache layers)
    "hrm_text": dict(num_hidden_layers=1, num_layers_per_stack=None, H_cycles=2, L_cycles=1, L_bp_cycles=[1]),
    "hunyuan_v1_dense": dict(use_qk_norm=True),
    "hunyuan_v1_moe": dict(use_qk_norm=True),
    "hy_v3": dict(num_shared_experts=1),
    "hyperclovax": dict(_MULTIPLIERS),
    "inkling2_text": dict(_INKLING, log_scaling_n_floor=16),  # log-scaled attention from 16 tokens on
    "inkling_text": dict(_INKLING),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False),  # [mamba, attention + MoE]
    "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4, num_shared_experts=1),
    "kolibri1": dict(_SLIDE),
    "laguna": dict(_SLIDE, layer_types=["sliding_attention", "full_attention"]),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "lfm3": dict(_SLIDE),
    # chunked attention (chunks of 8) on the RoPE layers, NoPE full-attention layers with temperature tuning from
    # position 4 on (floor_scale), MoE on every other layer
    "llama4": dict(text_config=dict(num_hidden_layers=4, layer_types=None, no_rope_layer_interval=2,
                                    attention_chunk_size=WINDOW, floor_scale=4, interleave_moe_layer_step=2,
                                    intermediate_size_mlp=128)),
    "llama4_text": dict(num_hidden_layers=4, layer_types=None, no_rope_layer_interval=2, attention_chunk_size=WINDOW,
                        floor_scale=4, interleave_moe_layer_step=2, intermediate_size_mlp=128),
    "longcat_flash": dict(zero_expert_num=1, moe_topk=2),
    # initializer_range 0.3: at 0.1 the state forgets the far context and the prompt's start changes nothing
    "mamba": dict(state_size=8, time_step_rank=8, expand=2, initializer_range=0.3),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=16, chunk_size=WINDOW, expand=2,
                   initializer_range=0.3),
    # sinusoidal positions (magnitude 1) drown 0.1-scaled embeddings: scale them and widen the init
    "marian": dict(scale_embedding=True, init_std=0.3),
    "megatron-bert": _DECODER,
    "mellum": dict(_SLIDE, layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"]),
    "mimo_v2_flash": dict(_SLIDE, head_dim=24, v_head_dim=16),  # V narrower than Q/K
    "minimax": dict(block_size=WINDOW),  # lightning-attention blocks
    "minimax_m3_vl_text": dict(layer_types=["minimax_m3_sparse", "full_attention"], mlp_layer_types=["dense", "sparse"],
                               rotary_dim=8, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                               dense_intermediate_size=128, shared_intermediate_size=64),
    "ministral": dict(_SLIDE, layer_types=["sliding_attention", "full_attention"]),
    "mistral": dict(_SLIDE),
    "mixtral": dict(_SLIDE),
    "modernbert-decoder": dict(local_attention=2 * WINDOW, global_attn_every_n_layers=2, layer_types=None),
    "moshi": dict(_SLIDE),
    "nemotron_h": dict(layers_block_type=["linear_attention", "moe", "full_attention", "mlp"], num_hidden_layers=4,
                       mamba_num_heads=8, mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=WINDOW,
                       moe_shared_expert_intermediate_size=32, use_mamba_kernels=False),
    "olmo": dict(clip_qkv=0.5),
    "olmo3": dict(_SLIDE, layer_types=["sliding_attention", "full_attention"]),
    "olmo_hybrid": dict(linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=32, layer_types=["linear_attention", "full_attention"]),
    "olmoe": dict(clip_qkv=0.5),
    "opt": dict(word_embed_proj_dim=32),  # project_in / project_out around the decoder
    "pegasus": dict(scale_embedding=True, init_std=0.3),  # as marian
    "phi": dict(qk_layernorm=True),
    "phi3": dict(_SLIDE, partial_rotary_factor=0.5),
    "phimoe": dict(_SLIDE),
    "qwen2": dict(_QWEN_SWA),
    "qwen2_moe": dict(_QWEN_SWA, mlp_only_layers=[0]),
    "qwen3": dict(_QWEN_SWA),
    "qwen3_5": dict(text_config=dict(_GATED_DELTANET)),
    "qwen3_5_moe": dict(text_config=dict(_GATED_DELTANET)),
    "qwen3_5_moe_text": dict(_GATED_DELTANET),
    "qwen3_5_text": dict(_GATED_DELTANET),
    "qwen3_moe": dict(_QWEN_SWA, mlp_only_layers=[0], num_hidden_layers=3),  # 2 layers: the far context is lost
    "qwen3_next": dict(_GATED_DELTANET),
    "qwen4_exp": dict(text_config=dict(_GATED_DELTANET, **_QWEN4)),
    "qwen4_exp_text": dict(_GATED_DELTANET, **_QWEN4),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], num_hidden_layers=3, attention_window_size=WINDOW,
                            lru_width=64, num_key_value_heads=1),
    "reformer": dict(_DECODER, attn_layers=["local", "lsh"], local_attn_chunk_length=WINDOW,
                     lsh_attn_chunk_length=WINDOW, axial_pos_shape=[16, 32], axial_pos_embds_dim=[32, 32],
                     num_buckets=4, num_hashes=1, hash_seed=0),  # LSH hashing is random per call without a seed
    "rembert": dict(_DECODER, input_embedding_size=32, output_embedding_size=48),
    "roberta": _DECODER, "roberta-prelayernorm": _DECODER,
    "roc_bert": dict(_DECODER, pronunciation_vocab_size=32, shape_vocab_size=32, pronunciation_embed_dim=16,
                     shape_embed_dim=16),
    "roformer": dict(_DECODER, embedding_size=64),
    "rwkv": dict(attention_hidden_size=64),
    "smollm3": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW),  # NoPE layer slides
    "stablelm": dict(use_parallel_residual=True, qk_layernorm=True, use_qkv_bias=True),
    "starcoder2": dict(_SLIDE, initializer_range=0.3),  # all layers slide: a wider init to feel the far context
    "vaultgemma": dict(_SLIDE, query_pre_attn_scalar=16),
    # XLMWithLMHeadModel refuses is_encoder=False (causal=True is its CLM mode); its generate appends mask_token_id
    # and it derives padding from pad_index assuming right padding, so left-padded rows stay degenerate
    "xlm": dict(causal=True, mask_token_id=5, pad_index=PAD_ID),
    "xlm-roberta": _DECODER, "xlm-roberta-xl": _DECODER,
    # qk_dim_factor 1: the cache rounds qk_dim up to a multiple of 64, the layers do not
    "xlstm": dict(embedding_dim=64, num_blocks=2, qk_dim_factor=1.0, chunk_size=WINDOW),
    "xmod": dict(_DECODER, default_language="en_XX"),
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"], attention_hidden_size=128, attention_head_dim=32,
                  n_mamba_heads=2, mamba_dt_rank=8, use_mamba_kernels=False),
    # the shared-attention LoRA adapters are sized for K/V = Q width: no GQA with use_shared_attention_adapter
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], num_key_value_heads=4, n_mamba_heads=8, mamba_headdim=16,
                   mamba_ngroups=1, mamba_d_state=16, chunk_size=WINDOW, attention_hidden_size=128,
                   attention_head_dim=32, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
                   use_mamba_kernels=False),
    "zaya": dict(_SLIDE, num_experts_per_tok=1, layer_types=["hybrid_sliding", "hybrid"]),  # ZAYA: top-1 only
}
for _mla in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
             "longcat_flash", "minicpm3", "youtu", "dots3_note_text", "hy_v4", "kimi_linear", "bailing_hybrid"):
    # MLA: rotary runs on the qk_rope_head_dim slice, which these configs call head_dim; all KV heads = heads
    OVERRIDES.setdefault(_mla, {}).update(head_dim=8, num_key_value_heads=4)
OVERRIDES["dots3_note"]["text_config"].update(head_dim=8, num_key_value_heads=4)

# Linear / Conv1D weights re-drawn with this std after building: openai-gpt's own init leaves its Conv1D weights
# at std 0.02 whatever initializer_range says, too small for the prompt's start to change any token.
REINIT_STD: dict[str, float] = {"openai-gpt": 0.1}

SKIPS: dict[str, str] = {
    "musicgen": "AutoModelForCausalLM maps it to MusicgenForCausalLM, which needs a MusicgenDecoderConfig: "
                "from_config(MusicgenConfig) fails (AttributeError: no 'dropout') and "
                "from_config(MusicgenDecoderConfig) is refused (not in the mapping)",
    "musicgen_melody": "AutoModelForCausalLM maps it to MusicgenMelodyForCausalLM, which needs a "
                       "MusicgenMelodyDecoderConfig: from_config(MusicgenMelodyConfig) fails and the decoder config "
                       "is not in the mapping",
    "gemma4_assistant": "a multi-token-prediction drafter: its forward requires the target model's inputs_embeds "
                        "and shared_kv_states (it only runs as assistant_model of a Gemma 4 model)",
    "gemma4_unified_assistant": "a multi-token-prediction drafter: its forward requires the target model's "
                                "inputs_embeds and shared_kv_states (only runs as assistant_model)",
    "gemma3n": "its vision tower is a TimmWrapperModel: needs the timm and Pillow packages (not installed)",
}


# ---- building configs ------------------------------------------------------------------------------------------
def _fields(cls: type, base: dict) -> tuple[set[str], dict]:
    try:
        defaults = cls(**base)
    except Exception:
        return set(base) | set(getattr(cls, "__dataclass_fields__", {}) or {}), {}
    return set(defaults.to_dict()) | set(getattr(cls, "__dataclass_fields__", {}) or {}), defaults


def _compact_types(values: list) -> list:
    return list(dict.fromkeys(values))


def _shrink(cls: type, base: dict, extra: dict, generic: dict) -> dict:
    names, defaults = _fields(cls, base)
    out = dict(base)
    out.update({k: v for k, v in generic.items() if k in names})
    # one layer of each kind for mixed per-layer patterns, unless the override decides
    fields = getattr(cls, "__dataclass_fields__", {}) or {}
    lists = {}
    for key in ("layer_types", "mlp_layer_types"):
        value = getattr(defaults, key, None) if defaults else None
        if key in fields and isinstance(value, (list, tuple)) and len(set(map(str, value))) > 1:
            lists[key] = _compact_types(list(value))
    if lists and "layer_types" not in extra and "num_hidden_layers" not in extra:
        n = max(2, *(len(v) for v in lists.values()))
        for key, kinds in lists.items():
            if key not in extra:
                out[key] = [kinds[i % len(kinds)] for i in range(n)]
        out["num_hidden_layers"] = n
    # sub-configs: shrink them too (text towers with the generic sizes, other towers smaller)
    specs = getattr(cls, "sub_configs_defaults", None) or {}
    for key, spec in specs.items():
        if spec.optional and key not in extra:
            continue  # an optional tower (vision, audio) stays absent
        sub_cls = spec.config_class
        if not (isinstance(sub_cls, type) and hasattr(sub_cls, "__dataclass_fields__") and sub_cls.model_type):
            sub_cls = CONFIG_MAPPING[spec.model_type]
        sub_extra = extra.get(key, {}) if isinstance(extra.get(key), dict) else {}
        is_text = key in ("text_config", "decoder_config", "decoder", "text_encoder", "global_config")
        sub_generic = generic if is_text else {**generic, **_TOWER}
        out[key] = _shrink(sub_cls, dict(spec.init_kwargs), sub_extra, sub_generic)
        if spec.model_type and spec.config_class is not sub_cls:
            out[key]["model_type"] = spec.model_type
    for key, value in extra.items():
        if key in specs and isinstance(value, dict):
            continue
        if value is None and key in ("layer_types", "mlp_layer_types"):
            out.pop(key, None)  # let the config derive it from the other fields
            continue
        out[key] = value
    return out


def config_kwargs(model_type: str) -> dict:
    """The keyword arguments ``tiny_config`` builds the config from."""
    if model_type in SKIPS:
        raise Skip(SKIPS[model_type])
    cls = CONFIG_MAPPING[model_type]
    return _shrink(cls, {}, copy.deepcopy(OVERRIDES.get(model_type, {})), _GENERIC)


def tiny_config(model_type: str):
    """A tiny config of this architecture with its special features on; ``Skip`` when it cannot be built."""
    cls = CONFIG_MAPPING[model_type]
    return cls(**config_kwargs(model_type))


def build_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(tiny_config(model_type))`` in fp32, seeded, in eval mode."""
    config = tiny_config(model_type)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"{model_type}: the tiny config has {n} parameters (a zoo bug: shrink it)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type in REINIT_STD:
        from transformers.pytorch_utils import Conv1D

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, Conv1D)):
                    module.weight.normal_(0.0, REINIT_STD[model_type])
    return model.eval()


# ---- prompts ---------------------------------------------------------------------------------------------------
def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (22, 29, 35, 40)]


PROMPTS: list[list[int]] = _prompts()


def padded_batch(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of a list of token-id prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask
