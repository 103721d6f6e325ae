"""Which models hf_paged runs exactly, and the one reason why not for the others; see "Which models run on the engine"
in docs/architecture.md.

hf_paged keeps one key and one value vector per layer, token and KV head (keys of one width, values of one width, the
two may differ), read by causal attention (optionally windowed, chunked, soft-capped, with per-head attention sinks); a
model is admitted only where that is all its state and all its attention computes. :func:`cache_refusal` (what a
``PagedCache`` cannot hold) and :func:`engine_refusal` (that, and what the engine's attention does not compute) are
static checks of the model's classes, config and parameters; :func:`check_attention_call` refuses, at run time, a paged
attention call the kernels would not compute exactly. A layer attends with the window transformers masks its layer type
with (:func:`layer_windows`), whatever it passes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Per-layer kinds from transformers' ``layer_types`` that the engine runs, and what the others are.
PAGED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
_NO_KV_LAYER_TYPES = ("moe", "mlp", "dense", "sparse")  # layers without attention: nothing cached
_LAYER_TYPE_FEATURES = {
    "linear_attention": "recurrent state (state-space / linear-attention layers)",
    "mamba": "recurrent state (state-space / linear-attention layers)",
    "conv": "recurrent state (short-convolution layers)",
    "hybrid": "recurrent state (hybrid attention + state-space layers)",
    "hybrid_sliding": "recurrent state (hybrid attention + state-space layers)",
    "indexed_attention": "sparse attention (keys chosen by an indexer)",
    "compressed_sparse_attention": "compressed sparse attention",
    "heavily_compressed_attention": "compressed attention",
    "minimax_m3_sparse": "sparse attention (keys chosen by an indexer)",
    "window_attention": "non-overlapping window attention",
    "reference_sliding_attention": "sliding attention over generated tokens only",
}
# Layer types a PagedCache holds: it returns the whole K/V and HF's own mask does the rest.
_CACHE_LAYER_TYPES = PAGED_LAYER_TYPES
# Layer types whose state the engine keeps per sequence when their mixers use the Cache's state API
# (:func:`recurrent_mixers`); the hybrid ones also have K/V.
_RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
_RECURRENT_ONLY_LAYER_TYPES = ("linear_attention", "conv")

# Attention-call arguments: handled by the paged kernels, or neutral when None / False / 0.
_HANDLED_ARGS = {"sliding_window", "softcap", "paged_metadata"}
SINK_ARGS = ("s_aux", "sinks")  # per-query-head logits added to the softmax's denominator
_NEUTRAL_ARGS = {"dropout", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                 "output_attentions", "use_cache", "cache_position", "attention_mask", "head_mask", "layer_idx",
                 "position_embeddings", "past_key_values", "past_key_value", "deterministic"}
_ARG_FEATURES = {"position_bias": "relative position bias",
                 "indices": "sparse attention (keys chosen by an indexer)",
                 "block_indices": "sparse attention (keys chosen by an indexer)"}


class UnsupportedModel(ValueError):
    """The model holds state or computes attention that hf_paged's engine (or ``PagedCache``) does not reproduce;
    ``feature`` names it."""

    def __init__(self, feature: str, phase: str | None = None) -> None:
        super().__init__(f"model: hf_paged cannot run this model exactly ({feature}); use HF generate")
        self.feature = feature
        self.phase = phase  # the engine probe's step that found it, if any


def text_config(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's kind, as transformers' caches see it (``layer_types``, else inferred from the window
    and chunk fields), legacy names mapped to current ones."""
    types = getattr(config, "layer_types", None)
    layers = getattr(config, "num_hidden_layers", None) or 0
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * layers
        else:
            types = ["full_attention"] * layers
    legacy = {"attention": "full_attention", "mamba": "linear_attention"}
    return [legacy.get(t, t) for t in types]


class ChunkedWindow(int):
    """A chunked-attention layer's entry in :func:`layer_windows`: the chunk size C (position p attends to keys
    ``p // C * C .. p``). As a window it bounds what the layer reads (every key it attends to is among the last C), so
    the block bookkeeping treats it as a sliding window of C; the attention kernels take it as a chunk."""

    def __repr__(self) -> str:
        return f"ChunkedWindow({int(self)})"


def layer_windows(model: torch.nn.Module) -> dict[int, int | None]:
    """The sliding window each K/V layer attends with (None: the whole prefix; a :class:`ChunkedWindow` for chunked
    attention): the one transformers' masks apply to its layer type, which is what HF's attention computes whatever
    the layer passes to the attention function."""
    config = text_config(model)
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    kinds = {"sliding_attention": window, "hybrid_sliding": window,
             "chunked_attention": ChunkedWindow(chunk) if chunk else None}
    return {i: kinds.get(t) for i, t in enumerate(layer_types(config))
            if t not in _NO_KV_LAYER_TYPES + _RECURRENT_ONLY_LAYER_TYPES}


def split_window(window: int | None) -> tuple[int | None, int | None]:
    """(sliding window, chunk size) of a :func:`layer_windows` entry."""
    return (None, int(window)) if isinstance(window, ChunkedWindow) else (window, None)


