"""The C decode-attention kernel (``hf_paged.execution.kernels.cpu_decode_attention``) against the token-by-token
oracle ``paged_attention_naive`` and against the PyTorch path it replaces, fp32 and bf16, over ragged
lengths (block boundaries, length 1), GQA ratios, head dims, block sizes, sliding windows and soft-capping;
and the fallback (``HF_PAGED_CPU_KERNEL=0``, or no compiler) giving the same results."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_paged.execution.plan import build_plan, default_plan

from hf_paged.execution.kernels import cpu_decode_attention as cpu_kernel
from hf_paged.execution.kernels import cpu_isa
from hf_paged.execution.kernels import cpu_prefill_attention as cpu_prefill
from attention_oracle import paged_attention_naive
from hf_paged.execution.kernels.paged_attention import PagedAttentionMetadata, paged_attention

from conftest import needs_cpu_kernels

needs_kernel = needs_cpu_kernels

SCALE = 0.125


def _lengths(block_size: int, n: int, seed: int) -> list[int]:
    """Lengths 1, exactly on and one past block boundaries, then random ones."""
    fixed = [1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1, block_size - 1, 3]
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(1, 6 * block_size, (max(0, n - len(fixed)),), generator=g).tolist()
    return (fixed + rand)[:n]


def _make(lengths, num_heads, kv_heads, head_dim, block_size, dtype, seed=0, q_lens=None, head_dim_v=None):
    """Random caches, shuffled block tables and a query; ``q_lens`` (default all 1) > 1 makes prefill chunks
    (after the decodes); values ``head_dim_v`` wide (default: the keys' width)."""
    g = torch.Generator().manual_seed(seed)
    q_lens = q_lens or [1] * len(lengths)
    blocks = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks) + 3
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim_v or head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks)
    tables, at = [], 0
    for b in blocks:
        tables.append(perm[at : at + b] + [0] * (width - b))
        at += b
    num_tokens = sum(q_lens)
    # A transposed view, as the attention patch hands it: [T, H, D] with strides (D, T*D, 1).
    query = torch.randn(num_heads, num_tokens, head_dim, generator=g).to(dtype).transpose(0, 1)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1:
        num_decodes += 1
    meta = PagedAttentionMetadata(
        slot_mapping=torch.zeros(num_tokens, dtype=torch.long), block_tables=torch.tensor(tables, dtype=torch.long),
        kv_lens=torch.tensor(lengths, dtype=torch.int32), cu_seqlens_q=torch.tensor(cu, dtype=torch.long),
        num_decodes=num_decodes, kv_lens_list=list(lengths), q_lens_list=list(q_lens), block_size=block_size,
        plan=default_plan(query))
    return query, key_cache, value_cache, meta


def _naive(query, key_cache, value_cache, meta, window, softcap):
    return paged_attention_naive(query.float(), key_cache.float(), value_cache.float(), meta.block_tables,
                                 meta.kv_lens_list, meta.cu_seqlens_q.tolist(), SCALE, window, softcap)


def _torch_path(query, key_cache, value_cache, meta, window, softcap, monkeypatch):
    """The PyTorch path: the same step under a plan without the C kernels."""
    plan = build_plan("cpu", query.dtype, cpu_kernels=False, pack_weights=False)
    assert not plan.cpu_kernels
    meta = dataclasses.replace(meta, plan=plan, _masks={}, _decode_tables={})
    return paged_attention(query, key_cache, value_cache, meta, SCALE, window, softcap)


def _kernel(query, key_cache, value_cache, meta, window, softcap):
    d = meta.num_decodes
    return cpu_kernel.decode_attention_cpu(query[:d], key_cache, value_cache, meta.block_tables[:d],
                                           meta.kv_lens[:d], SCALE, window, softcap)


