"""The ``hf_paged`` attention implementation, registered with transformers' AttentionInterface.

Paging is a property of the call, not of the model: an engine selects ``hf_paged`` on the model's configs only
for the length of its own forwards (:func:`paged_attention_selected`), and the function attends over the block
pool only when the forward carries ``paged_metadata`` (the engine's ragged step). Every other call — a plain
``model(...)``, HF ``generate`` with a ``DynamicCache`` or with a ``PagedCache`` (whose ``update``
already returns the K/V read from the blocks) — is handed, unchanged, to the implementation the model
used before (``sdpa`` unless it was set otherwise), and the mask function registered beside it does the
same. So a model set to ``hf_paged`` computes exactly what it computed before.

The name has no ``paged|`` prefix: transformers strips that prefix on lookup.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels.dispatch import paged_attention, write_kv
from ...admission import SINK_ARGS, attention_window, check_attention_call, engine_refusal, split_window
from ..kernels.paged_attention import PagedAttentionMetadata, running_step

ATTN_IMPLEMENTATION = "hf_paged"
_base_impl_by_config: dict[int, str] = {}
_lock = threading.Lock()


def _base_implementation(config: Any) -> str:
    return _base_impl_by_config.get(id(config), "sdpa")


def _base_attention_fn(module: torch.nn.Module):
    name = _base_implementation(module.config)
    if name == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[name]


class EngineDisabled:
    """A module flag that reads False in an engine forward running in this thread and as it was anywhere else: the
    runner puts it in place of a flag whose work the paged attention does itself (NoPE temperature tuning, which HF
    computes from its cache's length, from the step's own positions), only for the length of its forwards."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __bool__(self) -> bool:
        return running_step() is None and bool(self.value)


def _temperature_tuned(module: torch.nn.Module, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's NoPE query scaling (``Llama4TextAttention.forward``) at the step's positions: the same products."""
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0
    return (query * scales.view(1, 1, -1, 1)).to(query.dtype)


def paged_attention_layer(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: PagedAttentionMetadata,
                          layer: int, scale: float, sliding_window: int | None, softcap: float | None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's paged attention: write the step's new K/V (``[1, KVH, T, hd]``, ``[1, KVH, T, hd_v]``) into the KV
    cache, attend the queries ``[1, H, T, hd]`` over the blocks -> ``[1, T, H, hd_v]``; ``sinks``: ``[H]`` logits.

    A custom op so that a compiled forward keeps it whole (one opaque call per layer, the metadata an opaque
    graph input). The KV cache is written through ``meta`` (hidden from the compiler on purpose: nothing in
    the graph reads it, and the data dependency between layers keeps the calls in order)."""
    kv = meta.kv_cache
    meta.mark_layer(layer)
    sliding_window, chunk = split_window(attention_window(meta.layer_windows, layer, sliding_window))
    key_cache, value_cache = kv.key_cache(layer), kv.value_cache(layer)
    key_scales, value_scales = kv.key_scales(layer), kv.value_scales(layer)  # None unless int8
    # HF hands q/k/v as [1, heads, T, head_dim]; the kernels use [T, heads, head_dim].
    write_kv(key_cache, value_cache, key[0].transpose(0, 1), value[0].transpose(0, 1), meta.slot_mapping, meta.plan,
             key_scales=key_scales, value_scales=value_scales)
    out = paged_attention(query[0].transpose(0, 1), key_cache, value_cache, meta, scale,
                          sliding_window=sliding_window, softcap=softcap, key_scales=key_scales,
                          value_scales=value_scales, sinks=None if sinks is None else sinks.float(), chunk=chunk)
    return out.unsqueeze(0)


paged_attention_op = torch.library.custom_op("hf_paged::paged_attention", paged_attention_layer, mutates_args=())


@paged_attention_op.register_fake
def _(query, key, value, meta, layer, scale, sliding_window, softcap, sinks=None):
    return query.new_empty(1, query.shape[2], query.shape[1], value.shape[3])


def hf_paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any):
    meta = kwargs.get("paged_metadata")
    if meta is None:  # a layer that does not pass its keyword arguments on: the step is this thread's forward's
        meta = running_step()
    if meta is None:
        return _base_attention_fn(module)(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if not torch.compiler.is_compiling():
        check_attention_call(module, query, key, value, meta.kv_cache, kwargs)
    flag = module.__dict__.get("attn_temperature_tuning")
    if isinstance(flag, EngineDisabled) and flag.value:
        query = _temperature_tuned(module, query, meta.positions)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sinks = kwargs.get(SINK_ARGS[0], kwargs.get(SINK_ARGS[1]))
    args = (query, key, value, meta, module.layer_idx, float(scale), kwargs.get("sliding_window"),
            kwargs.get("softcap"), sinks)
    # Eager calls skip the custom-op dispatcher (tens of microseconds a layer); compiled graphs need the op.
    fn = paged_attention_op if torch.compiler.is_compiling() else paged_attention_layer
    return fn(*args), None


def hf_paged_mask(*args: Any, config: Any = None, **kwargs: Any):
    return ALL_MASK_ATTENTION_FUNCTIONS[_base_implementation(config)](*args, config=config, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, hf_paged_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hf_paged_mask)


def supports_paged_attention(model: PreTrainedModel) -> tuple[bool, str]:
    """Whether the engine can run this model exactly (see ``hf_paged.admission``), and why not."""
    reason = engine_refusal(model)
    return reason is None, reason or ""


def attention_configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config object the model's modules read their attention implementation from (sub-configs
    included)."""
    found: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


def _base_name(current: str | None) -> str:
    return current if current in ("eager", "sdpa") or current in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"


@contextmanager
def paged_attention_selected(configs: list[Any]) -> Iterator[None]:
    """For the length of an engine forward, ``configs`` select ``hf_paged``; plain calls that other threads make
    meanwhile are handed to the implementation each config had. Restored on exit."""
    previous = [config._attn_implementation_internal for config in configs]
    for config, current in zip(configs, previous):
        if current != ATTN_IMPLEMENTATION:
            _base_impl_by_config[id(config)] = _base_name(current)
        config._attn_implementation_internal = ATTN_IMPLEMENTATION
    try:
        yield
    finally:
        for config, current in zip(configs, previous):
            config._attn_implementation_internal = current


def enable_paged_attention(model: PreTrainedModel) -> None:
    """Select ``hf_paged`` for this model for good (engines do not need this: they select it per forward),
    remembering the implementation it delegates plain calls to."""
    with _lock:
        current = model.config._attn_implementation
        if current == ATTN_IMPLEMENTATION:
            return
        base = _base_name(current)
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None:
                _base_impl_by_config[id(config)] = base
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def disable_paged_attention(model: PreTrainedModel) -> None:
    """Give the model back the attention implementation it had before ``enable_paged_attention``."""
    with _lock:
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            return
        model.set_attn_implementation(_base_implementation(model.config))
