"""Paged decode attention and the cache write on the CPU as C kernels (``csrc/paged_decode_attention.c``); see "CPU C
kernels" in docs/architecture.md.

The kernel reads K/V once, straight from the blocks (one OpenMP task per sequence and KV head), where the PyTorch path
gathers them first. :class:`DecodePlan` is its call with the step's arguments converted once and shared by all layers
(:class:`PagedCall`, shared with the prefill kernel); :func:`write_kv_cpu` writes a step's new K/V rows in one call.
Values may be of another width than the keys (the output has theirs); chunked attention and attention sinks (fp32 logits
``[H]``, given per call since every layer has its own) are arguments. Int8 caches (fp32 scales ``[num_blocks, KVH,
block_size]``, see ``cache_ops``) are quantized on write and read as stored, the scales applied to the scores and the
probabilities; with AVX512-VNNI the dot products are integer (the scaled query and the probabilities rounded to int16,
relative 2**-16), elsewhere rows are widened to fp32 in registers.
Calls pass raw ``data_ptr()``s (ctypes drops the GIL); the engine's plan decides whether they are used.
"""

from __future__ import annotations

import torch

from . import cpu_library

__all__ = ["available", "decode_attention_cpu", "DecodePlan", "write_kv_cpu", "library_path", "build_seconds"]


def available() -> bool:
    """Whether :func:`decode_attention_cpu` can run here (builds the library on the first call)."""
    return cpu_library.available()


library_path = cpu_library.library_path
build_seconds = cpu_library.build_seconds

_DTYPES = (torch.float32, torch.bfloat16)