_keeps_cache_state: dict[type, bool] = {}


def recurrent_mixers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The decoder's modules that keep a per-sequence state through transformers' linear-attention Cache API
    (``update_conv_state`` / ``update_recurrent_state``: Mamba, Mamba-2, gated DeltaNet, short convolutions), by
    layer index. Each is called as ``forward(hidden_states, <cache>, attention_mask, **kwargs)``, the cache being
    its ``cache_params`` or ``past_key_values`` argument (:func:`mixer_cache_argument`)."""
    found = {}
    for module in _decoder_layers(model).modules():
        cls = type(module)
        if cls not in _keeps_cache_state:
            sources = []
            for c in cls.__mro__:
                if c.__module__.startswith("torch."):
                    break
                try:
                    sources.append(inspect.getsource(c))
                except (OSError, TypeError):
                    pass
            _keeps_cache_state[cls] = any(call in src for src in sources
                                          for call in ("update_conv_state(", "update_recurrent_state("))
        if _keeps_cache_state[cls] and isinstance(getattr(module, "layer_idx", None), int) \
                and mixer_cache_argument(module) is not None:
            found[module.layer_idx] = module
    return found


def mixer_cache_argument(module: torch.nn.Module) -> str | None:
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache_params", "past_key_values") if name in parameters), None)



def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, key head_dim) of a model config as the attention calls see it (MLA: the keys
    expanded per query head); raises where the config gives no single answer (a head dim per layer type, say)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(config, "num_attention_heads", None):  # no attention at all (a state-space model): no K/V
        return config.num_hidden_layers, 1, 1
    heads = config.num_attention_heads
    kv_heads = 1 if getattr(config, "multi_query", False) else (getattr(config, "num_key_value_heads", None) or heads)
    if getattr(config, "kv_lora_rank", None) is not None:  # MLA: K/V expanded from the latent, one per query head
        kv_heads = heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "qk_nope_head_dim", None) is not None:
        head_dim = config.qk_nope_head_dim + (getattr(config, "qk_rope_head_dim", None) or 0)
    return config.num_hidden_layers, kv_heads, getattr(config, "qk_head_dim", None) or head_dim


def value_head_dim(config: Any) -> int:
    """The width of a model's value vectors (``v_head_dim`` where the config has one, else the keys')."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(config, "v_head_dim", None) or kv_geometry(config)[2]


def cache_layer_windows(model: torch.nn.Module) -> list[int | None]:
    """Per layer, the window transformers' own ``DynamicCache`` keeps for it (sliding and chunked layers; None: the
    whole history), so that a ``PagedCache`` returns what a ``DynamicCache`` would."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    try:
        _, per_layer = get_layer_types_and_kwargs(text_config(model))
    except Exception:  # configs without layer information: every layer keeps its whole history
        return []
    return [kwargs.get("sliding_window") for kwargs in per_layer]


def _state_refusal(model: torch.nn.Module, allowed: tuple[str, ...], recurrent: bool = False) -> str | None:
    """The first thing the model keeps that is not per-token K/V of one shape (or a layer kind not in ``allowed``;
    with ``recurrent``, layers whose state its mixers keep through the Cache API are allowed too)."""
    config = text_config(model)
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    mixers = recurrent_mixers(model) if recurrent else {}
    kinds = layer_types(config)
    for i, kind in enumerate(kinds):
        if kind in _RECURRENT_LAYER_TYPES and i in mixers:
            continue
        if kind not in allowed and kind not in _NO_KV_LAYER_TYPES:
            return _LAYER_TYPE_FEATURES.get(kind, f"layers of type {kind!r}")
    if getattr(model, "_is_stateful", False) and not (mixers and any(k in _RECURRENT_LAYER_TYPES for k in kinds)):
        return f"recurrent state ({type(model).__name__} keeps state other than K/V)"
    if not getattr(config, "num_hidden_layers", None) or not (
            getattr(config, "num_attention_heads", None) or len(mixers) == config.num_hidden_layers):
        return "no attention layers"
    try:
        kv_geometry(config)
    except Exception as exc:  # e.g. a head dim that differs between layer types
        return f"K/V shapes that differ between layers ({type(exc).__name__})"
    heads = {m.k_proj.out_features // m.head_dim for m in model.modules()
             if getattr(m, "layer_idx", None) is not None and isinstance(getattr(m, "k_proj", None), torch.nn.Linear)
             and isinstance(getattr(m, "head_dim", None), int)}
    if len(heads) > 1:  # e.g. MiMo-V2-Flash: twice the KV heads in its sliding layers
        return f"K/V head counts that differ between layers ({sorted(heads)})"
    return None


def cache_refusal(model: torch.nn.Module) -> str | None:
    """Why a ``PagedCache`` cannot hold this model's state (None: it can). Its exactness rests on the attention
    reading the K/V the cache returns through transformers' AttentionInterface, as every sdpa / eager model does."""
    refusal = _state_refusal(model, _CACHE_LAYER_TYPES)
    if refusal is not None:
        return refusal
    supports_cache = getattr(model, "_supports_default_dynamic_cache", lambda: True)
    if not supports_cache() or "past_key_values" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__} does not keep its K/V in a transformers Cache"
    return _uses_attention_interface(model)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.Module:
    """The modules text generation runs: the decoder's layers where the model says which they are (a multimodal
    model's vision or audio towers never run on input ids alone), else the whole model."""
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except Exception:
        layers = None
    return layers if isinstance(layers, torch.nn.ModuleList) else model