def _bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """|out - ref| <= 2e-3 + 2**-9 + half a bf16 ulp of the reference value. The 2**-9: where the CPU has
    AVX512-BF16, the kernel weighs V by the softmax probabilities rounded to bf16 (as vLLM's and IPEX's bf16 CPU
    attention do), a relative error of up to 2**-8 per weight, which adds sum_k p_k d_k (v_k - out) / sum_k p_k:
    with these unit-variance values, |out - ref| - half an ulp reaches 2.6e-3 in the cases here and 3.8e-3 over
    720 configurations (these cases, 20 seeds)."""
    ref = ref.float()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -126)))
    half_ulp = torch.exp2(exponent - 8)
    err = (out.float() - ref).abs()
    bound = 2e-3 + 2.0 ** -9 + half_ulp
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}, max err {err.max().item():.3g}"


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 outputs within 1e-5 of the reference; bf16 outputs within bf16 rounding of it."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:
        _bf16_close(out, ref)


CASES = [(1, 64, 16), (3, 64, 8), (8, 64, 32), (1, 128, 32), (3, 128, 16), (8, 128, 8)]
VARIANTS = [(None, None), (5, None), (None, 20.0), (13, 5.0)]  # (sliding window, softcap)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio,head_dim,block_size", CASES)
@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_kernel_matches_oracle_and_torch_path(dtype, ratio, head_dim, block_size, window, softcap, monkeypatch):
    """fp32: within 1e-5 of the oracle and of the PyTorch path. bf16 inputs: within bf16 rounding of the fp32
    oracle and of the PyTorch path run in fp32 on the same (bf16-valued) inputs."""
    kv_heads = 2 if ratio < 8 else 1
    seed = ratio * 1000 + head_dim + block_size if dtype == torch.float32 else ratio * 7 + head_dim + block_size
    lengths = _lengths(block_size, 10, seed=seed)
    q, kc, vc, meta = _make(lengths, ratio * kv_heads, kv_heads, head_dim, block_size, dtype)
    out = _kernel(q, kc, vc, meta, window, softcap)
    assert out.dtype == dtype
    _close(out, _naive(q, kc, vc, meta, window, softcap))
    # bf16: against the PyTorch path run in fp32 on the same (bf16-valued) inputs.
    _close(out, _torch_path(q.float(), kc.float(), vc.float(), meta, window, softcap, monkeypatch))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 40, 96])  # one vector, not a multiple of the vector width, odd count
def test_other_head_dims(dtype, head_dim):
    lengths = _lengths(16, 9, seed=head_dim)
    q, kc, vc, meta = _make(lengths, 6, 2, head_dim, 16, dtype)
    for window, softcap in VARIANTS:
        _close(_kernel(q, kc, vc, meta, window, softcap), _naive(q, kc, vc, meta, window, softcap))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs", [3, 64])  # few sequences: a task per KV head; many: per sequence
def test_many_sequences_multithreaded(dtype, num_seqs):
    g = torch.Generator().manual_seed(num_seqs)
    lengths = torch.randint(100, 300, (num_seqs,), generator=g).tolist()
    lengths[:4] = [256, 257, 1, 255][: len(lengths[:4])]
    q, kc, vc, meta = _make(lengths, 9, 3, 64, 16, dtype, seed=num_seqs)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            _close(_kernel(q, kc, vc, meta, None, None), _naive(q, kc, vc, meta, None, None))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_window_edges_and_large_scores():
    lengths = [1, 2, 16, 17, 40]
    q, kc, vc, meta = _make(lengths, 4, 2, 64, 16, torch.float32)
    for window in (1, 2, 16, 17, 100):
        torch.testing.assert_close(_kernel(q, kc, vc, meta, window, None), _naive(q, kc, vc, meta, window, None),
                                   atol=1e-5, rtol=0)
    # Scores spread over ~hundreds: the softmax must subtract the max (and exp must underflow to ~0).
    big = q * 40
    torch.testing.assert_close(_kernel(big, kc, vc, meta, None, None), _naive(big, kc, vc, meta, None, None),
                               atol=1e-5, rtol=0)


