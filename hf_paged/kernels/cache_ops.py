"""Writing new K/V into their slots and copying whole blocks (copy-on-write), PyTorch implementations.

Pool layout: ``kv[layer, 0|1, block, slot_in_block, kv_head, head_dim]``; a slot id is
``block * block_size + slot_in_block``.
"""

from __future__ import annotations

import torch


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` ``[tokens, kv_heads, head_dim]`` into the slots ``slot_mapping[tokens]``
    of one layer's caches ``[num_blocks, block_size, kv_heads, head_dim]``."""
    nb, bs, kvh, hd = key_cache.shape
    key_cache.view(nb * bs, kvh, hd).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(nb * bs, kvh, hd).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def copy_blocks(kv: torch.Tensor, pairs: torch.Tensor) -> None:
    """For every (src, dst) row of ``pairs`` copy block src to block dst, in every layer, K and V."""
    kv[:, :, pairs[:, 1]] = kv[:, :, pairs[:, 0]]


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Dense ``[batch, length, kv_heads, head_dim]`` view of the first ``length`` slots of each block table
    row (``[batch, blocks]``)."""
    nb, bs, kvh, hd = cache.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))
    return gathered.view(block_tables.shape[0], -1, kvh, hd)[:, :length]
