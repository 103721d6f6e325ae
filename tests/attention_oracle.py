"""The test oracle of paged attention: token by token, in fp32, the plainest possible statement of it."""

from __future__ import annotations

import torch


def paged_attention_naive(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, kv_lens: list[int], cu_seqlens_q: list[int], scale: float,
                          sliding_window: int | None = None, softcap: float | None = None,
                          sinks: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """The plainest possible statement of paged attention, token by token, in fp32: the test oracle. ``sinks``: one
    logit per query head, appended to the scores and dropped after the softmax; ``chunk``: position p sees keys
    ``p // chunk * chunk .. p``; the output has the values' width."""
    bs = key_cache.shape[1]
    kv_heads = key_cache.shape[2]
    num_heads = query.shape[1]
    out = torch.zeros(*query.shape[:2], value_cache.shape[-1], dtype=torch.float32)
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
                if chunk:
                    s[: pos // chunk * chunk] = float("-inf")
                if sinks is not None:
                    s = torch.cat([s, sinks[h : h + 1].float()])
                out[t, h] = torch.softmax(s, 0)[: pos + 1] @ v[: pos + 1, kh]
    return out
