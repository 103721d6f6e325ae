"""Paged attention over a ragged batch as Triton kernels (the CUDA path; ``dispatch`` imports this module lazily, so
importing ``hf_paged`` never needs triton). Semantics as ``paged_attention.paged_attention``: sequence i's query tokens
are the last ``q_len`` of its ``kv_len`` (K/V already in the cache); causal; GQA (query head h reads KV head
``h // group``); a sliding window W lets position p see keys ``p - W < j <= p``, a chunk size C keys
``p // C * C <= j <= p``; soft-capping ``tanh(s / cap) * cap`` after scaling, before masking; attention sinks (one fp32
logit per query head) add ``exp(sink - m)`` to each row's final sum; values may be of another width than the keys
(``BLOCK_DV``; the output has theirs); softmax and accumulators in fp32.

* ``_decode_kernel``: one program per (sequence, KV head, split) with the KV head's query heads as tile rows (padded to
  16 for ``tl.dot``); K/V read tile by tile through the block table (each key's block looked up on its own, so the tile
  size does not depend on the block size), online softmax. With several splits (flash-decoding) each program covers a
  contiguous share of the tiles and writes an unnormalised partial (acc, m, l); ``_decode_reduce_kernel`` combines them.
* ``_prefill_kernel``: tiles of ``BLOCK_Q`` tokens x ``group`` heads (``BLOCK_M`` rows) of the ragged ``cu_seqlens_q``;
  a program finds its sequence by binary search (no host-side work list) and attends causally to the cached prefix and
  its own new tokens: chunked prefill and prefix-cache hits alike.

Int8 caches (``KV_INT8``): tiles widened to fp32 (exact); key scales multiply the scores, value scales the probabilities
before ``P.V`` (``l`` sums the unscaled ones). ``tl.dot``: the prefill kernel casts operands to fp32 (the interpreter's
``tl.dot`` is wrong on bf16, and this keeps the tested code the GPU's), run as ``tf32`` for fp16/bf16 inputs (exact for
Q.K^T; P rounded to tf32 for P.V) and ``ieee`` for fp32. The decode kernel, bandwidth-bound, does the same under the
interpreter but on the GPU feeds fp16/bf16 K/V to ``tl.dot`` as stored (``NATIVE_DOT``: P rounded to the cache dtype, as
flash-attention does; fp32 tile copies cost registers and pipelining stages). Launch settings: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import envs
from .triton_cache_ops import _cast_rtne

_NEG_INF = tl.constexpr(float("-inf"))  # a global read by @triton.jit code must be a constexpr

# Tile sizes (keys per inner-loop step; query rows per prefill program) and launch settings.
DECODE_TILE_N = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
# The interpreter's tl.dot is wrong on fp16/bf16 operands, so interpreted runs keep the fp32 casts.
DECODE_NATIVE_DOT = not envs.triton_interpreted()
PREFILL_TILE_N = 64
PREFILL_BLOCK_M = 64
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _softcap(s, softcap):
    """``tanh(s / softcap) * softcap``, tanh from exp of a non-positive argument (never overflows)."""
    x = s / softcap
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t) * softcap


@triton.jit(do_not_specialize=["window", "chunk"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, kv_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, k_scale_ptr, v_scale_ptr, sinks_ptr,
    scale, softcap, window, chunk, num_heads, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_ksh, stride_kss,
    stride_vsb, stride_vsh, stride_vss,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_INT8: tl.constexpr, NATIVE_DOT: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    kv_len = tl.load(kv_lens_ptr + seq).to(tl.int32)
    # The live keys are [lo, kv_len): the query sits at kv_len - 1 and sees j > kv_len - 1 - window (its chunk's).
    lo = tl.where(window > 0, tl.maximum(kv_len - window, 0), 0)
    lo = tl.where(chunk > 0, (kv_len - 1) // tl.maximum(chunk, 1) * chunk, lo)
    first_tile = lo // TILE_N
    last_tile = (kv_len + TILE_N - 1) // TILE_N
    tiles_per_split = (last_tile - first_tile + NUM_SPLITS - 1) // NUM_SPLITS
    t_begin = first_tile + split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, last_tile)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kvh * GROUP + g
    dv = tl.arange(0, BLOCK_DV)
    g_mask = g < GROUP
    d_mask = d < head_dim
    dv_mask = dv < head_dim_v
    q_in = tl.load(q_ptr + seq * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                   mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if NATIVE_DOT:
        q = q_in.to(k_cache_ptr.dtype.element_ty)
    else:
        q = q_in.to(tl.float32)

    m_i = tl.full([BLOCK_G], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(t_begin, t_end):
        pos = tile * TILE_N + tl.arange(0, TILE_N)
        valid = (pos >= lo) & (pos < kv_len)
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        in_blk = pos % BLOCK_SIZE
        k_in = tl.load(k_cache_ptr + phys[None, :] * stride_kb + in_blk[None, :] * stride_ks + kvh * stride_kh
                       + d[:, None] * stride_kd, mask=valid[None, :] & d_mask[:, None], other=0.0)
        if NATIVE_DOT:
            kt = k_in
        else:
            kt = k_in.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=tl.float32) * scale  # [BLOCK_G, TILE_N]
        if KV_INT8:
            k_sc = tl.load(k_scale_ptr + phys * stride_ksb + kvh * stride_ksh + in_blk * stride_kss, mask=valid,
                           other=0.0)
            s = s * k_sc[None, :]
        if USE_SOFTCAP:
            s = _softcap(s, softcap)
        s = tl.where(valid[None, :], s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + phys[:, None] * stride_vb + in_blk[:, None] * stride_vs + kvh * stride_vh
                    + dv[None, :] * stride_vd, mask=valid[:, None] & dv_mask[None, :], other=0.0)
        if KV_INT8:
            v_sc = tl.load(v_scale_ptr + phys * stride_vsb + kvh * stride_vsh + in_blk * stride_vss, mask=valid,
                           other=0.0)
            p = p * v_sc[None, :]
        if NATIVE_DOT:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        if HAS_SINKS:  # the sink's weight joins the sum
            sink = tl.load(sinks_ptr + head, mask=g_mask, other=0.0)
            l_i += tl.exp(sink - tl.where(m_i == _NEG_INF, 0.0, m_i))
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ot + head[:, None] * stride_oh + dv[None, :] * stride_od,
                 _cast_rtne(o, out_ptr.dtype.element_ty), mask=g_mask[:, None] & dv_mask[None, :])
    else:
        # Partials [num_decodes, num_heads, NUM_SPLITS] (m, l) and [..., BLOCK_DV] (unnormalised acc), fp32.
        row = (seq * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * BLOCK_DV + dv[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, num_heads, head_dim,
    stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    row = (seq * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_m_ptr + row, mask=s_mask, other=_NEG_INF)
    l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == _NEG_INF, 0.0, m_max)
    w = tl.exp(m - m_max)  # an empty split has m = -inf: weight 0
    denom = tl.sum(w * l, 0)
    if HAS_SINKS:
        denom += tl.exp(tl.load(sinks_ptr + head) - m_max)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d * stride_od,
             _cast_rtne(o, out_ptr.dtype.element_ty), mask=d < head_dim)


@triton.jit(do_not_specialize=["window", "chunk", "num_seqs"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, kv_lens_ptr, cu_q_ptr, out_ptr, k_scale_ptr, v_scale_ptr,
    sinks_ptr, scale, softcap, window, chunk, num_seqs, head_dim, head_dim_v,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_ksh, stride_kss,
    stride_vsb, stride_vsh, stride_vss,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_INT8: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Sequence i owns programs [(cu[i] - cu[0]) // BLOCK_Q + i, (cu[i+1] - cu[0]) // BLOCK_Q + i + 1): at least
    # cdiv(q_len, BLOCK_Q) of them (surplus ones exit). Find the last i whose first program is <= pid.
    cu0 = tl.load(cu_q_ptr).to(tl.int32)
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first = (tl.load(cu_q_ptr + mid).to(tl.int32) - cu0) // BLOCK_Q + mid
        if first <= pid:
            left = mid + 1
        else:
            right = mid
    seq = left - 1

    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    q_tile = pid - ((q_start - cu0) // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(kv_lens_ptr + seq).to(tl.int32)
    ctx_len = kv_len - q_len  # tokens cached before this chunk

    # Row r of the tile is (token q_tile * BLOCK_Q + r // GROUP, head kvh * GROUP + r % GROUP).
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    tok = q_tile * BLOCK_Q + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (tok < q_len)
    d_mask = d < head_dim
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < head_dim_v
    q_pos = ctx_len + tok
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    # Keys any row of this tile can see: [lo, hi).
    hi = tl.minimum(ctx_len + (q_tile + 1) * BLOCK_Q, kv_len)
    lo = tl.where(window > 0, tl.maximum(ctx_len + q_tile * BLOCK_Q - window + 1, 0), 0)
    chunk_1 = tl.maximum(chunk, 1)
    lo = tl.where(chunk > 0, (ctx_len + q_tile * BLOCK_Q) // chunk_1 * chunk, lo)

    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(lo // TILE_N, (hi + TILE_N - 1) // TILE_N):
        pos = tile * TILE_N + tl.arange(0, TILE_N)
        k_valid = (pos >= lo) & (pos < hi)
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        in_blk = pos % BLOCK_SIZE
        kt = tl.load(k_cache_ptr + phys[None, :] * stride_kb + in_blk[None, :] * stride_ks + kvh * stride_kh
                     + d[:, None] * stride_kd, mask=k_valid[None, :] & d_mask[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, TILE_N]
        if KV_INT8:
            k_sc = tl.load(k_scale_ptr + phys * stride_ksb + kvh * stride_ksh + in_blk * stride_kss, mask=k_valid,
                           other=0.0)
            s = s * k_sc[None, :]
        if USE_SOFTCAP:
            s = _softcap(s, softcap)
        visible = k_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        visible = visible & ((window <= 0) | (pos[None, :] > q_pos[:, None] - window))
        visible = visible & ((chunk <= 0) | (pos[None, :] >= q_pos[:, None] // chunk_1 * chunk))
        s = tl.where(visible, s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + phys[:, None] * stride_vb + in_blk[:, None] * stride_vs + kvh * stride_vh
                    + dv[None, :] * stride_vd, mask=k_valid[:, None] & dv_mask[None, :], other=0.0).to(tl.float32)
        if KV_INT8:
            v_sc = tl.load(v_scale_ptr + phys * stride_vsb + kvh * stride_vsh + in_blk * stride_vss, mask=k_valid,
                           other=0.0)
            p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if HAS_SINKS:  # the sink's weight joins the sum
        sink = tl.load(sinks_ptr + head, mask=row_mask, other=0.0)
        l_i += tl.exp(sink - tl.where(m_i == _NEG_INF, 0.0, m_i))
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :] * stride_od,
             _cast_rtne(o, out_ptr.dtype.element_ty), mask=row_mask[:, None] & dv_mask[None, :])


# ---- host side ---------------------------------------------------------------------------------------
_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_num_splits(num_decodes: int, kv_heads: int, max_kv_len: int, sliding_window: int | None,
                      device: torch.device) -> int:
    """How many splits of the sequence axis the decode kernel uses: enough programs to fill the GPU about
    twice over when the batch alone does not, never under ``MIN_TOKENS_PER_SPLIT`` keys a split (``sliding_window``:
    the most keys a query sees, its window or chunk)."""
    live = min(max_kv_len, sliding_window) if sliding_window and sliding_window > 0 else max_kv_len
    programs = num_decodes * kv_heads
    target = 2 * _num_sms(device)
    if programs >= target or live <= 2 * MIN_TOKENS_PER_SPLIT:
        return 1
    splits = min(triton.cdiv(target, programs), triton.cdiv(live, MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    return max(1, splits)


def _dot_precision(*tensors: torch.Tensor) -> str:
    return "ieee" if any(t.dtype == torch.float32 for t in tensors) else "tf32"


def _scale_args(key_cache: torch.Tensor, value_cache: torch.Tensor, key_scales: torch.Tensor | None,
                value_scales: torch.Tensor | None) -> tuple[tuple, tuple]:
    """(pointers, strides) of an int8 cache's scales ``[num_blocks, KVH, block_size]`` as the kernels take them:
    (block, head, slot) strides; the caches themselves and zeros, unused, for unquantized caches."""
    if key_scales is None:
        return (key_cache, value_cache), (0,) * 6
    assert key_cache.dtype == value_cache.dtype == torch.int8 and value_scales is not None
    return (key_scales, value_scales), (*key_scales.stride(), *value_scales.stride())


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                           num_decodes: int, max_kv_len: int, scale: float, sliding_window: int | None = None,
                           softcap: float | None = None, num_splits: int | None = None,
                           tile_n: int | None = None, key_scales: torch.Tensor | None = None,
                           value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           chunk: int | None = None) -> None:
    """Rows ``0..num_decodes-1`` of ``query`` ``[T, H, D]`` / ``out`` ``[T, H, Dv]`` are decode tokens of sequences
    ``0..num_decodes-1``. ``num_splits`` None picks by heuristic. Int8 caches come with their scales; ``sinks``
    ``[H]`` fp32 logits; ``chunk`` a chunk size."""
    if num_decodes == 0:
        return
    _, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    head_dim_v = value_cache.shape[-1]
    group = num_heads // kv_heads
    tile_n = tile_n or DECODE_TILE_N
    if num_splits is None:
        num_splits = decode_num_splits(num_decodes, kv_heads, max_kv_len, sliding_window or chunk, query.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    block_g = max(16, triton.next_power_of_2(group))
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 0.0
    if num_splits > 1:
        part_acc = torch.empty(num_decodes, num_heads, num_splits, block_dv, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    scale_ptrs, scale_strides = _scale_args(key_cache, value_cache, key_scales, value_scales)
    sinks_arg = out if sinks is None else sinks  # unused pointer without sinks
    _decode_kernel[(num_decodes, kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, kv_lens,
        out, part_acc, part_m, part_l, *scale_ptrs, sinks_arg,
        float(scale), cap, window, int(chunk or 0), num_heads, head_dim, head_dim_v,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *scale_strides, block_tables.stride(0),
        *out.stride(),
        GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_SIZE=block_size, TILE_N=tile_n,
        NUM_SPLITS=num_splits, USE_SOFTCAP=cap != 0.0, DOT_PRECISION=_dot_precision(query, key_cache),
        KV_INT8=key_scales is not None, NATIVE_DOT=DECODE_NATIVE_DOT and query.dtype == key_cache.dtype != torch.float32,
        HAS_SINKS=sinks is not None, num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_decodes, num_heads)](
            out, part_acc, part_m, part_l, sinks_arg, num_heads, head_dim_v, *out.stride(),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_dv,
            HAS_SINKS=sinks is not None, num_warps=4,
        )


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, q_lens: list[int], scale: float,
                            sliding_window: int | None = None, softcap: float | None = None,
                            block_m: int | None = None, tile_n: int | None = None,
                            key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                            sinks: torch.Tensor | None = None, chunk: int | None = None) -> None:
    """The sequences of ``block_tables``/``kv_lens``/``q_lens`` (rows), whose query tokens are rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of ``query``/``out`` (``cu_seqlens_q`` has one more entry)."""
    num_seqs = len(q_lens)
    if num_seqs == 0:
        return
    _, num_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    head_dim_v = value_cache.shape[-1]
    group = num_heads // kv_heads
    tile_n = tile_n or PREFILL_TILE_N
    if block_m is None:
        block_m = PREFILL_BLOCK_M if max(q_lens) * group > 16 else 16
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    block_d = max(16, triton.next_power_of_2(head_dim))
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 0.0
    grid = (sum(q_lens) // block_q + num_seqs, kv_heads)
    scale_ptrs, scale_strides = _scale_args(key_cache, value_cache, key_scales, value_scales)
    _prefill_kernel[grid](
        query, key_cache, value_cache, block_tables, kv_lens, cu_seqlens_q, out, *scale_ptrs,
        out if sinks is None else sinks, float(scale), cap, window, int(chunk or 0), num_seqs, head_dim, head_dim_v,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *scale_strides, block_tables.stride(0),
        *out.stride(),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=block_d,
        BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), BLOCK_SIZE=block_size, TILE_N=tile_n,
        USE_SOFTCAP=cap != 0.0, DOT_PRECISION=_dot_precision(query, key_cache),
        KV_INT8=key_scales is not None, HAS_SINKS=sinks is not None, num_warps=4,
    )


def paged_attention_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta,
                           scale: float, sliding_window: int | None = None, softcap: float | None = None, *,
                           num_splits: int | None = None, key_scales: torch.Tensor | None = None,
                           value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                           chunk: int | None = None) -> torch.Tensor:
    """query ``[T, H, D]`` (the step's new tokens, K/V already in the caches) -> ``[T, H, Dv]``; the first
    ``meta.num_decodes`` sequences go to the decode kernel, the rest to the prefill kernel. ``num_splits`` overrides the
    split-K heuristic (tests). Int8 caches come with their scales ``[num_blocks, KVH, block_size]``; ``sinks``
    ``[H]`` fp32 attention-sink logits; ``chunk`` a chunked-attention chunk size."""
    num_tokens, num_heads, head_dim = query.shape
    out = torch.empty((num_tokens, num_heads, value_cache.shape[-1]), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    d = meta.num_decodes
    if d:
        max_len = meta.max_decode_len or max(meta.kv_lens_list[:d])
        paged_decode_attention(out, query, key_cache, value_cache, meta.block_tables, meta.kv_lens, d,
                               max_len, scale, sliding_window, softcap, num_splits=num_splits,
                               key_scales=key_scales, value_scales=value_scales, sinks=sinks, chunk=chunk)
    if d < meta.num_seqs:
        paged_prefill_attention(out, query, key_cache, value_cache, meta.block_tables[d:], meta.kv_lens[d:],
                                meta.cu_seqlens_q[d:], meta.q_lens_list[d:], scale, sliding_window, softcap,
                                key_scales=key_scales, value_scales=value_scales, sinks=sinks, chunk=chunk)
    return out