@needs_kernel
def test_out_argument_and_strides():
    lengths = _lengths(8, 8, seed=3)
    q, kc, vc, meta = _make(lengths, 6, 3, 64, 8, torch.float32)
    out = torch.full((6, 8, 64), float("nan")).transpose(0, 1)  # [D, H, hd], strided
    res = cpu_kernel.decode_attention_cpu(q, kc, vc, meta.block_tables, meta.kv_lens, SCALE, out=out)
    assert res is out
    torch.testing.assert_close(out, _naive(q, kc, vc, meta, None, None), atol=1e-5, rtol=0)
    # int64 lengths and a non-contiguous block table are accepted too.
    wide = torch.cat([meta.block_tables, meta.block_tables], 1)[:, : meta.block_tables.shape[1]]
    res = cpu_kernel.decode_attention_cpu(q.contiguous(), kc, vc, wide, meta.kv_lens.long(), SCALE)
    torch.testing.assert_close(res, out)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_mixed_step_kernel_vs_fallback(dtype, monkeypatch):
    """A whole step (decodes then prefill chunks) through ``paged_attention``: kernel on and off agree, and
    the kernel really is taken when on and not when off."""
    lengths = [5, 16, 17, 1, 33, 40, 24]
    q_lens = [1, 1, 1, 1, 1, 7, 24]
    q, kc, vc, meta = _make(lengths, 6, 2, 64, 16, dtype, q_lens=q_lens)
    without_kernels = dataclasses.replace(meta, plan=build_plan("cpu", dtype, cpu_kernels=False, pack_weights=False),
                                          _masks={}, _decode_tables={})
    calls, prefill_calls = [], []
    real = cpu_kernel.DecodePlan.__call__
    monkeypatch.setattr(cpu_kernel.DecodePlan, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_prefill = cpu_prefill.PrefillPlan.__call__
    monkeypatch.setattr(cpu_prefill.PrefillPlan, "__call__",
                        lambda *a, **k: prefill_calls.append(1) or real_prefill(*a, **k))
    for window, softcap in VARIANTS:
        on = paged_attention(q, kc, vc, meta, SCALE, window, softcap)
        assert calls, "the kernel was not used"
        # The prefill kernel takes neither windows nor soft-capping.
        assert bool(prefill_calls) == (window is None and softcap is None)
        calls.clear()
        prefill_calls.clear()
        off = paged_attention(q, kc, vc, without_kernels, SCALE, window, softcap)
        assert not calls and not prefill_calls, "a kernel was used by a plan without them"
        ref = _naive(q, kc, vc, meta, window, softcap)
        if dtype == torch.float32:
            torch.testing.assert_close(on, off, atol=1e-5, rtol=0)
            torch.testing.assert_close(on, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(off, ref, atol=1e-5, rtol=0)
        else:
            _bf16_close(on, ref)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,head_dim_v,sinks,chunk,window", [
    (64, 64, True, None, None),  # sinks: the vector (and AVX512-BF16) paths, decode and prefill
    (34, 34, True, None, 9),  # sinks on the scalar path, with a window
    (128, 64, False, None, None),  # values narrower than the keys: decode's scalar path, the prefill kernel
    (64, 128, True, None, None),  # values wider, with sinks
    (24, 40, True, 16, None),  # chunked attention, values wider, sinks
    (64, 64, False, 24, None),  # chunked attention on the vector path
])
def test_sinks_value_width_chunks_mixed_step(dtype, head_dim, head_dim_v, sinks, chunk, window, monkeypatch):
    """A step of decodes and prefill chunks (GQA 3) through ``paged_attention`` with attention sinks, values of
    another width than the keys and chunked attention: the C kernels (taken where they apply: decode always, prefill
    without windows or chunks) and the PyTorch path against the token-by-token oracle."""
    lengths, q_lens = [5, 16, 17, 1, 33, 40, 70], [1, 1, 1, 1, 1, 7, 70]
    q, kc, vc, meta = _make(lengths, 6, 2, head_dim, 16, dtype, q_lens=q_lens, head_dim_v=head_dim_v)
    logits = (torch.randn(6, generator=torch.Generator().manual_seed(4)) * 2 + 1) if sinks else None
    without_kernels = dataclasses.replace(meta, plan=build_plan("cpu", dtype, cpu_kernels=False, pack_weights=False),
                                          _masks={}, _decode_tables={})
    calls = []
    for cls in (cpu_kernel.DecodePlan, cpu_prefill.PrefillPlan):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda *a, _r=real, _c=cls, **k: calls.append(_c) or _r(*a, **k))
    on = paged_attention(q, kc, vc, meta, SCALE, window, None, sinks=logits, chunk=chunk)
    prefill_kernel = window is None and chunk is None and head_dim % 64 == 0 and head_dim_v % 64 == 0
    assert cpu_kernel.DecodePlan in calls and (cpu_prefill.PrefillPlan in calls) == prefill_kernel
    calls.clear()
    off = paged_attention(q, kc, vc, without_kernels, SCALE, window, None, sinks=logits, chunk=chunk)
    assert not calls and on.shape == off.shape == (q.shape[0], 6, head_dim_v)
    ref = paged_attention_naive(q.float(), kc.float(), vc.float(), meta.block_tables, meta.kv_lens_list,
                                meta.cu_seqlens_q.tolist(), SCALE, window, None, logits, chunk)
    _close(on, ref)
    _close(off, ref)


