"""Paged attention over a ragged batch, PyTorch implementation (the CPU path and the Triton kernels' oracle), and the
step metadata every path reads; see "Kernels" in docs/architecture.md.

The first ``num_decodes`` sequences have one query token each: their blocks are gathered with one index op per layer and
attended in one SDPA call, the query heads sharing a KV head folded into the query axis (no K/V repeat for GQA). The
other sequences (prefill chunks) attend one by one to their cached prefix and, causally, their new tokens. Where the
plan has the C kernels, decodes take ``cpu_decode_attention`` and all prefill chunks one ``cpu_prefill_attention`` call
(no window, chunking or soft-capping). Int8 caches are dequantized as gathered. Masks are built once per step and
window. Optional per layer: a chunk size C (a token at position p sees keys ``p // C * C .. p``), attention sinks (one
logit per query head that joins the softmax's denominator and weighs no value) and values of another width than the
keys (the output has the values' width).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ...admission import UnsupportedModel
from . import cpu_decode_attention as _cpu_kernel
from . import cpu_prefill_attention as _cpu_prefill
from .cache_ops import gather_blocks

try:  # torch's opaque reference types (private API): let compiled graphs take the metadata as an input
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase

    OPAQUE_METADATA = True
except ImportError:  # an older torch: eager engines work the same; compile=True is refused by the engine
    OpaqueBase, OPAQUE_METADATA = object, False

    def register_opaque_type(cls, typ):
        return None


@dataclass(eq=False)
class PagedAttentionMetadata(OpaqueBase):
    """Everything attention needs about one engine step, built once and shared by all layers. A torch opaque reference
    type: a compiled forward takes it as a graph input and hands it, untouched, to the ``hf_paged::paged_attention`` op,
    so one graph serves every step.

    Sequence i owns query tokens ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``; after this step's write it has ``kv_lens[i]``
    tokens in its blocks ``block_tables[i]``, the new ones last. Sequences ``0..num_decodes-1`` are decodes (one token).
    """

    slot_mapping: torch.Tensor  # [T] long: slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] long (padded with the pool's null block)
    kv_lens: torch.Tensor  # [S] int32/long
    cu_seqlens_q: torch.Tensor  # [S+1] long
    num_decodes: int
    kv_lens_list: list[int]
    q_lens_list: list[int]
    block_size: int
    kv_cache: Any = field(default=None, repr=False)  # the KVCache the attention layers read and write
    plan: Any = field(default=None, repr=False)  # the ExecutionPlan whose kernels run (required)
    # A bound on the decode lengths the Triton decode kernel sizes its split-K from instead of ``max(kv_lens_list)``:
    # a CUDA graph's metadata (cuda_graphs.py), whose host lists are not the step's.
    max_decode_len: int | None = None
    positions: torch.Tensor | None = None  # [T] long: each new token's position (NoPE temperature tuning reads it)
    # The layers expected to run paged attention, with the window each must use (None: unchecked), and how many
    # times each did in this forward (see ``mark_layer`` / ``check_layer_calls``).
    layer_windows: dict[int, int | None] | None = field(default=None, repr=False)
    layer_calls: list[int] = field(default_factory=list, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)
    _decode_tables: dict = field(default_factory=dict, repr=False)
    # The one-call decoder layers' per-step C arguments (patches/fused_layers.py), built by the first layer.
    c_step: Any = field(default=None, repr=False)

    def __reduce__(self):
        # Inductor pickles a compiled graph's inputs into its cache key; one step's tensors (and the whole KV cache
        # behind ``pool``) must not go there. The metadata is never persisted, so it pickles to a fresh, empty one.
        return _empty_metadata, ()

    def mark_layer(self, layer: int) -> None:
        """Record that ``layer`` ran paged attention in this forward."""
        calls = self.layer_calls
        if len(calls) <= layer:
            calls.extend([0] * (layer + 1 - len(calls)))
        calls[layer] += 1

    def check_layer_calls(self) -> None:
        """After a forward: every expected layer ran paged attention exactly once and no other did; else raise
        ``UnsupportedModel`` (a layer computed attention some other way)."""
        if self.layer_windows is None:
            return
        calls = self.layer_calls + [0] * max(0, self.kv_cache.num_layers - len(self.layer_calls))
        wrong = [i for i, n in enumerate(calls) if n != (1 if i in self.layer_windows else 0)]
        if wrong:
            detail = ", ".join(f"layer {i}: {calls[i]}x" for i in wrong[:4])
            raise UnsupportedModel(f"attention that does not run through hf_paged's paged attention ({detail})")

    @property
    def num_seqs(self) -> int:
        return len(self.kv_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def decode_groups(self) -> list[tuple[torch.Tensor | None, torch.Tensor, int]]:
        """The decode sequences in groups of similar context length, so that gathering each group's blocks
        pads little: ``(row indices or None for all, block tables [G, blocks], max length)`` per group."""
        if "g" not in self._decode_tables:
            d = self.num_decodes
            if d == 0:
                return []
            lens = self.kv_lens_list[:d]
            order = sorted(range(d), key=lens.__getitem__)
            groups: list[list[int]] = [[]]
            for i in order:
                group = groups[-1]
                # A new group when padding this group to the new length would waste over a third.
                if len(group) >= 8 and lens[i] * len(group) > 1.5 * sum(lens[j] for j in group) and len(groups) < 4:
                    groups.append([i])
                else:
                    group.append(i)
            out = []
            for group in groups:
                max_len = max(lens[i] for i in group)
                nblocks = -(-max_len // self.block_size)
                if len(groups) == 1:
                    out.append((None, self.block_tables[:d, :nblocks].contiguous(), max_len))
                else:
                    idx = torch.tensor(group, device=self.block_tables.device)
                    out.append((idx, self.block_tables[idx, :nblocks], max_len))
            self._decode_tables["g"] = out
        return self._decode_tables["g"]

    def cpu_decode_plan(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float,
                        sliding_window: int | None, softcap: float | None, key_scales: torch.Tensor | None = None,
                        value_scales: torch.Tensor | None = None,
                        chunk: int | None = None) -> "_cpu_kernel.DecodePlan | None":
        """The C decode kernel's call for this step's decodes (built by the first layer, reused by the others);
        None where the kernel does not apply."""
        if not self.plan.cpu_kernels:
            return None
        key = ("cpu", query.dtype, key_cache.dtype, scale, sliding_window, softcap, chunk, value_cache.shape[-1])
        if key not in self._decode_tables:
            d = self.num_decodes
            self._decode_tables[key] = _cpu_kernel.DecodePlan.for_step(
                query[:d], key_cache, value_cache, self.block_tables[:d], self.kv_lens[:d], scale, sliding_window,
                softcap, key_scales, value_scales, chunk)
        return self._decode_tables[key]

    def cpu_prefill_plan(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         scale: float, sliding_window: int | None, softcap: float | None,
                         key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                         chunk: int | None = None) -> "_cpu_prefill.PrefillPlan | None":
        """The C prefill kernel's call for this step's prefill sequences (built by the first layer, reused by the
        others); None where the kernel does not apply."""
        if sliding_window or softcap or chunk or self.num_decodes == self.num_seqs:
            return None
        if not self.plan.cpu_kernels:
            return None
        key = ("cpu-prefill", query.dtype, key_cache.dtype, scale, value_cache.shape[-1])
        if key not in self._decode_tables:
            d, cu = self.num_decodes, self.cu_seqlens_q.tolist()
            self._decode_tables[key] = _cpu_prefill.PrefillPlan.for_step(
                query, key_cache, value_cache, self.block_tables[d:], cu[d:-1], self.q_lens_list[d:],
                self.kv_lens_list[d:], scale, key_scales, value_scales)
        return self._decode_tables[key]

    def decode_mask(self, group: int, sliding_window: int | None, chunk: int | None = None) -> torch.Tensor:
        """``[G, 1, 1, L]`` additive fp32 mask (0 or -inf) of the gathered key slots of one decode group."""
        key = ("d", group, sliding_window, chunk)
        if key not in self._masks:
            idx, _, max_len = self.decode_groups()[group]
            lens = self.kv_lens[: self.num_decodes].to(torch.long)
            lens = (lens if idx is None else lens[idx]).unsqueeze(1)
            pos = torch.arange(max_len, device=lens.device).unsqueeze(0)
            visible = pos < lens
            if sliding_window:
                visible &= pos >= lens - sliding_window
            if chunk:
                visible &= pos >= (lens - 1) // chunk * chunk
            mask = torch.zeros(visible.shape, dtype=torch.float32, device=lens.device)
            self._masks[key] = mask.masked_fill_(~visible, float("-inf"))[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, seq: int, sliding_window: int | None, chunk: int | None = None) -> torch.Tensor:
        """``[q_len, kv_len]`` bool causal (and windowed or chunked) mask of one prefill sequence."""
        key = ("p", seq, sliding_window, chunk)
        if key not in self._masks:
            q_len, kv_len = self.q_lens_list[seq], self.kv_lens_list[seq]
            q_pos = torch.arange(kv_len - q_len, kv_len, device=self.kv_lens.device).unsqueeze(1)
            k_pos = torch.arange(kv_len, device=self.kv_lens.device).unsqueeze(0)
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= k_pos > q_pos - sliding_window
            if chunk:
                mask &= k_pos >= q_pos // chunk * chunk
            self._masks[key] = mask
        return self._masks[key]


register_opaque_type(PagedAttentionMetadata, typ="reference")

_running = threading.local()


@contextmanager
def step_running(meta: PagedAttentionMetadata) -> Iterator[None]:
    """For the length of an engine forward in this thread, ``meta`` is the step that ``running_step`` returns: the
    attention reads it from here when a layer does not pass its keyword arguments on to the attention call."""
    previous = getattr(_running, "meta", None)
    _running.meta = meta
    try:
        yield
    finally:
        _running.meta = previous


def running_step() -> PagedAttentionMetadata | None:
    """The step of the engine forward running in this thread, or None."""
    return getattr(_running, "meta", None)


def _empty_metadata() -> PagedAttentionMetadata:
    empty = torch.empty(0, dtype=torch.long)
    return PagedAttentionMetadata(empty, empty.view(0, 0), empty, empty, 0, [], [], 0)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[B, KVH, M, D]``, k ``[B, KVH, L, D]``, v ``[B, KVH, L, Dv]``; mask broadcastable to ``[B, KVH, M, L]``,
    either bool (True = visible) or additive fp32; sinks (fp32 logits) broadcastable to ``[B, KVH, M, 1]``."""
    if not softcap and sinks is None:
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    # Soft-capped scores and sinks are computed in fp32 whatever the input dtype (tanh of bf16 scores loses too much).
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    top = torch.maximum(scores.amax(-1, keepdim=True), sinks.float())  # the sink joins the max and the denominator
    weights = torch.exp(scores - top)
    denominator = weights.sum(-1, keepdim=True) + torch.exp(sinks.float() - top)
    return (torch.matmul(weights, v.float()) / denominator).to(q.dtype)


