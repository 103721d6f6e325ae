"""The int8 KV cache (``kv_cache_dtype="int8"``): the rounding, the pool (sizing, copy-on-write, growth), every
cache write (PyTorch, C, Triton: the same bits), every attention path on int8 K/V (the C decode kernel and the
Triton kernels against the PyTorch path on the same quantized cache; the PyTorch path against fp32 attention on the
unquantized K/V within a bound derived from the rounding), the engine and ``PagedCache`` with int8 K/V against
full precision, the features that move blocks around (samples, beams, prefix caching, preemption, chunked prefill)
and the option's validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import hf_paged
from hf_paged import LLMEngine, PagedCache, SamplingParams
from hf_paged.core.block_pool import BlockPool, BlockTable
from hf_paged.config import EngineConfig
from hf_paged.execution.kernels import cpu_decode_attention as cpu_kernel
from hf_paged.execution.kernels import cpu_prefill_attention as cpu_prefill
from hf_paged.execution.kernels.cache_ops import dequantize_int8, gather_blocks, quantize_int8, write_kv
from attention_oracle import paged_attention_naive
from hf_paged.execution.kernels.paged_attention import PagedAttentionMetadata, paged_attention
from hf_paged.execution.kv_cache import KVCache
from hf_paged.execution.plan import build_plan, default_plan

from conftest import build_tiny_model, needs_cpu_kernels, tiny_prompts

SCALE = 0.125
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PLAN = {dtype: build_plan("cpu", dtype, cpu_kernels=False, pack_weights=False, triton=False)
              for dtype in (torch.float32, torch.bfloat16)}


# ---- the rounding -------------------------------------------------------------------------------------------------
def test_quantize_int8_is_symmetric_per_vector_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.rand(50, 3, 1, generator=g) * 10
    x[0, 0] = 0.0
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (50, 3)
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127, rtol=0, atol=0)
    assert int(q.abs().max()) == 127 and scale[0, 0] == 0 and not q[0, 0].any()
    # Round to nearest: every element within half a step of its value.
    err = (dequantize_int8(q, scale, torch.float32) - x).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 * (1 + 1e-6)).all())
    # bf16 inputs quantize their exact fp32 values.
    xb = x.to(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(quantize_int8(xb), quantize_int8(xb.float())))


# ---- the KV cache -------------------------------------------------------------------------------------------------
def test_kv_cache_sizes_int8_blocks_by_their_real_bytes():
    layers, kvh, hd, bs = 4, 3, 64, 16
    full = KVCache(layers, kvh, hd, block_size=bs, memory_bytes=64 << 20, dtype=torch.float32)
    int8 = KVCache(layers, kvh, hd, block_size=bs, memory_bytes=64 << 20, dtype=torch.float32, kv_cache_dtype="int8")
    assert int8.bytes_per_block == 2 * layers * bs * kvh * (hd + 4)
    assert full.bytes_per_block == 2 * layers * bs * kvh * hd * 4
    assert int8.num_blocks == (64 << 20) // int8.bytes_per_block - 1
    assert int8.kv.dtype == torch.int8 and int8.quantized and not full.quantized
    assert int8.kv_cache_dtype == "int8" and full.kv_cache_dtype == "auto"
    assert int8.kv.shape == (layers, 2, int8.num_blocks + 1, bs, kvh, hd)  # the null block stays
    assert int8.kv_scales.shape == (layers, 2, int8.num_blocks + 1, kvh, bs) and int8.kv_scales.dtype == torch.float32
    assert int8.nbytes == (int8.num_blocks + 1) * int8.bytes_per_block
    assert int8.key_scales(1).shape == (int8.num_blocks + 1, kvh, bs) and full.key_scales(1) is None
    assert int8.value_scales(2).data_ptr() == int8.kv_scales[2, 1].data_ptr() and full.value_scales(0) is None
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache(layers, kvh, hd, num_blocks=4, kv_cache_dtype="fp4")
    int8.release()
    assert int8.kv.numel() == 0 and int8.kv_scales.numel() == 0 and int8.nbytes == 0


def test_kv_cache_copies_and_grows_scales_with_their_blocks():
    pool = BlockPool(6, block_size=4)
    kv_cache = KVCache(2, 2, 8, block_size=4, num_blocks=6, kv_cache_dtype="int8")
    plan = default_plan(kv_cache.kv, "int8")
    g = torch.Generator().manual_seed(1)
    kv_cache.kv.copy_(torch.randint(-127, 128, kv_cache.kv.shape, generator=g, dtype=torch.int8))
    kv_cache.kv_scales.copy_(torch.rand(kv_cache.kv_scales.shape, generator=g))
    before_kv, before_scales = kv_cache.kv.clone(), kv_cache.kv_scales.clone()
    pool.queue_copy(2, 5)
    pool.queue_copy(0, 3)
    copies = pool.take_copies()
    assert copies == [(2, 5), (0, 3)] and pool.take_copies() == []
    kv_cache.copy_blocks(copies, plan)
    for src, dst in ((2, 5), (0, 3)):
        assert torch.equal(kv_cache.kv[:, :, dst], before_kv[:, :, src])
        assert torch.equal(kv_cache.kv_scales[:, :, dst], before_scales[:, :, src])
    for untouched in (0, 1, 2, 4, 6):
        assert torch.equal(kv_cache.kv[:, :, untouched], before_kv[:, :, untouched])
        assert torch.equal(kv_cache.kv_scales[:, :, untouched], before_scales[:, :, untouched])
    # A copy-on-write through a block table carries the scales too.
    a = BlockTable(pool)
    a.append_slots(2)
    b = a.fork()
    b.append_slots(1)
    src, dst = a.blocks[0], b.blocks[0]
    kv_cache.copy_blocks(pool.take_copies(), plan)
    assert torch.equal(kv_cache.kv_scales[:, :, dst], kv_cache.kv_scales[:, :, src])
    assert torch.equal(kv_cache.kv[:, :, dst], kv_cache.kv[:, :, src])
    a.free()
    b.free()
    kv, scales = kv_cache.kv[:, :, :6].clone(), kv_cache.kv_scales[:, :, :6].clone()
    pool.grow(4)
    kv_cache.grow(4)
    assert pool.null_block == kv_cache.null_block == 10 and kv_cache.kv_scales.shape[2] == 11
    assert kv_cache.kv.shape[2] == 11 and kv_cache.kv.dtype == torch.int8
    assert torch.equal(kv_cache.kv[:, :, :6], kv) and torch.equal(kv_cache.kv_scales[:, :, :6], scales)


# ---- cache writes -------------------------------------------------------------------------------------------------
def _caches(num_blocks, block_size, kv_heads, head_dim):
    """int8 caches and scales filled with garbage (a kernel reading a slot it should not shows up)."""
    g = torch.Generator().manual_seed(99)
    kc = torch.randint(-127, 128, (num_blocks, block_size, kv_heads, head_dim), generator=g, dtype=torch.int8)
    scales = torch.full((num_blocks, kv_heads, block_size), 1e3)
    return kc, kc.clone(), scales, scales.clone()


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_c_cache_write_equals_pytorch_bits(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    key = (torch.randn(3, 37, head_dim, generator=g) * 3).to(dtype).transpose(0, 1)  # strided, as attention has it
    value = torch.randn(37, 3, head_dim, generator=g).to(dtype)
    key[5] = 0.0
    slots = torch.randperm(12 * 8, generator=g)[:37]
    ref, out = _caches(12, 8, 3, head_dim), _caches(12, 8, 3, head_dim)
    write_kv(ref[0], ref[1], key, value, slots, ref[2], ref[3])
    assert cpu_kernel.write_kv_cpu(out[0], out[1], key, value, slots, out[2], out[3])
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


# ---- attention ----------------------------------------------------------------------------------------------------
def _int8_step(lengths, q_lens, num_heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """A step over int8 caches: (query, key/value caches, key/value scales, metadata, the unquantized K/V in fp32
    caches of the same layout). Each sequence's K/V are random, written through ``cache_ops.write_kv``; every other
    slot of the int8 caches holds garbage."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in lengths]
    kc, vc, ks, vs = _caches(sum(blocks) + 3, block_size, kv_heads, head_dim)
    k32, v32 = torch.zeros(kc.shape), torch.zeros(kc.shape)
    perm = torch.randperm(kc.shape[0], generator=g).tolist()
    tables, at = [], 0
    for n, b in zip(lengths, blocks):
        tables.append(perm[at : at + b] + [perm[-1]] * (max(blocks) - b))
        at += b
        slots = torch.tensor([tables[-1][p // block_size] * block_size + p % block_size for p in range(n)])
        k = (torch.randn(n, kv_heads, head_dim, generator=g) * (1 + torch.rand(n, kv_heads, 1, generator=g))).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        write_kv(kc, vc, k, v, slots, ks, vs)
        write_kv(k32, v32, k.float(), v.float(), slots)
    num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    meta = PagedAttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.long), block_tables=torch.tensor(tables, dtype=torch.long),
        kv_lens=torch.tensor(lengths, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.long),
        num_decodes=num_decodes, kv_lens_list=list(lengths), q_lens_list=list(q_lens), block_size=block_size,
        plan=TORCH_PLAN[dtype])
    query = torch.randn(num_heads, cu[-1], head_dim, generator=g).to(dtype).transpose(0, 1)  # [T, H, D], strided
    return query, kc, vc, ks, vs, meta, (k32, v32)


def _torch_int8(query, kc, vc, ks, vs, meta, window=None, softcap=None):
    """The PyTorch path (gather, dequantize, SDPA) on the int8 caches, computed in fp32."""
    meta = PagedAttentionMetadata(meta.slot_mapping, meta.block_tables, meta.kv_lens, meta.cu_seqlens_q,
                                  meta.num_decodes, meta.kv_lens_list, meta.q_lens_list, meta.block_size,
                                  plan=TORCH_PLAN[torch.float32])
    return paged_attention(query.float(), kc, vc, meta, SCALE, window, softcap, ks, vs)


def _bound_from_rounding(query, meta, exact_kv, rounded_kv, window):
    """Per (token, head): how far attention over the rounded K/V can be from attention over the exact ones. With
    score errors |ds_j| <= eps (a softcap is 1-Lipschitz), every probability moves by a factor within exp(+-2 eps),
    so sum |dp| <= exp(2 eps) - 1, and |o' - o| <= max|v' - v| + (exp(2 eps) - 1) max|v|."""
    bound = torch.zeros(query.shape)
    group = query.shape[1] // exact_kv[0].shape[2]
    cu = meta.cu_seqlens_q.tolist()
    for seq, n in enumerate(meta.kv_lens_list):
        table = meta.block_tables[seq : seq + 1]
        k, v = (gather_blocks(c, table, n)[0] for c in exact_kv)
        kr, vr = (gather_blocks(c, table, n)[0] for c in rounded_kv)
        for t in range(cu[seq], cu[seq + 1]):
            pos = n - (cu[seq + 1] - t)
            lo = max(0, pos + 1 - window) if window else 0
            for h in range(query.shape[1]):
                kh = h // group
                eps = float((SCALE * ((kr[lo : pos + 1, kh] - k[lo : pos + 1, kh]) @ query[t, h].float())).abs().max())
                dv = float((vr[lo : pos + 1, kh] - v[lo : pos + 1, kh]).abs().max())
                bound[t, h] = dv + math.expm1(2 * eps) * float(v[lo : pos + 1, kh].abs().max())
    return bound


@pytest.mark.parametrize("window,softcap", [(None, None), (7, 20.0)])
def test_pytorch_int8_path_within_the_rounding_bound_of_fp32(window, softcap):
    lengths, q_lens = [1, 17, 40, 23, 30], [1, 1, 1, 9, 30]  # decodes, a prompt chunk, a whole prompt
    query, kc, vc, ks, vs, meta, exact = _int8_step(lengths, q_lens, 6, 2, 64, 16, torch.float32, seed=3)
    out = _torch_int8(query, kc, vc, ks, vs, meta, window, softcap)
    tables, cu = meta.block_tables, meta.cu_seqlens_q.tolist()
    # Rounded K/V: each element within half a step (max|x| / 127 of its vector) of the original.
    rounded = (dequantize_int8(kc, ks.transpose(1, 2), torch.float32),
               dequantize_int8(vc, vs.transpose(1, 2), torch.float32))
    for seq, n in enumerate(lengths):
        for r, e in zip(rounded, exact):
            x, xr = gather_blocks(e, tables[seq : seq + 1], n), gather_blocks(r, tables[seq : seq + 1], n)
            assert bool(((xr - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)).all())
    # The path computes attention over the rounded K/V (fp32 agreement with the token-by-token oracle) ...
    torch.testing.assert_close(out, paged_attention_naive(query, *rounded, tables, lengths, cu, SCALE, window,
                                                          softcap), atol=2e-5, rtol=0)
    # ... which is within the rounding's bound of attention over the exact K/V.
    err = (out - paged_attention_naive(query, *exact, tables, lengths, cu, SCALE, window, softcap)).abs()
    bound = _bound_from_rounding(query, meta, exact, rounded, window)
    assert bool((err <= bound + 1e-5).all()), f"max excess {(err - bound).max().item():.3g}"
    assert 0 < err.max() < 0.1


# Where the CPU has AVX512-VNNI the int8 kernel rounds the scaled query, and each tile's weights p_j * s_j, to int16
# (relative 2**-16 of the largest element, to use integer dot products); with these unit-scale values the outputs
# move by up to ~2e-4 (the int8 rounding of K/V itself moves them by ~1e-2). Elsewhere the kernel computes in fp32.
KERNEL_ATOL = 4e-4


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 outputs within KERNEL_ATOL; bf16 outputs within that plus their own rounding (half an ulp)."""
    ref = ref.float()
    half_ulp = 0.0
    if out.dtype != torch.float32:
        _, exponent = torch.frexp(ref)
        half_ulp = torch.ldexp(torch.ones_like(ref), exponent - 9)
    err = (out.float() - ref).abs()
    assert bool((err <= KERNEL_ATOL + half_ulp).all()), f"max err {err.max().item():.3g}"


KERNEL_CASES = [(1, 64, 16), (3, 64, 8), (8, 128, 32), (2, 40, 16), (4, 16, 16)]  # (group, head dim, block size)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,block_size", KERNEL_CASES)
def test_c_decode_kernel_reads_int8_like_the_pytorch_path(dtype, group, head_dim, block_size):
    """The same quantized cache through the C kernel and through gather + dequantize + SDPA (in fp32): within
    KERNEL_ATOL (bf16 outputs: plus their own rounding)."""
    lengths = [1, block_size, block_size + 1, 3 * block_size - 1, 70, 5, 33]
    query, kc, vc, ks, vs, meta, _ = _int8_step(lengths, [1] * len(lengths), 2 * group, 2, head_dim, block_size,
                                                dtype, seed=group * 100 + head_dim)
    for window, softcap in ((None, None), (9, None), (None, 15.0)):
        out = cpu_kernel.decode_attention_cpu(query, kc, vc, meta.block_tables, meta.kv_lens, SCALE, window, softcap,
                                              key_scales=ks, value_scales=vs)
        ref = _torch_int8(query, kc, vc, ks, vs, meta, window, softcap)
        assert out.dtype == dtype
        _close(out, ref)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (3, 64, 8), (8, 128, 32)])
def test_c_prefill_kernel_reads_int8_like_the_pytorch_path(dtype, group, head_dim, block_size):
    """Whole prompts and chunks after a cached prefix over int8 caches: the C prefill kernel against gather +
    dequantize + SDPA (in fp32), within KERNEL_ATOL (bf16 outputs: plus their own rounding)."""
    lengths, q_lens = [1, 70, 130, 200, 33], [1, 70, 65, 7, 33]
    query, kc, vc, ks, vs, meta, _ = _int8_step(lengths, q_lens, 2 * group, 2, head_dim, block_size, dtype,
                                                seed=group * 10 + head_dim)
    out = cpu_prefill.prefill_attention_cpu(query, kc, vc, meta.block_tables, q_lens, lengths, SCALE, ks, vs)
    assert out.dtype == dtype
    _close(out, _torch_int8(query, kc, vc, ks, vs, meta))


@needs_cpu_kernels
def test_engine_attention_takes_the_c_kernels_on_int8(monkeypatch):
    """Through ``paged_attention`` with a C-kernel plan: the decodes go to the int8 decode kernel, the prompt to the
    int8 prefill kernel."""
    query, kc, vc, ks, vs, meta, _ = _int8_step([12, 50, 20], [1, 1, 20], 6, 2, 64, 16, torch.float32, seed=5)
    meta.plan = build_plan("cpu", torch.float32, pack_weights=False, cpu_kernels=True, kv_cache_dtype="int8")
    calls = []
    for plan_class in (cpu_kernel.DecodePlan, cpu_prefill.PrefillPlan):
        real = plan_class.__call__
        monkeypatch.setattr(plan_class, "__call__", lambda self, *a, _real=real, _name=plan_class.__name__: calls.append(
            (_name, self.quantized)) or _real(self, *a))
    out = paged_attention(query, kc, vc, meta, SCALE, key_scales=ks, value_scales=vs)
    assert calls == [("DecodePlan", True), ("PrefillPlan", True)]
    _close(out, _torch_int8(query, kc, vc, ks, vs, meta))


@needs_cpu_kernels
def test_one_call_decode_layer_on_int8_equals_the_fused_path(smollm2, chat_ids, monkeypatch):
    """Where decode layers run as one C call (AMX or AVX-512 linears), they take int8 K/V too, with the bits of the
    fused Python path (the same kernels in the same order)."""
    from hf_paged.execution.patches.fused_layers import _FusedDecoderLayer

    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=128, enable_prefix_caching=False, kv_cache_dtype="int8")
    if not engine.plan.one_call_layers:
        engine.close()
        pytest.skip(f"no one-call decode layers here ({engine.plan})")
    took = []  # per call: (ran as one call, the step was decode-only)
    real = _FusedDecoderLayer._decode_in_one_call

    def spy(self, hidden_states, position_embeddings, meta):
        out = real(self, hidden_states, position_embeddings, meta)
        took.append((out is not None, meta.num_decodes == meta.num_seqs))
        return out

    monkeypatch.setattr(_FusedDecoderLayer, "_decode_in_one_call", spy)
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True, ignore_eos=True)
    runs = []
    for one_call in (True, False):
        for layer in engine.runner.forwards.values():
            if isinstance(layer, _FusedDecoderLayer):
                layer.one_call = one_call
        runs.append([(o.token_ids, o.logprobs) for o in engine.generate(chat_ids[:3], params, use_tqdm=False)])
        if one_call:  # every layer of every decode-only step ran as one call
            decode_only = [ran for ran, decodes in took if decodes]
            assert all(decode_only) and len(decode_only) == (params.max_new_tokens - 1) * model.config.num_hidden_layers
    engine.close()
    assert runs[0] == runs[1]


# ---- Triton, in the interpreter (a fresh process: triton must see TRITON_INTERPRET=1 before its first import) -------
_TRITON_CHILD = r"""
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
import test_kv_cache_int8 as t
from hf_paged.execution.kernels import dispatch
from hf_paged.execution.kernels.cache_ops import write_kv
from hf_paged.execution.kernels.triton_cache_ops import write_kv_triton
from hf_paged.execution.kernels.triton_paged_attention import paged_attention_triton
from hf_paged.execution.kv_cache import KVCache
from hf_paged.execution.plan import build_plan, default_plan

for dtype in (torch.float32, torch.bfloat16):
    # The cache write: the bits of the PyTorch write.
    g = torch.Generator().manual_seed(7)
    key = (torch.randn(3, 21, 40, generator=g) * 2).to(dtype).transpose(0, 1)
    value = torch.randn(21, 3, 40, generator=g).to(dtype)
    key[4] = 0.0
    slots = torch.randperm(6 * 8, generator=g)[:21]
    ref, out = t._caches(6, 8, 3, 40), t._caches(6, 8, 3, 40)
    write_kv(ref[0], ref[1], key, value, slots, ref[2], ref[3])
    write_kv_triton(out[0], out[1], key, value, slots, out[2], out[3])
    assert all(torch.equal(a, b) for a, b in zip(ref, out)), "triton int8 write differs"
    # Attention: decodes (one split and several) and prompt chunks, windowed and soft-capped too.
    query, kc, vc, ks, vs, meta, _ = t._int8_step([5, 33, 40, 24], [1, 1, 9, 24], 6, 2, 32, 8, dtype, seed=11)
    for window, softcap, splits in ((None, None, 1), (6, 10.0, 3)):
        out = paged_attention_triton(query, kc, vc, meta, t.SCALE, window, softcap, num_splits=splits,
                                     key_scales=ks, value_scales=vs)
        t._close_triton(out, t._torch_int8(query, kc, vc, ks, vs, meta, window, softcap))
    # Block copies through the dispatch with a Triton plan carry the scales.
    kv = torch.stack([kc, vc]).unsqueeze(0).contiguous()
    scales = torch.stack([ks, vs]).unsqueeze(0).contiguous()
    src = int(meta.block_tables[1, 0])
    dispatch.copy_blocks(kv, torch.tensor([[src, kc.shape[0] - 1]]), build_plan("cpu", dtype, triton=True,
                         pack_weights=False), scales=scales)
    assert torch.equal(kv[0, 1, -1], vc[src]) and torch.equal(scales[0, 0, -1], ks[src]), "scales not copied"
print("ok")
"""


def _close_triton(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 within 1e-5; bf16 within 2e-3 plus half a bf16 ulp (``test_triton_kernels``'s tolerance)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        return
    _, exponent = torch.frexp(ref)
    half_ulp = torch.ldexp(torch.ones_like(ref), exponent - 9)
    err = (out.float() - ref).abs()
    assert bool((err <= 2e-3 + 2e-3 * ref.abs() + half_ulp).all()), f"max err {err.max().item():.3g}"


def test_triton_int8_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_PAGED_FORCE")}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _TRITON_CHILD], env=env, capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), output


# ---- the engine and PagedCache -------------------------------------------------------------------------------------
def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_engine_int8_greedy_agrees_with_full_precision(smollm2, chat_ids):
    """SmolLM2 in fp32: greedy tokens with int8 K/V against fp32 K/V. Quantization moves the logits slightly, so a
    near-tie can flip a token (and the rest of that answer with it): most answers agree, position by position."""
    model, tok = smollm2
    prompts, new = chat_ids[:4], 16
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    outs, blocks = {}, {}
    for kv in ("auto", "int8"):
        engine = LLMEngine(model, tok, memory_bytes=64 << 20, kv_cache_dtype=kv)
        assert engine.plan.kv_cache_dtype == kv
        assert f"kv_cache={'int8' if kv == 'int8' else 'float32'}" in str(engine.plan)
        outs[kv] = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        assert engine.kv_cache.quantized == (kv == "int8") and engine.kv_cache.kv_cache_dtype == kv
        assert engine.pool.num_blocks == engine.kv_cache.num_blocks
        blocks[kv] = engine.pool.num_blocks
        engine.close()
        assert engine.kv_cache.kv.numel() == 0
    assert blocks["int8"] > 3.5 * blocks["auto"]  # 64 + 4 bytes a row instead of 256
    first = [_first_divergence(a, b) for a, b in zip(outs["auto"], outs["int8"])]
    equal = sum(x == y for a, b in zip(outs["auto"], outs["int8"]) for x, y in zip(a, b)) / (new * len(prompts))
    assert sum(f == new for f in first) >= len(prompts) // 2 and sum(first) / len(first) >= new / 2, first
    assert equal >= 0.7, (equal, first)


def test_engine_int8_sharing_is_exact_and_other_features_work(tiny_model_dir):
    """A tiny Llama with int8 K/V: n samples and beams that share blocks (copy-on-write of int8 blocks and their
    scales) give exactly what copying every block gives; prefix-cache hits, preemption and chunked prefill give
    what a plain run gives on most tokens; every block is free afterwards."""
    model = build_tiny_model("llama", tiny_model_dir / "int8")
    prompts = tiny_prompts(6, seed=5, low=20, high=60)
    samples = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=1, ignore_eos=True)
    beams = SamplingParams(max_new_tokens=10, temperature=0, num_beams=3, num_return_sequences=2, ignore_eos=True)
    shared = {}
    for share in (True, False):
        engine = LLMEngine(model, None, num_blocks=400, enable_prefix_caching=False, share_blocks=share,
                           kv_cache_dtype="int8")
        shared[share] = [[s.token_ids for s in o.samples] for o in engine.generate(prompts[:3], samples,
                                                                                    use_tqdm=False)]
        shared[share] += [[s.token_ids for s in o.samples] for o in engine.generate(prompts[:3], beams,
                                                                                     use_tqdm=False)]
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        engine.close()
    assert shared[True] == shared[False]

    greedy = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    plain = LLMEngine(model, None, num_blocks=400, enable_prefix_caching=False, kv_cache_dtype="int8")
    ref = [o.token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    plain.close()
    variants = {"prefix cache": dict(num_blocks=400), "preemption": dict(num_blocks=14, max_num_seqs=6),
                "chunked prefill": dict(num_blocks=400, max_num_batched_tokens=8)}
    for name, options in variants.items():
        engine = LLMEngine(model, None, kv_cache_dtype="int8", **options)
        if name == "prefix cache":
            engine.generate([p[:32] for p in prompts], SamplingParams(max_new_tokens=1), use_tqdm=False)
        outs = [o.token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
        if name == "prefix cache":
            assert engine.pool.prefix_hits > 0
        if name == "preemption":
            assert engine.metrics.preemptions > 0
        equal = sum(x == y for a, b in zip(ref, outs) for x, y in zip(a, b)) / sum(map(len, ref))
        assert all(len(o) == 20 for o in outs) and equal >= 0.8, (name, equal)
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        engine.close()


def test_paged_cache_int8_under_hf_generate(smollm2, chat_ids):
    """HF's own generate (greedy, and beam search with its reorders) on an int8 PagedCache."""
    model, tok = smollm2
    ids = torch.tensor([chat_ids[2]])
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    with PagedCache(model, kv_cache_dtype="int8") as cache:
        assert cache.kv_cache.quantized and cache.plan.kv_cache_dtype == "int8"
        ours = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)[0, ids.shape[1]:]
    assert _first_divergence(plain, ours.tolist()) >= 6
    with PagedCache(model, num_blocks=64, kv_cache_dtype="int8") as cache:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, num_beams=3, past_key_values=cache)
        assert out.shape[0] == 1 and cache.num_blocks_in_use > 0
    assert cache.pool.num_free_blocks == cache.pool.num_blocks


# ---- the option ---------------------------------------------------------------------------------------------------
def test_bad_kv_cache_dtype_is_refused_naming_the_option(smollm2):
    model, tok = smollm2
    for bad in ("fp8", "INT8", 8, None, torch.int8):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig.from_options({"kv_cache_dtype": bad})
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, tok, num_blocks=8, kv_cache_dtype="float8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        hf_paged.wrap(model, tok, kv_cache_dtype="int4")
    assert "generate" not in model.__dict__  # nothing was wrapped
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PagedCache(model, num_blocks=4, kv_cache_dtype="bf16")
    EngineConfig.from_options({"kv_cache_dtype": "auto"})
    EngineConfig.from_options({"kv_cache_dtype": "int8"})