def _prefill_kernel(query, key_cache, value_cache, meta):
    """The prefill sequences of ``meta`` through the C prefill kernel (the decode rows of the output left 0)."""
    d, cu = meta.num_decodes, meta.cu_seqlens_q.tolist()
    plan = cpu_prefill.PrefillPlan.for_step(query, key_cache, value_cache, meta.block_tables[d:], cu[d:-1],
                                            meta.q_lens_list[d:], meta.kv_lens_list[d:], SCALE)
    assert plan is not None
    out = torch.zeros(query.shape, dtype=query.dtype)
    plan(query, key_cache, value_cache, out)
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio,head_dim,block_size", CASES)
def test_prefill_kernel_matches_oracle(dtype, ratio, head_dim, block_size):
    """Whole prompts and later chunks (cached prefix), lengths on and off the block, key-tile (64) and query-unit
    (64 tokens) boundaries, GQA folding: the C prefill kernel against the naive oracle."""
    lengths = [1, 9, 64, 65, 200, 130, 128, 300]
    q_lens = [1, 9, 64, 65, 7, 130, 64, 129]  # 1-token prefill, whole prompts, chunks after a prefix
    q, kc, vc, meta = _make(lengths, 2 * ratio, 2, head_dim, block_size, dtype, q_lens=q_lens)
    meta.num_decodes = 0  # every sequence a prefill, the 1-token one included
    out = _prefill_kernel(q, kc, vc, meta)
    _close(out, _naive(q, kc, vc, meta, None, None))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_prefill_kernel_threads_agree(threads):
    """The result does not depend on the number of threads (each unit is computed by one thread, in one order)."""
    q, kc, vc, meta = _make([700, 90, 333], 9, 3, 64, 16, torch.float32, q_lens=[700, 50, 333])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _prefill_kernel(q, kc, vc, meta)
        torch.set_num_threads(threads)
        many = _prefill_kernel(q, kc, vc, meta)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@needs_kernel
def test_prefill_kernel_declines_what_it_does_not_take():
    """A head dim that is not a multiple of four vectors, int8 caches without scales, a window or soft-capping: no
    plan, and
    paged_attention keeps its PyTorch path (its result is the oracle's)."""
    q, kc, vc, meta = _make([40, 20], 4, 2, 40, 16, torch.float32, q_lens=[40, 5])
    assert cpu_prefill.PrefillPlan.for_step(q, kc, vc, meta.block_tables, [0, 40], [40, 5], [40, 20], SCALE) is None
    torch.testing.assert_close(paged_attention(q, kc, vc, meta, SCALE), _naive(q, kc, vc, meta, None, None),
                               atol=1e-5, rtol=0)
    q, kc, vc, meta = _make([40, 20], 4, 2, 64, 16, torch.float32, q_lens=[40, 5])
    assert meta.cpu_prefill_plan(q, kc, vc, SCALE, 8, None) is None
    assert meta.cpu_prefill_plan(q, kc, vc, SCALE, None, 30.0) is None
    assert meta.cpu_prefill_plan(q, kc.to(torch.int8), vc.to(torch.int8), SCALE, None, None) is None  # no scales
    assert meta.cpu_prefill_plan(q, kc, vc, SCALE, None, None) is not None


