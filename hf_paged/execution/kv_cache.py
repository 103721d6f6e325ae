"""The KV tensors the block ids address: one buffer for every layer's K and V, owned by a runner or a ``PagedCache``.

``kv[row, 0|1, block, slot_in_block, kv_head, head_dim]`` with one more block than the pool counts, the null block
(the last); one row per layer that keeps K/V (``layers``: a model's state-space / linear-attention layers and its
layers without attention have none). Values narrower or wider than the keys (``head_dim_v``: MLA and similar) are
stored at their own width: ``kv`` then holds the keys only (``kv[row, 0, ...]``) and
``kv_v[row, 0, block, slot, kv_head, head_dim_v]`` the values, so no byte is padding. ``kv_cache_dtype="int8"`` stores
K and V as int8 with one fp32 scale per (token, KV head) (symmetric: ``scale = max|x| / 127`` of that head's vector)
in ``kv_scales[row, 0|1, block, kv_head, slot_in_block]``: a block's scales of one KV head are contiguous, so a kernel
walking a block reads them as one short vector. Copies and growth treat the scales as part of their block.
"""

from __future__ import annotations

import torch

from ..admission import kv_geometry, layer_windows, value_head_dim
from ..config import KV_CACHE_DTYPES
from ..cpu_runtime import zeros_on_huge_pages
from .kernels.dispatch import copy_blocks


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        return zeros_on_huge_pages(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """K/V storage for ``num_blocks`` blocks (plus the null block) of the ``layers`` of a model of ``num_layers``
    (default: every layer); sized by ``num_blocks`` or by ``memory_bytes``."""

    # Blocks when no layer keeps K/V (they then only count positions, and cost nothing).
    BLOCKS_WITHOUT_KV = 1 << 16

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16,
                 num_blocks: int | None = None, memory_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kv_cache_dtype: str = "auto",
                 head_dim_v: int | None = None, layers: list[int] | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        quantized = kv_cache_dtype == "int8"
        if quantized:
            dtype = torch.int8
        head_dim_v = head_dim_v or head_dim
        layers = list(range(num_layers)) if layers is None else sorted(layers)
        self.rows = {layer: row for row, layer in enumerate(layers)}
        # Per token and KV head: head_dim (+ head_dim_v) elements, plus one fp32 scale each when quantized, every layer.
        row_bytes = (head_dim + head_dim_v) * dtype.itemsize + (8 if quantized else 0)
        self.bytes_per_block = len(layers) * block_size * num_kv_heads * row_bytes
        if num_blocks is None:
            if memory_bytes is None:
                raise ValueError("give num_blocks or memory_bytes to size the block pool")
            num_blocks = (int(memory_bytes) // self.bytes_per_block - 1 if self.bytes_per_block  # one is the null block
                          else self.BLOCKS_WITHOUT_KV)
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive (memory_bytes too small?), got {num_blocks}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.head_dim_v = head_dim_v
        self.block_size, self.num_blocks = block_size, num_blocks
        split = head_dim_v != head_dim
        self.kv = _zeros((len(layers), 1 if split else 2, num_blocks + 1, block_size, num_kv_heads, head_dim), dtype,
                         device)
        # The values' tensor: ``kv`` itself (``[layer, 1]``) unless their width differs.
        self.kv_v = _zeros((len(layers), 1, num_blocks + 1, block_size, num_kv_heads, head_dim_v), dtype, device) \
            if split else self.kv
        self.kv_scales: torch.Tensor | None = (
            _zeros((len(layers), 2, num_blocks + 1, num_kv_heads, block_size), torch.float32, device) if quantized
            else None)

    @property
    def null_block(self) -> int:
        return self.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def quantized(self) -> bool:
        """Whether K/V are stored as int8 with scales (``kv_cache_dtype="int8"``)."""
        return self.kv_scales is not None

    @property
    def split(self) -> bool:
        """Whether values are held apart from the keys (``head_dim_v != head_dim``)."""
        return self.kv_v is not self.kv

    def _tensors(self) -> list[str]:
        """The names of the tensors held: ``kv``, ``kv_v`` when values are apart, ``kv_scales`` when int8."""
        return ["kv"] + (["kv_v"] if self.split else []) + (["kv_scales"] if self.kv_scales is not None else [])

    @property
    def nbytes(self) -> int:
        """Bytes of storage held (K/V and their scales, the null block included)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensors())

    def key_cache(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim]`` keys of one layer (a view)."""
        return self.kv[self.rows[layer], 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim_v]`` values of one layer (a view)."""
        return self.kv_v[self.rows[layer], -1]

    def key_scales(self, layer: int) -> torch.Tensor | None:
        """``[num_blocks, kv_heads, block_size]`` fp32 scales of one layer's int8 keys (a view); None unless int8."""
        return None if self.kv_scales is None else self.kv_scales[self.rows[layer], 0]

    def value_scales(self, layer: int) -> torch.Tensor | None:
        return None if self.kv_scales is None else self.kv_scales[self.rows[layer], 1]

    def grow(self, num_new_blocks: int) -> None:
        """Room for ``num_new_blocks`` more blocks (reallocated and copied; block ids stay valid, the null block moves
        to the new end)."""
        num = self.num_blocks
        self._reallocate(num + num_new_blocks + 1, num)
        self.num_blocks = num + num_new_blocks

    def _reallocate(self, blocks: int, keep: int) -> None:
        """Every tensor re-made with ``blocks`` blocks, the first ``keep`` copied over (the rest zeros)."""
        split = self.split
        for name in self._tensors():
            old = getattr(self, name)
            new = _zeros((*old.shape[:2], blocks, *old.shape[3:]), old.dtype, old.device) if blocks else \
                old.new_empty((*old.shape[:2], 0, *old.shape[3:]))
            new[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, new)
        if not split:
            self.kv_v = self.kv

    def copy_blocks(self, copies: list[tuple[int, int]], plan) -> None:
        """Copy-on-write block copies ``(src, dst)`` (all layers, K and V, their scales) in one operation; every source
        is read before any destination is written."""
        if not copies:
            return
        # Staged in pinned memory on CUDA and copied without waiting: no host synchronisation per step.
        pairs = torch.tensor(copies, dtype=torch.long, pin_memory=self.kv.is_cuda).to(self.device, non_blocking=True)
        copy_blocks(self.kv, pairs, plan, scales=self.kv_scales)
        if self.split:
            copy_blocks(self.kv_v, pairs, plan)

    def restore(self) -> None:
        """Storage again after :meth:`release` (zeros: nothing that was cached survives)."""
        if self.kv.shape[2] == 0:
            self._reallocate(self.num_blocks + 1, 0)

    def release(self) -> None:
        """Give the storage back (its owner is closing)."""
        self._reallocate(0, 0)


def model_kv_cache(model: torch.nn.Module, *, block_size: int = 16, num_blocks: int | None = None,
                   memory_bytes: int | None = None, dtype: torch.dtype | None = None, kv_cache_dtype: str = "auto",
                   num_kv_heads: int | None = None) -> KVCache:
    """A KV cache shaped for ``model``'s K/V layers and KV heads (``num_kv_heads``: this rank's, for a tensor-parallel
    model), storing K/V in ``dtype`` (default: the model's) or, with ``kv_cache_dtype="int8"``, as int8 with scales."""
    layers, kv_heads, head_dim = kv_geometry(model.config)
    param = next(model.parameters())
    return KVCache(layers, num_kv_heads or kv_heads, head_dim, block_size=block_size, num_blocks=num_blocks,
                   memory_bytes=memory_bytes, dtype=dtype or param.dtype, device=param.device,
                   kv_cache_dtype=kv_cache_dtype, head_dim_v=value_head_dim(model.config),
                   layers=list(layer_windows(model)))