def _attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """q ``[1, H, M, D]``, the last M of k/v's ``[1, KVH, prefix + M, D]`` positions, causal (CPU): two unmasked
    flash-attention calls (the prefix; the chunk over itself, causal) merged by their log-sum-exps."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o_pre, lse_pre = flash(q, k[:, :, :prefix], v[:, :, :prefix], scale=scale)
    o_new, lse_new = flash(q, k[:, :, prefix:], v[:, :, prefix:], is_causal=True, scale=scale)
    w_pre = torch.sigmoid(lse_pre - lse_new).unsqueeze(-1)  # = e^lse_pre / (e^lse_pre + e^lse_new)
    return torch.lerp(o_new.float(), o_pre.float(), w_pre).to(q.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: PagedAttentionMetadata, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """query ``[T, H, D]`` (the step's new tokens, K/V already written to the caches) -> ``[T, H, Dv]`` (Dv: the
    value cache's width). Int8 caches come with their scales ``[num_blocks, KVH, block_size]``; ``sinks`` ``[H]``
    (fp32 logits), ``chunk`` a chunk size."""
    num_tokens, num_heads, head_dim = query.shape
    kv_heads, head_dim_v = key_cache.shape[2], value_cache.shape[-1]
    group = num_heads // kv_heads
    out = torch.empty((num_tokens, num_heads, head_dim_v), dtype=query.dtype, device=query.device)
    d = meta.num_decodes
    plan = meta.cpu_decode_plan(query, key_cache, value_cache, scale, sliding_window, softcap, key_scales,
                                value_scales, chunk) if d else None
    if plan is not None:
        # The C kernel reads K/V straight from the blocks: no gather, no grouping.
        whole = d == num_tokens
        plan(query if whole else query[:d], key_cache, value_cache, out if whole else out[:d], key_scales,
             value_scales, sinks)
        groups = []
    else:
        groups = meta.decode_groups()
    for g, (rows, tables, max_len) in enumerate(groups):
        k = gather_blocks(key_cache, tables, max_len, key_scales, query.dtype).transpose(1, 2)  # [G, KVH, L, hd]
        v = gather_blocks(value_cache, tables, max_len, value_scales, query.dtype).transpose(1, 2)
        q = query[:d] if rows is None else query[rows]
        # The query heads sharing a KV head become that head's query rows: no repeat of K/V for GQA.
        q = q.reshape(-1, kv_heads, group, head_dim)
        o = _attend(q, k, v, meta.decode_mask(g, sliding_window, chunk), scale, softcap,
                    None if sinks is None else sinks.view(kv_heads, group, 1))
        o = o.reshape(-1, num_heads, head_dim_v)
        if rows is None:
            out[:d] = o
        else:
            out[rows] = o
    prefill_plan = meta.cpu_prefill_plan(query, key_cache, value_cache, scale, sliding_window, softcap, key_scales,
                                         value_scales, chunk)
    if prefill_plan is not None:  # every prefill sequence in one C call, K/V read from the blocks
        prefill_plan(query, key_cache, value_cache, out, key_scales, value_scales, sinks)
        return out
    for seq in range(d, meta.num_seqs):
        _prefill_one(query, key_cache, value_cache, meta, seq, scale, sliding_window, softcap, key_scales,
                     value_scales, out, sinks, chunk)
    return out


def _prefill_one(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: PagedAttentionMetadata,
                 seq: int, scale: float, sliding_window: int | None, softcap: float | None,
                 key_scales: torch.Tensor | None, value_scales: torch.Tensor | None, out: torch.Tensor,
                 sinks: torch.Tensor | None = None, chunk: int | None = None) -> None:
    """One prefill sequence's attention, PyTorch, into its rows of ``out``."""
    num_heads, head_dim, kv_heads = query.shape[1], query.shape[2], key_cache.shape[2]
    head_dim_v, group = value_cache.shape[-1], num_heads // kv_heads
    start, q_len, kv_len = int(meta.cu_seqlens_q[seq]), meta.q_lens_list[seq], meta.kv_lens_list[seq]
    table = meta.block_tables[seq : seq + 1, : -(-kv_len // meta.block_size)]
    k = gather_blocks(key_cache, table, kv_len, key_scales, query.dtype)[0].transpose(0, 1)  # [KVH, L, hd]
    v = gather_blocks(value_cache, table, kv_len, value_scales, query.dtype)[0].transpose(0, 1)
    plain = not (sliding_window or softcap or chunk) and sinks is None and head_dim_v == head_dim
    if plain and (q_len == kv_len or query.device.type == "cpu"):
        # Causal attention without a mask, which SDPA's flash kernel does faster than a masked one.
        q = query[start : start + q_len].transpose(0, 1).unsqueeze(0)
        k, v = k.unsqueeze(0).to(q.dtype), v.unsqueeze(0).to(q.dtype)
        if q_len == kv_len:  # a whole prompt
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a later chunk of a prompt: all of the cached prefix, then causal within the chunk
            o = _attend_chunk(q, k, v, kv_len - q_len, scale)
        out[start : start + q_len] = o[0].transpose(0, 1)
        return
    # [q_len, KVH, g, hd] -> [KVH, g*q_len, hd]: the heads sharing a KV head become extra query rows.
    q = query[start : start + q_len].view(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(kv_heads, group * q_len, head_dim)
    mask = meta.prefill_mask(seq, sliding_window, chunk).repeat(group, 1)
    if sinks is not None:  # [H] -> one per query row: [KVH, g * q_len, 1]
        sinks = sinks.view(kv_heads, group, 1).expand(kv_heads, group, q_len).reshape(kv_heads, group * q_len, 1)
    o = _attend(q, k, v, mask, scale, softcap, sinks)  # [KVH, g*q_len, hd_v]
    out[start : start + q_len] = o.view(kv_heads, group, q_len, head_dim_v).permute(2, 0, 1, 3).reshape(
        q_len, num_heads, head_dim_v)
