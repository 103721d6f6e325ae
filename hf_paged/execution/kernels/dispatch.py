"""The one dispatch point for the hot-path kernels ``write_kv``, ``copy_blocks`` and ``paged_attention``, with the
PyTorch signatures (``cache_ops`` / ``paged_attention``); see "Kernels" in docs/architecture.md.

The caller's :class:`~hf_paged.execution.plan.ExecutionPlan` decides (in the attention metadata for ``paged_attention``;
kernels never build one, outside an engine: ``plan.default_plan``): Triton for CUDA tensors, or CPU ones under
``HF_PAGED_FORCE_TRITON=1`` with ``TRITON_INTERPRET=1`` (how the kernels are tested); else PyTorch, with the C kernels
of ``cpu_decode_attention`` where they apply. Int8 caches travel with their scales. triton is imported on the first
Triton call, so importing ``hf_paged`` never needs it; on a GPU without triton PyTorch runs (one warning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import cache_ops as _torch_cache_ops
from . import cpu_decode_attention as _cpu_kernel
from . import paged_attention as _torch_attention
from .paged_attention import PagedAttentionMetadata

if TYPE_CHECKING:
    from ..plan import ExecutionPlan

__all__ = ["write_kv", "copy_blocks", "paged_attention", "use_triton"]

def use_triton(plan: "ExecutionPlan") -> bool:
    """Whether the plan's operations take the Triton path."""
    return plan.triton


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, plan: "ExecutionPlan", *, key_scales: torch.Tensor | None = None,
             value_scales: torch.Tensor | None = None) -> None:
    """Scatter ``key``/``value`` ``[tokens, kv_heads, head_dim]`` into the slots ``slot_mapping[tokens]``
    of one layer's caches ``[num_blocks, block_size, kv_heads, head_dim]`` (int8 caches: quantized, with their
    scales ``[num_blocks, kv_heads, block_size]``)."""
    way = plan.cache_write
    if way == "triton":
        from .triton_cache_ops import write_kv_triton

        write_kv_triton(key_cache, value_cache, key, value, slot_mapping, key_scales, value_scales)
    elif not (way == "c" and _cpu_kernel.write_kv_cpu(key_cache, value_cache, key, value, slot_mapping, key_scales,
                                                      value_scales)):
        _torch_cache_ops.write_kv(key_cache, value_cache, key, value, slot_mapping, key_scales, value_scales)


def copy_blocks(kv: torch.Tensor, pairs: torch.Tensor, plan: "ExecutionPlan", *,
                scales: torch.Tensor | None = None) -> None:
    """For every (src, dst) row of ``pairs`` copy block src to block dst, in every layer, K and V (and the int8
    pool's ``scales``)."""
    if plan.triton:
        from .triton_cache_ops import copy_blocks_triton

        copy_blocks_triton(kv, pairs)
        if scales is not None:
            copy_blocks_triton(scales.unsqueeze(-1), pairs)  # [layer, 0|1, block, KVH, slot, 1]
    else:
        _torch_cache_ops.copy_blocks(kv, pairs, scales)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None, *, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """query ``[T, H, D]`` (the step's new tokens, K/V already written to the caches) -> ``[T, H, Dv]``; ``sinks``
    ``[H]`` fp32 attention-sink logits, ``chunk`` a chunked-attention chunk size."""
    if meta.plan.triton:
        from .triton_paged_attention import paged_attention_triton

        return paged_attention_triton(query, key_cache, value_cache, meta, scale, sliding_window, softcap,
                                      key_scales=key_scales, value_scales=value_scales, sinks=sinks, chunk=chunk)
    return _torch_attention.paged_attention(query, key_cache, value_cache, meta, scale, sliding_window, softcap,
                                            key_scales, value_scales, sinks, chunk)