def test_fallback_without_kernel_matches_oracle(monkeypatch):
    """HF_PAGED_CPU_KERNEL=0: ``available()`` is False and the PyTorch path gives the oracle's result."""
    monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "0")
    assert not cpu_kernel.available()
    lengths = _lengths(16, 8, seed=11)
    q, kc, vc, meta = _make(lengths, 6, 2, 64, 16, torch.float32)
    for window, softcap in VARIANTS:
        out = paged_attention(q, kc, vc, meta, SCALE, window, softcap)
        torch.testing.assert_close(out, _naive(q, kc, vc, meta, window, softcap), atol=1e-5, rtol=0)


def _run_fresh(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_failed_build_means_unavailable_not_an_error(tmp_path):
    """A compiler that fails: importing works, ``available()`` is False, one warning, attention still works."""
    res = _run_fresh("""
        import torch
        from hf_paged.execution.kernels import cpu_decode_attention as k
        from hf_paged.execution.kernels.paged_attention import paged_attention
        assert not k.available()
        assert not k.available()
        print("OK")
    """, {"CC": "false", "HF_PAGED_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert res.stderr.count("not usable") == 1, res.stderr
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*tmp"))


@needs_kernel
def test_builds_into_the_cache_folder(tmp_path):
    """A fresh cache folder: the library is built there (by name with a hash), then reused. (Built at -O1, which the
    flags after the tier's override: where it is kept is the point here, not how fast it runs.)"""
    code = """
        from hf_paged.execution.kernels import cpu_decode_attention as k
        assert k.available()
        print(k.library_path().name, k.build_seconds())
    """
    env = {"HF_PAGED_CACHE": str(tmp_path), "HF_PAGED_CFLAGS": " ".join(cpu_isa.target_flags() + ["-O1"])}
    first = _run_fresh(code, env)
    assert first.returncode == 0, first.stderr
    name, seconds = first.stdout.split()
    assert name.startswith("hf_paged_cpu_") and (tmp_path / name).exists()
    assert seconds != "None"
    second = _run_fresh(code, env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [name, "None"]
    assert not list(tmp_path.glob(".*tmp"))


@needs_kernel
def test_rejects_bad_arguments():
    q, kc, vc, meta = _make([5, 9], 4, 2, 64, 8, torch.float32)
    with pytest.raises(TypeError):
        cpu_kernel.decode_attention_cpu(q.double(), kc, vc, meta.block_tables, meta.kv_lens, SCALE)
    with pytest.raises(ValueError):
        cpu_kernel.decode_attention_cpu(q, kc, vc, meta.block_tables, meta.kv_lens, SCALE, out=torch.empty(2, 4, 32))
    with pytest.raises(ValueError):
        cpu_kernel.decode_attention_cpu(q, kc, vc, meta.block_tables[:1], meta.kv_lens, SCALE)
    with pytest.raises(ValueError):
        cpu_kernel.decode_attention_cpu(q, kc, vc, meta.block_tables, meta.kv_lens, SCALE, out=q.new_empty(2, 4, 64,
                                                                                                         device="meta"))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_cache_write_equals_torch_write(dtype):
    from hf_paged.execution.kernels.cache_ops import write_kv

    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(12, 16, 3, 64, generator=g).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    # The layout HF hands over: [1, KVH, T, hd] transposed to [T, KVH, hd] (strided, head dim contiguous).
    key = torch.randn(1, 3, 20, 64, generator=g).to(dtype)[0].transpose(0, 1)
    value = torch.randn(1, 3, 20, 64, generator=g).to(dtype)[0].transpose(0, 1)
    slots = torch.randperm(12 * 16, generator=g)[:20]
    assert cpu_kernel.write_kv_cpu(caches[0], caches[1], key, value, slots)
    write_kv(expected[0], expected[1], key, value, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    # Mixed dtypes are not its job: nothing written, the caller keeps the PyTorch path.
    before = caches[0].clone()
    assert not cpu_kernel.write_kv_cpu(caches[0], caches[1], key.double(), value.double(), slots)
    assert torch.equal(caches[0], before)
