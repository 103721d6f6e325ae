"""Triton kernels for the block pool's hot-path writes: scattering a step's new K/V into their slots and
copying whole blocks (copy-on-write). Same signatures and semantics as ``cache_ops.write_kv`` /
``cache_ops.copy_blocks``; reached through ``dispatch`` (which imports this module lazily, so importing
``hf_paged`` never needs triton).

Pool layout: ``kv[layer, 0|1, block, slot_in_block, kv_head, head_dim]``; slot id =
``block * block_size + slot_in_block``. An int8 pool's caches are written quantized, with their scales
``[num_blocks, kv_heads, block_size]`` (the bits of ``cache_ops.quantize_int8``: correctly rounded divisions, the
quotient rounded half to even); its scales are copied as blocks of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cast_rtne(x, DST: tl.constexpr):
    """Cast ``x`` to ``DST`` rounding to nearest even. fp32 -> bf16 is done by hand: the Triton interpreter
    truncates on that cast (the GPU rounds), and the hand-made rounding is what both then run."""
    if DST == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DST)


@triton.jit
def _quantize_rows(x):
    """Rows ``x [H, D]`` -> (int8-valued fp32 rows, fp32 scales ``[H]``) as ``cache_ops.quantize_int8``: scale =
    max|x| / 127, x / scale rounded half to even (adding and subtracting 1.5 * 2**23 rounds |y| < 2**22 so)."""
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    scale = tl.math.div_rn(amax, tl.zeros_like(amax) + 127.0)
    divisor = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, tl.zeros_like(x) + divisor[:, None])
    y = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(y, -127.0), 127.0), scale


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, key_scale_ptr, value_scale_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ksb, stride_ksh, stride_kss,
    stride_vsb, stride_vsh, stride_vss,
    num_kv_heads, head_dim, head_dim_v, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, KV_INT8: tl.constexpr,
):
    # One program per token: all its KV heads at once.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (vLLM convention): nothing to write
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dv = tl.arange(0, BLOCK_DV)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    mask_v = (h < num_kv_heads) & (dv < head_dim_v)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask, other=0.0)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + dv * stride_vd, mask=mask_v, other=0.0)
    if KV_INT8:
        k, k_scale = _quantize_rows(k)
        v, v_scale = _quantize_rows(v)
        heads = tl.arange(0, BLOCK_H)
        h_mask = heads < num_kv_heads
        tl.store(key_scale_ptr + blk * stride_ksb + heads * stride_ksh + off * stride_kss, k_scale, mask=h_mask)
        tl.store(value_scale_ptr + blk * stride_vsb + heads * stride_vsh + off * stride_vss, v_scale, mask=h_mask)
        k = k.to(tl.int8)
        v = v.to(tl.int8)
    else:
        k = _cast_rtne(k, key_cache_ptr.dtype.element_ty)
        v = _cast_rtne(v, value_cache_ptr.dtype.element_ty)
    tl.store(key_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd, k, mask=mask)
    tl.store(value_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + dv * stride_vcd, v, mask=mask_v)


def write_kv_triton(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> None:
    """Scatter ``key``/``value`` ``[tokens, kv_heads, head_dim (_v)]`` into the slots ``slot_mapping[tokens]`` of one
    layer's caches ``[num_blocks, block_size, kv_heads, head_dim (_v)]`` (int8 caches: quantized, their scales into
    ``key_scales`` / ``value_scales`` ``[num_blocks, kv_heads, block_size]``). A negative slot skips its token."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    nb, bs, kvh, hd = key_cache.shape
    hd_v = value_cache.shape[-1]
    assert key.shape == (num_tokens, kvh, hd) and value.shape == (num_tokens, kvh, hd_v), (key.shape, value.shape)
    assert slot_mapping.shape[0] == num_tokens
    quantized = key_scales is not None
    assert not quantized or (key_cache.dtype == value_cache.dtype == torch.int8 and value_scales is not None)
    slot_mapping = slot_mapping.to(key_cache.device)
    scale_args = ((key_scales, value_scales, *key_scales.stride(), *value_scales.stride()) if quantized
                  else (key_cache, value_cache, 0, 0, 0, 0, 0, 0))  # unused pointers
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, *scale_args[:2],
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(), *scale_args[2:],
        kvh, hd, hd_v, bs,
        BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(hd),
        BLOCK_DV=triton.next_power_of_2(hd_v), KV_INT8=quantized,
        num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    kv_ptr, pairs_ptr,
    stride_layer, stride_kv, stride_block, stride_p0, stride_p1,
    block_numel, parts,
    BLOCK: tl.constexpr,
):
    # grid: (pair, layer * parts + part (K, V; one part in a keys- or values-only tensor), chunk of the block)
    p = tl.program_id(0)
    lk = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(pairs_ptr + p * stride_p0).to(tl.int64)
    dst = tl.load(pairs_ptr + p * stride_p0 + stride_p1).to(tl.int64)
    base = (lk // parts).to(tl.int64) * stride_layer + (lk % parts) * stride_kv
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    x = tl.load(kv_ptr + base + src * stride_block + offs, mask=mask)
    tl.store(kv_ptr + base + dst * stride_block + offs, x, mask=mask)


def copy_blocks_triton(kv: torch.Tensor, pairs: torch.Tensor) -> None:
    """For every (src, dst) row of ``pairs`` ``[P, 2]`` copy block src to block dst, in every layer, K and V,
    of the full pool tensor ``kv[layer, 0|1, block, slot, kv_head, head_dim]`` (or a keys- or values-only
    ``[layer, 1, ...]``), in one launch.

    Like every copy-on-write, the destinations must be distinct and must not be sources of other pairs
    (the pairs run in parallel)."""
    if pairs.numel() == 0:
        return
    num_layers, parts, nb, bs, kvh, hd = kv.shape
    if kv.stride()[3:] != (kvh * hd, hd, 1):
        # The block's slots are not one dense run of memory: take the PyTorch path.
        from .cache_ops import copy_blocks

        copy_blocks(kv, pairs)
        return
    pairs = pairs.to(kv.device)
    block_numel = bs * kvh * hd
    block = min(4096, triton.next_power_of_2(block_numel))
    grid = (pairs.shape[0], num_layers * parts, triton.cdiv(block_numel, block))
    _copy_blocks_kernel[grid](
        kv, pairs, kv.stride(0), kv.stride(1), kv.stride(2), pairs.stride(0), pairs.stride(1), block_numel, parts,
        BLOCK=block, num_warps=4,
    )
