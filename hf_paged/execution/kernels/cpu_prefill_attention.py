"""Paged prefill attention on the CPU as a C kernel (``csrc/paged_prefill_attention.c``): flash attention that
reads K/V straight from the blocks.

The PyTorch CPU path gathers each prefill sequence's blocks into dense K/V and calls torch's CPU flash attention
once per sequence (twice for a later chunk of a prompt, merged by log-sum-exp). The C kernel takes all of a step's
prefill sequences in one call: work units of (sequence, KV head, query tile) with the query heads sharing the KV
head as extra rows, keys packed transposed per tile so that the scores are broadcast-FMAs, balanced over the OpenMP
threads largest first; in bf16 with AVX512-BF16 the products are ``vdpbf16ps`` (the probabilities rounded to bf16
for P.V, as the C decode kernel does). :class:`PrefillPlan` is that call with the per-step arguments converted once
and shared by all layers.

It serves fp32 and bf16 queries with caches of the query's dtype or int8 caches with their scales (dequantized as
each key tile is packed; the V scales applied to the probabilities), head dims that are a multiple of four vectors
(64 with AVX-512); no sliding window, no soft-capping: ``PrefillPlan.for_step`` returns None for those and the
caller keeps the PyTorch path.
"""

from __future__ import annotations

import torch

from . import cpu_library
from .cpu_decode_attention import _scales_fit

__all__ = ["PrefillPlan", "prefill_attention_cpu"]

_FUNCTIONS = {torch.float32: "paged_prefill_attention_f32", torch.bfloat16: "paged_prefill_attention_bf16"}
_FUNCTIONS_I8 = {torch.float32: "paged_prefill_attention_f32_i8", torch.bfloat16: "paged_prefill_attention_bf16_i8"}


def _head_dim_multiple() -> int:
    """The kernel's head-dim granule: four vectors of the library's width."""
    return 4 * cpu_library.load().paged_decode_attention_vector_width()


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> bool:
    """Whether these tensors can take the kernel (CPU, fp32 or bf16, caches of the query's dtype or int8 with their
    scales, contiguous)."""
    if key_cache.dtype == torch.int8:
        caches_ok = (value_cache.dtype == torch.int8 and _scales_fit(key_cache, key_scales)
                     and _scales_fit(value_cache, value_scales))
    else:
        caches_ok = key_cache.dtype == query.dtype and value_cache.dtype == query.dtype and key_scales is None
    return (query.device.type == "cpu" and key_cache.device.type == "cpu" and query.dtype in _FUNCTIONS
            and caches_ok and key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.shape == value_cache.shape
            and query.shape[-1] == key_cache.shape[-1] and query.shape[1] % key_cache.shape[2] == 0
            and cpu_library.loaded() and query.shape[-1] % _head_dim_multiple() == 0)


class PrefillPlan:
    """The kernel's call for one step's prefill sequences, the same for every layer: a layer's call passes only
    its query, caches and output (``[T, H, hd]``, the prefill rows included at the positions ``q_starts`` gives).
    Build it with :meth:`for_step`, which returns None where the kernel cannot run."""

    def __init__(self, fn, block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                 kv_lens: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                 scale: float, quantized: bool = False) -> None:
        self.fn = fn
        self.quantized = quantized
        # Kept alive: the kernel reads their memory.
        self.block_tables, self.q_starts, self.q_lens, self.kv_lens = block_tables, q_starts, q_lens, kv_lens
        self.tables = (block_tables.data_ptr(), block_tables.stride(0), q_starts.data_ptr(), q_lens.data_ptr(),
                       kv_lens.data_ptr(), block_tables.shape[0])
        self.tail = (num_heads, kv_heads, head_dim, block_size, float(scale))
        self.num_rows = int(q_starts[-1]) + int(q_lens[-1]) if len(q_starts) else 0

    @classmethod
    def for_step(cls, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, q_starts: list[int], q_lens: list[int], kv_lens: list[int],
                 scale: float, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None) -> "PrefillPlan | None":
        """``block_tables`` ``[S, >= blocks]`` and the lists describe the prefill sequences: sequence s's query
        rows are ``q_starts[s] .. + q_lens[s]``, the last ``q_lens[s]`` of its ``kv_lens[s]`` cached tokens."""
        if not supports(query, key_cache, value_cache, key_scales, value_scales):
            return None
        quantized = key_cache.dtype == torch.int8
        fn = getattr(cpu_library.load(), (_FUNCTIONS_I8 if quantized else _FUNCTIONS)[query.dtype])
        as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        return cls(fn, block_tables.to(torch.int64).contiguous(), as_i32(q_starts), as_i32(q_lens),
                   as_i32(kv_lens), query.shape[1], key_cache.shape[2], query.shape[2], key_cache.shape[1], scale,
                   quantized)

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 out: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None) -> None:
        """query / out ``[T, H, hd]`` with a contiguous last dim; caches of the plan's shape and dtype (int8 caches
        with their scales)."""
        if (query.shape[0] < self.num_rows or out.shape != query.shape or query.stride(2) != 1
                or out.stride(2) != 1 or out.dtype != query.dtype):
            raise ValueError(f"query {tuple(query.shape)} / out {tuple(out.shape)}: the plan needs "
                             f"{self.num_rows} rows and contiguous head dims")
        caches: tuple = (key_cache.data_ptr(), value_cache.data_ptr())
        if self.quantized:
            if key_scales is None or value_scales is None:
                raise ValueError("an int8 cache's plan needs key_scales and value_scales")
            caches += (key_scales.data_ptr(), value_scales.data_ptr())
        args = (query.data_ptr(), query.stride(0), query.stride(1), *caches, *self.tables, out.data_ptr(), out.stride(0), out.stride(1), *self.tail, torch.get_num_threads())
        rc = cpu_library.call_profiled("hf_paged::paged_prefill_attention", self.fn, args)
        if rc != 0:
            raise RuntimeError(f"paged_prefill_attention failed ({rc})")


def prefill_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, q_lens: list[int], kv_lens: list[int], scale: float,
                          key_scales: torch.Tensor | None = None,
                          value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """query ``[T, H, hd]``: the prefill sequences' tokens one after the other (sequence s has ``q_lens[s]``
    rows, the last of its ``kv_lens[s]`` cached tokens, K/V already in the caches) -> ``[T, H, hd]``, causal."""
    starts = [0]
    for n in q_lens[:-1]:
        starts.append(starts[-1] + n)
    plan = PrefillPlan.for_step(query, key_cache, value_cache, block_tables, starts, q_lens, kv_lens, scale,
                                key_scales, value_scales)
    if plan is None:
        raise TypeError("the C prefill-attention kernel does not take these tensors (see supports())")
    out = torch.empty_like(query)
    plan(query.contiguous() if query.stride(2) != 1 else query, key_cache, value_cache, out, key_scales, value_scales)
    return out
