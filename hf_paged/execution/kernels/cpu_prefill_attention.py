"""Paged prefill attention on the CPU as a C kernel (``csrc/paged_prefill_attention.c``): flash attention reading K/V
straight from the blocks, all of a step's prefill sequences in one call; see "CPU C kernels" in docs/architecture.md.

:class:`PrefillPlan` is that call with the step's arguments converted once and shared by all layers. In bf16 with
AVX512-BF16 the probabilities are rounded to bf16 for P.V, as in the C decode kernel. It takes fp32 or bf16 queries with
caches of their dtype or int8 with scales (dequantized as each key tile is packed; V scales applied to the
probabilities) and head dims (keys' and values', which may differ) that are a multiple of four vectors (64 with
AVX-512); attention sinks are a per-call argument; windows, chunking and soft-capping keep the PyTorch path
(``PrefillPlan.for_step`` returns None).
"""

from __future__ import annotations

import torch

from . import cpu_library
from .cpu_decode_attention import PagedCall
from .cpu_decode_attention import supports as _decode_supports

__all__ = ["PrefillPlan", "prefill_attention_cpu", "takes_head_dims"]


def _head_dim_multiple() -> int:
    """The kernel's head-dim granule: four vectors of the library's width."""
    return 4 * cpu_library.load().paged_decode_attention_vector_width()


def takes_head_dims(head_dim: int, head_dim_v: int) -> bool:
    """Whether the kernel is built here and takes keys and values of these widths."""
    return (cpu_library.load() is not None and head_dim % _head_dim_multiple() == 0
            and head_dim_v % _head_dim_multiple() == 0)


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> bool:
    """Whether these tensors can take the kernel: as the decode kernel (CPU, fp32 or bf16, caches of the query's
    dtype or int8 with their scales, contiguous), and a head dim the kernel's tiles take."""
    return (_decode_supports(query, key_cache, value_cache, key_scales, value_scales)
            and query.shape[-1] % _head_dim_multiple() == 0 and value_cache.shape[-1] % _head_dim_multiple() == 0)


class PrefillPlan(PagedCall):
    """The kernel's call for one step's prefill sequences, the same for every layer: a layer's call passes only
    its query, caches and output (``[T, H, hd]``, the prefill rows included at the positions ``q_starts`` gives).
    Build it with :meth:`for_step`, which returns None where the kernel cannot run."""

    label = "hf_paged::paged_prefill_attention"

    def __init__(self, block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                 kv_lens: torch.Tensor, num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                 scale: float, dtype: torch.dtype, quantized: bool = False, head_dim_v: int | None = None) -> None:
        seqs = cpu_library.STRUCTS["hf_seqs_t"](
            block_tables=block_tables.data_ptr(), bt_stride=block_tables.stride(0), kv_lens=kv_lens.data_ptr(),
            q_starts=q_starts.data_ptr(), q_lens=q_lens.data_ptr(), num_seqs=block_tables.shape[0])
        attention = cpu_library.STRUCTS["hf_attention_t"](H=num_heads, KVH=kv_heads, hd=head_dim,
                                                          block_size=block_size, scale=float(scale),
                                                          hd_v=head_dim_v or head_dim)
        super().__init__(cpu_library.load().hf_paged_prefill_attention, seqs, attention, dtype, quantized,
                         (block_tables, q_starts, q_lens, kv_lens))
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
        as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        return cls(block_tables.to(torch.int64).contiguous(), as_i32(q_starts), as_i32(q_lens), as_i32(kv_lens),
                   query.shape[1], key_cache.shape[2], query.shape[2], key_cache.shape[1], scale, query.dtype,
                   key_cache.dtype == torch.int8, value_cache.shape[-1])

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 out: torch.Tensor, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> None:
        """query ``[T, H, hd]`` / out ``[T, H, hd_v]`` with a contiguous last dim; caches of the plan's shape and
        dtype (int8 caches with their scales); ``sinks`` the layer's ``[H]`` fp32 logits."""
        if (query.shape[0] < self.num_rows or out.shape[:2] != query.shape[:2]
                or out.shape[2] != self.attention.hd_v or query.stride(2) != 1
                or out.stride(2) != 1 or out.dtype != query.dtype):
            raise ValueError(f"query {tuple(query.shape)} / out {tuple(out.shape)}: the plan needs "
                             f"{self.num_rows} rows, values {self.attention.hd_v} wide and contiguous head dims")
        self._run(query, key_cache, value_cache, out, key_scales, value_scales, sinks)


def prefill_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, q_lens: list[int], kv_lens: list[int], scale: float,
                          key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query ``[T, H, hd]``: the prefill sequences' tokens one after the other (sequence s has ``q_lens[s]``
    rows, the last of its ``kv_lens[s]`` cached tokens, K/V already in the caches) -> ``[T, H, hd_v]``, causal;
    ``sinks`` ``[H]`` fp32 attention-sink logits."""
    starts = [0]
    for n in q_lens[:-1]:
        starts.append(starts[-1] + n)
    plan = PrefillPlan.for_step(query, key_cache, value_cache, block_tables, starts, q_lens, kv_lens, scale,
                                key_scales, value_scales)
    if plan is None:
        raise TypeError("the C prefill-attention kernel does not take these tensors (see supports())")
    out = query.new_empty((*query.shape[:2], value_cache.shape[-1]))
    plan(query.contiguous() if query.stride(2) != 1 else query, key_cache, value_cache, out, key_scales, value_scales,
         sinks)
    return out