def _uses_attention_interface(model: torch.nn.Module, engine: bool = False) -> str | None:
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return f"{type(model).__name__} does not use transformers' AttentionInterface"
    own = _attention_class_without_interface(_decoder_layers(model), engine)
    if own is not None:
        return f"its {own} modules do not use transformers' AttentionInterface"
    return None


_routes_through_interface: dict[type, bool] = {}


def _attention_class_without_interface(model: torch.nn.Module, engine: bool) -> str | None:
    """The name of an ``*Attention*`` module class of ``model`` whose ``forward`` does not look up the
    AttentionInterface, or None. transformers' own check is cached on the model class, so a ``trust_remote_code``
    subclass of a Llama model that swaps in its own attention would inherit a pass. For the engine, recurrent mixers
    and decoder-layer classes (``JambaAttentionDecoderLayer``) are not attention: its probe and per-layer check see
    what they compute; a ``PagedCache`` has no such check."""
    mixers = {type(m) for m in recurrent_mixers(model).values()} if engine else set()
    for module in model.modules():
        cls = type(module)
        if "Attention" not in cls.__name__ or cls in mixers or (engine and cls.__name__.endswith("DecoderLayer")):
            continue
        if cls not in _routes_through_interface:
            forward = next((c.__dict__["forward"] for c in cls.__mro__ if "forward" in c.__dict__), None)
            try:
                _routes_through_interface[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
            except (OSError, TypeError):
                _routes_through_interface[cls] = False
        if not _routes_through_interface[cls]:
            return cls.__name__
    return None


def temperature_tuned(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a NoPE attention layer that scales its queries by their positions (Llama 4's temperature
    tuning), computing the positions from its cache's length rather than from ``position_ids``."""
    return bool(getattr(module, "attn_temperature_tuning", False)) and not getattr(module, "use_rope", True) \
        and hasattr(module, "floor_scale") and hasattr(module, "attn_scale")


def _attention_feature(model: torch.nn.Module) -> str | None:
    """An attention feature of the model's modules that the paged kernels do not compute."""
    for module in model.modules():
        if getattr(module, "layer_idx", None) is not None and getattr(module, "is_causal", True) is False \
                and "Attention" in type(module).__name__:
            return "non-causal attention"
    return None


def engine_refusal(model: torch.nn.Module) -> str | None:
    """Why the engine cannot run this model exactly (None: admitted; the engine's probe step may still refuse it)."""
    return (_uses_attention_interface(model, engine=True)
            or _state_refusal(model, PAGED_LAYER_TYPES, recurrent=True)
            or _attention_feature(model))


def check_attention_call(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         kv_cache: Any, kwargs: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedModel` unless this attention call is one the paged kernels compute exactly: every
    argument handled or neutral, sinks one logit per query head, K/V of the KV cache's shape (the window:
    :func:`attention_window`)."""
    for name, value_ in kwargs.items():
        if name in _HANDLED_ARGS or name in _NEUTRAL_ARGS or value_ is None or value_ is False:
            continue
        if name in SINK_ARGS and isinstance(value_, torch.Tensor) and value_.shape == query.shape[1:2]:
            continue
        if name == "is_causal" and value_ is True:
            continue
        if name == "is_causal":
            raise UnsupportedModel("non-causal attention")
        raise UnsupportedModel(_ARG_FEATURES.get(name, f"attention argument {name!r}"))
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int) or layer not in kv_cache.rows:
        raise UnsupportedModel(f"an attention module without a valid layer_idx ({type(module).__name__})")
    if (key.shape[1], key.shape[-1], value.shape[1], value.shape[-1]) != (
            kv_cache.num_kv_heads, kv_cache.head_dim, kv_cache.num_kv_heads, kv_cache.head_dim_v):
        raise UnsupportedModel(f"layer {layer} has K of {key.shape[1]} heads x {key.shape[-1]} and V of "
                               f"{value.shape[1]} x {value.shape[-1]}, not the {kv_cache.num_kv_heads} x "
                               f"{kv_cache.head_dim} / {kv_cache.head_dim_v} of the KV cache")


def attention_window(windows: dict[int, int | None] | None, layer: int, passed: int | None) -> int | None:
    """The window ``layer`` attends with: its layer type's (``windows``, see :func:`layer_windows`; None there: the
    one the call ``passed``). A call passing another window than its layer type's is refused."""
    if windows is None:
        return passed or None
    expected = windows.get(layer)
    if passed and passed != expected:
        raise UnsupportedModel(f"layer {layer} attends with window {passed!r}, its config says {expected!r}")
    return expected
