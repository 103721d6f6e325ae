"""Writing new K/V into their slots and copying whole blocks (copy-on-write), PyTorch implementations.

Pool layout: ``kv[layer, 0|1, block, slot_in_block, kv_head, head_dim]``; a slot id is
``block * block_size + slot_in_block``. An int8 pool (``kv_cache_dtype="int8"``) also has
``kv_scales[layer, 0|1, block, kv_head, slot_in_block]`` (fp32): a stored row ``q`` stands for ``q * scale``.
:func:`quantize_int8` is the one definition of the rounding; the C and Triton writes compute the same bits.
"""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> (int8 ``[..., head_dim]``, fp32 scales ``[...]``), symmetric per vector:
    ``scale = max|x| / 127``, ``q = round_half_even(x / scale)`` (an all-zero vector: scale 0, q 0)."""
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    return torch.round(x / divisor).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 ``[..., head_dim]`` with fp32 scales ``[...]`` -> ``dtype`` (computed in fp32, rounded once)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, key_scales: torch.Tensor | None = None,
             value_scales: torch.Tensor | None = None) -> None:
    """Scatter ``key``/``value`` ``[tokens, kv_heads, head_dim (_v)]`` into the slots ``slot_mapping[tokens]``
    of one layer's caches ``[num_blocks, block_size, kv_heads, head_dim (_v)]``; int8 caches are written quantized,
    with their scales ``[num_blocks, kv_heads, block_size]``."""
    nb, bs, kvh, _ = key_cache.shape
    if key_scales is None:
        key_cache.flatten(0, 1).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
        value_cache.flatten(0, 1).index_copy_(0, slot_mapping, value.to(value_cache.dtype))
        return
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    for cache, scales, x in ((key_cache, key_scales, key), (value_cache, value_scales, value)):
        q, s = quantize_int8(x)
        cache.flatten(0, 1).index_copy_(0, slot_mapping, q)
        scales[blocks, :, offsets] = s


def copy_blocks(kv: torch.Tensor, pairs: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """For every (src, dst) row of ``pairs`` copy block src to block dst, in every layer, K and V (and their
    scales ``[layer, 0|1, block, ...]`` when given)."""
    kv[:, :, pairs[:, 1]] = kv[:, :, pairs[:, 0]]
    if scales is not None:
        scales[:, :, pairs[:, 1]] = scales[:, :, pairs[:, 0]]


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, length: int, scales: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[batch, length, kv_heads, head_dim]`` view of the first ``length`` slots of each block table
    row (``[batch, blocks]``). An int8 cache with its ``scales`` comes back dequantized to ``dtype``."""
    nb, bs, kvh, hd = cache.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))
    gathered = gathered.view(block_tables.shape[0], -1, kvh, hd)[:, :length]
    if scales is None:
        return gathered
    s = scales.index_select(0, block_tables.reshape(-1)).view(block_tables.shape[0], -1, kvh, bs)
    s = s.transpose(2, 3).reshape(block_tables.shape[0], -1, kvh)[:, :length]
    return dequantize_int8(gathered, s, dtype or torch.float32)
