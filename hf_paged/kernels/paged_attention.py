"""Paged attention over a ragged batch, PyTorch implementation (the CPU path and the Triton kernels' oracle).

A step's tokens are flattened into one row. The first ``num_decodes`` sequences have exactly one query
token each (decodes); they are handled together: their blocks are gathered with one index op per layer
and attended with one ``scaled_dot_product_attention`` call, the query heads that share a KV head folded
into the query-length axis (so GQA needs no repeat of K/V). The remaining sequences (prefill chunks)
are attended one by one against their cached prefix plus their own new tokens, causally.

Masks depend only on the step and on the layer's sliding window, so they are built once per step and
window and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .cache_ops import gather_blocks


@dataclass
class PagedAttentionMetadata:
    """Everything attention needs about one engine step, built once and shared by all layers.

    Token layout: sequence i owns query tokens ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``; after this step's
    write it has ``kv_lens[i]`` tokens in its blocks ``block_tables[i]``; its new tokens are the last
    ``q_len`` of those. Sequences ``0..num_decodes-1`` have one query token each.
    """

    slot_mapping: torch.Tensor  # [T] long: slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] long (padded with 0)
    kv_lens: torch.Tensor  # [S] int32/long
    cu_seqlens_q: torch.Tensor  # [S+1] long
    num_decodes: int
    kv_lens_list: list[int]
    q_lens_list: list[int]
    block_size: int
    pool: Any = field(default=None, repr=False)  # the BlockPool the attention layers read and write
    _masks: dict = field(default_factory=dict, repr=False)
    _decode_tables: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def decode_block_tables(self) -> tuple[torch.Tensor, int]:
        """Block tables of the decode sequences cut to the blocks their longest context needs."""
        if "t" not in self._decode_tables:
            d = self.num_decodes
            max_len = max(self.kv_lens_list[:d])
            nblocks = -(-max_len // self.block_size)
            self._decode_tables["t"] = (self.block_tables[:d, :nblocks].contiguous(), max_len)
        return self._decode_tables["t"]

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """``[D, 1, 1, L]`` bool: which gathered key slots each decode query may see."""
        key = ("d", sliding_window)
        if key not in self._masks:
            _, max_len = self.decode_block_tables()
            lens = self.kv_lens[: self.num_decodes].to(torch.long).unsqueeze(1)
            pos = torch.arange(max_len, device=lens.device).unsqueeze(0)
            mask = pos < lens
            if sliding_window:
                mask &= pos >= lens - sliding_window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, seq: int, sliding_window: int | None) -> torch.Tensor:
        """``[q_len, kv_len]`` bool causal (and windowed) mask of one prefill sequence."""
        key = ("p", seq, sliding_window)
        if key not in self._masks:
            q_len, kv_len = self.q_lens_list[seq], self.kv_lens_list[seq]
            q_pos = torch.arange(kv_len - q_len, kv_len, device=self.kv_lens.device).unsqueeze(1)
            k_pos = torch.arange(kv_len, device=self.kv_lens.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= k_pos > q_pos - sliding_window
            self._masks[key] = mask
        return self._masks[key]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            softcap: float | None) -> torch.Tensor:
    """q ``[B, KVH, M, D]``, k/v ``[B, KVH, L, D]``, bool mask broadcastable to ``[B, KVH, M, L]``."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    # Soft-capped scores are computed in fp32 whatever the input dtype (tanh of bf16 scores loses too much).
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """query ``[T, H, D]`` (the step's new tokens, K/V already written to the caches) -> ``[T, H, D]``."""
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(query)
    d = meta.num_decodes
    if d:
        tables, max_len = meta.decode_block_tables()
        k = gather_blocks(key_cache, tables, max_len).transpose(1, 2)  # [D, KVH, L, hd]
        v = gather_blocks(value_cache, tables, max_len).transpose(1, 2)
        q = query[:d].view(d, kv_heads, group, head_dim)
        out[:d] = _attend(q, k, v, meta.decode_mask(sliding_window), scale, softcap).reshape(d, num_heads, head_dim)
    cu = meta.cu_seqlens_q
    for seq in range(d, meta.num_seqs):
        start, q_len, kv_len = int(cu[seq]), meta.q_lens_list[seq], meta.kv_lens_list[seq]
        nblocks = -(-kv_len // meta.block_size)
        table = meta.block_tables[seq : seq + 1, :nblocks]
        k = gather_blocks(key_cache, table, kv_len)[0].transpose(0, 1)  # [KVH, L, hd]
        v = gather_blocks(value_cache, table, kv_len)[0].transpose(0, 1)
        # [q_len, KVH, g, hd] -> [KVH, g*q_len, hd]: the heads sharing a KV head become extra query rows.
        q = query[start : start + q_len].view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(kv_heads, group * q_len, head_dim)
        mask = meta.prefill_mask(seq, sliding_window).repeat(group, 1)
        o = _attend(q, k, v, mask, scale, softcap)  # [KVH, g*q_len, hd]
        out[start : start + q_len] = o.view(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(
            q_len, num_heads, head_dim)
    return out


def paged_attention_naive(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, kv_lens: list[int], cu_seqlens_q: list[int], scale: float,
                          sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The plainest possible statement of paged attention, token by token, in fp32: the test oracle."""
    bs = key_cache.shape[1]
    kv_heads = key_cache.shape[2]
    num_heads = query.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float32)
    for seq, kv_len in enumerate(kv_lens):
        start, end = cu_seqlens_q[seq], cu_seqlens_q[seq + 1]
        slots = [int(block_tables[seq, p // bs]) * bs + p % bs for p in range(kv_len)]
        k = key_cache.reshape(-1, kv_heads, key_cache.shape[-1])[slots].float()
        v = value_cache.reshape(-1, kv_heads, value_cache.shape[-1])[slots].float()
        for t in range(start, end):
            pos = kv_len - (end - t)
            for h in range(num_heads):
                kh = h // (num_heads // kv_heads)
                s = (k[: pos + 1, kh] @ query[t, h].float()) * scale
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                if sliding_window:
                    s[: max(0, pos + 1 - sliding_window)] = float("-inf")
                out[t, h] = torch.softmax(s, 0) @ v[: pos + 1, kh]
    return out