def _scales_fit(cache: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether ``scales`` are the contiguous fp32 ``[num_blocks, KVH, block_size]`` scales of int8 ``cache``."""
    nb, bs, kvh, _ = cache.shape
    return (scales is not None and scales.dtype == torch.float32 and scales.device.type == "cpu"
            and scales.is_contiguous() and scales.shape == (nb, kvh, bs))


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> bool:
    """Whether these tensors can take the kernel (CPU, fp32 or bf16 query, caches of its dtype or int8 with their
    scales, all contiguous; values of any width)."""
    if key_cache.dtype == torch.int8:
        caches_ok = (value_cache.dtype == torch.int8 and _scales_fit(key_cache, key_scales)
                     and _scales_fit(value_cache, value_scales))
    else:
        caches_ok = key_cache.dtype == query.dtype and value_cache.dtype == query.dtype and key_scales is None
    return (query.device.type == "cpu" and key_cache.device.type == "cpu" and query.dtype in _DTYPES and caches_ok
            and key_cache.is_contiguous() and value_cache.is_contiguous()
            and key_cache.shape[:3] == value_cache.shape[:3] and query.shape[-1] == key_cache.shape[-1]
            and query.shape[1] % key_cache.shape[2] == 0 and cpu_library.loaded())


def decode_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float,
                         sliding_window: int | None = None, softcap: float | None = None,
                         out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                         value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                         chunk: int | None = None) -> torch.Tensor:
    """One query token per sequence: query ``[D, H, hd]`` (sequence i at position ``kv_lens[i] - 1``, its K/V already in
    the caches ``[num_blocks, block_size, KVH, hd]`` / ``[..., hd_v]``), block_tables ``[D, >= blocks]``, kv_lens
    ``[D]`` -> ``[D, H, hd_v]`` in the query's dtype (into ``out`` when given: any strides, contiguous last dim). fp32
    or bf16; caches in the query's dtype or int8 with ``key_scales`` / ``value_scales``; fp32 accumulation; ``sinks``
    ``[H]`` fp32 logits; ``chunk`` a chunk size."""
    if cpu_library.load() is None:
        raise RuntimeError("the C decode-attention kernel is not available")
    quantized = key_cache.dtype == torch.int8
    if quantized:
        if (query.dtype not in _DTYPES or value_cache.dtype != torch.int8
                or not (_scales_fit(key_cache, key_scales) and _scales_fit(value_cache, value_scales))):
            raise TypeError("int8 caches need an fp32 or bf16 query and contiguous fp32 scales "
                            "[num_blocks, KVH, block_size] for both")
    elif query.dtype not in _DTYPES or key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise TypeError(f"dtypes {query.dtype}/{key_cache.dtype}/{value_cache.dtype}: need fp32 or bf16, all equal")
    tensors = (query, key_cache, value_cache, block_tables, kv_lens) + (() if out is None else (out,))
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("decode_attention_cpu takes CPU tensors only")
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, kv_heads, hd = key_cache.shape
    if hd != head_dim or num_heads % kv_heads or value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(f"shapes: query {tuple(query.shape)}, caches {tuple(key_cache.shape)}")
    if block_tables.shape[0] < num_seqs or kv_lens.shape[0] < num_seqs:
        raise ValueError("block_tables / kv_lens have fewer rows than the query")
    key_cache = key_cache.contiguous()
    value_cache = value_cache.contiguous()
    if query.stride(2) != 1:
        query = query.contiguous()
    if block_tables.dtype != torch.int64 or block_tables.stride(1) != 1:
        block_tables = block_tables.to(torch.int64).contiguous()
    if kv_lens.dtype != torch.int32 or not kv_lens.is_contiguous():
        kv_lens = kv_lens.to(torch.int32).contiguous()
    shape = (num_seqs, num_heads, value_cache.shape[-1])
    if out is None:
        out = torch.empty(shape, dtype=query.dtype)
    elif out.shape != shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError("out must be [D, H, hd_v] in the query's dtype with a contiguous last dim")
    if num_seqs:
        plan = DecodePlan(block_tables[:num_seqs], kv_lens[:num_seqs], num_heads, kv_heads, head_dim, block_size,
                          scale, sliding_window, softcap, query.dtype, quantized, value_cache.shape[-1], chunk)
        plan(query, key_cache, value_cache, out, key_scales, value_scales, sinks)
    return out


class PagedCall:
    """A C paged-attention call with what every layer of a step shares built once: the sequences (``hf_seqs_t``: block
    tables, lengths) and the scoring (``hf_attention_t``: heads, scale, window, softcap, dtype). A layer's call sets its
    caches and passes its query and output. Subclasses name their ``label`` (the profiler's row)."""

    def __init__(self, fn, seqs, attention, dtype: torch.dtype, quantized: bool, keep: tuple) -> None:
        self.fn, self.seqs, self.attention, self.quantized = fn, seqs, attention, quantized
        attention.bf16 = int(dtype == torch.bfloat16)
        self._keep = keep  # the tensors the structs point into, kept alive

    def _run(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
             key_scales: torch.Tensor | None, value_scales: torch.Tensor | None,
             sinks: torch.Tensor | None = None) -> None:
        a = self.attention
        a.key_cache, a.value_cache = key_cache.data_ptr(), value_cache.data_ptr()
        if sinks is not None and (sinks.dtype != torch.float32 or sinks.shape != (a.H,) or not sinks.is_contiguous()
                                  or sinks.device.type != "cpu"):
            raise ValueError(f"sinks must be a contiguous fp32 CPU tensor of {a.H} logits")
        a.sinks = None if sinks is None else sinks.data_ptr()
        if self.quantized:
            if key_scales is None or value_scales is None:
                raise ValueError("an int8 cache's plan needs key_scales and value_scales")
            a.key_scales, a.value_scales = key_scales.data_ptr(), value_scales.data_ptr()
        args = (a, self.seqs, query.data_ptr(), query.stride(0), query.stride(1), out.data_ptr(), out.stride(0),
                out.stride(1), torch.get_num_threads())
        rc = cpu_library.call_profiled(self.label, self.fn, args)
        if rc != 0:
            raise RuntimeError(f"{self.label} failed ({rc})")


class DecodePlan(PagedCall):
    """:func:`decode_attention_cpu` with what is the same for every layer of a step checked and converted once: a layer
    passes only its query, caches (int8: and scales) and output. :meth:`for_step` builds it, or returns None where the
    kernel cannot run."""

    label = "hf_paged::paged_decode_attention"

    def __init__(self, block_tables: torch.Tensor, kv_lens: torch.Tensor, num_heads: int, kv_heads: int,
                 head_dim: int, block_size: int, scale: float, sliding_window: int | None,
                 softcap: float | None, dtype: torch.dtype, quantized: bool = False, head_dim_v: int | None = None,
                 chunk: int | None = None) -> None:
        seqs = cpu_library.STRUCTS["hf_seqs_t"](block_tables=block_tables.data_ptr(), bt_stride=block_tables.stride(0),
                                                kv_lens=kv_lens.data_ptr(), num_seqs=block_tables.shape[0])
        attention = cpu_library.STRUCTS["hf_attention_t"](
            H=num_heads, KVH=kv_heads, hd=head_dim, block_size=block_size, window=int(sliding_window or 0),
            scale=float(scale), softcap=float(softcap or 0.0), hd_v=head_dim_v or head_dim, chunk=int(chunk or 0))
        super().__init__(cpu_library.load().hf_paged_decode_attention, seqs, attention, dtype, quantized,
                         (block_tables, kv_lens))
        self.in_shape = (block_tables.shape[0], num_heads, head_dim)
        self.shape = (block_tables.shape[0], num_heads, head_dim_v or head_dim)

    @classmethod
    def for_step(cls, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, kv_lens: torch.Tensor, scale: float, sliding_window: int | None,
                 softcap: float | None, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None, chunk: int | None = None) -> "DecodePlan | None":
        if not supports(query, key_cache, value_cache, key_scales, value_scales):
            return None
        return cls(block_tables.to(torch.int64).contiguous(), kv_lens.to(torch.int32).contiguous(), query.shape[1],
                   key_cache.shape[2], query.shape[2], key_cache.shape[1], scale, sliding_window, softcap,
                   query.dtype, key_cache.dtype == torch.int8, value_cache.shape[-1], chunk)

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 out: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> None:
        """query ``[D, H, hd]`` / out ``[D, H, hd_v]`` with a contiguous last dim; caches of the plan's shape and
        dtype (int8 caches with their scales); ``sinks`` the layer's ``[H]`` fp32 logits."""
        if query.shape != self.in_shape or out.shape != self.shape or query.stride(2) != 1 or out.stride(2) != 1:
            raise ValueError(f"query {tuple(query.shape)} / out {tuple(out.shape)}: the plan is for "
                             f"{self.in_shape} -> {self.shape}")
        self._run(query, key_cache, value_cache, out, key_scales, value_scales, sinks)


def write_kv_cpu(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None) -> bool:
    """``cache_ops.write_kv`` in one C call (int8 caches quantized as ``cache_ops.quantize_int8`` does); False, with
    nothing written, where it does not apply (not CPU, dtypes differ, non-contiguous, no kernel)."""
    quantized = key_scales is not None
    if quantized:
        caches_ok = (key_cache.dtype == value_cache.dtype == torch.int8 and key.dtype in _DTYPES
                     and _scales_fit(key_cache, key_scales) and _scales_fit(value_cache, value_scales))
    else:
        caches_ok = key.dtype == key_cache.dtype == value_cache.dtype
    if not (caches_ok and key.dtype == value.dtype and key.device.type == "cpu"
            and key_cache.is_contiguous() and value_cache.is_contiguous() and key.stride(2) == 1
            and value.stride(2) == 1 and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
            and key.shape[:2] == value.shape[:2] and key.shape[1:] == key_cache.shape[2:]
            and value.shape[1:] == value_cache.shape[2:] and cpu_library.loaded()):
        return False
    cpu_library.call_profiled("hf_paged::write_kv", _write,
                              (key_cache, value_cache, key, value, slot_mapping, key_scales, value_scales))
    return True


def _write(key_cache, value_cache, key, value, slot_mapping, key_scales, value_scales) -> None:
    lib = cpu_library.load()
    if key_scales is not None:
        lib.paged_write_kv_i8(key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0),
                              value.stride(1), slot_mapping.data_ptr(), key.shape[0], key_cache.data_ptr(),
                              value_cache.data_ptr(), key_scales.data_ptr(), value_scales.data_ptr(), key.shape[1],
                              key.shape[2], value.shape[2], key_cache.shape[1], int(key.dtype == torch.bfloat16))
        return
    lib.paged_write_kv(key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0),
                       value.stride(1), slot_mapping.data_ptr(), key.shape[0], key_cache.data_ptr(),
                       value_cache.data_ptr(), key.shape[1], key.shape[2], value.shape[2], key.element_size())
