"""The paged KV memory: one pool of fixed-size blocks for every layer, and the block tables that use it.

``BlockPool`` owns the storage (``kv[layer, 0|1, block, slot_in_block, kv_head, head_dim]``), a free list
kept in least-recently-freed order, a reference count per block, and the prefix cache (full blocks
keyed by a chained content hash; a freed block keeps its hash until it is reused, so it can be hit again).
``BlockTable`` is one sequence's list of blocks. Sharing is by reference count: ``fork`` shares every
block, and a write into a block held by more than one table first copies it (copy-on-write). Copies are
queued on the pool and done in one ``flush_copies`` call per step, before any K/V is written.

A sequence never holds more than one partially filled block, so waste is under one block per sequence.

One more block than ``num_blocks`` is stored: the null block (``null_block``, the last one), never allocated.
Block tables padded to a common width point their padding at it, so a kernel that reads or writes past a
sequence's own blocks touches no block a sequence owns.

``kv_cache_dtype="int8"`` stores K and V as int8 with one fp32 scale per (token, KV head) (symmetric:
``scale = max|x| / 127`` of that head's vector) in ``kv_scales[layer, 0|1, block, kv_head, slot_in_block]``:
a block's scales of one KV head are contiguous, so a kernel walking a block reads them as one short vector.
Copies, growth and the prefix cache treat the scales as part of their block.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Iterable, Sequence

import torch

from ..cpu_runtime import zeros_on_huge_pages

KV_CACHE_DTYPES = ("auto", "int8")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        return zeros_on_huge_pages(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class BlockPool:
    """Fixed-size KV blocks for all layers of one model, with reference counts and a prefix cache."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        quantized = kv_cache_dtype == "int8"
        if quantized:
            dtype = torch.int8
        # Per token and KV head: head_dim elements (plus one fp32 scale when quantized), for K and V, every layer.
        row_bytes = head_dim * dtype.itemsize + (4 if quantized else 0)
        bytes_per_block = 2 * num_layers * block_size * num_kv_heads * row_bytes
        if num_blocks is None:
            if memory_bytes is None:
                raise ValueError("give num_blocks or memory_bytes to size the block pool")
            num_blocks = int(memory_bytes) // bytes_per_block - 1  # one block is the null block
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive (memory_bytes too small?), got {num_blocks}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.bytes_per_block = bytes_per_block
        self.null_block = num_blocks
        self.kv = _zeros((num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim), dtype, device)
        self.kv_scales: torch.Tensor | None = (
            _zeros((num_layers, 2, num_blocks + 1, num_kv_heads, block_size), torch.float32, device) if quantized
            else None)
        self.ref_counts = [0] * num_blocks
        # Free blocks, oldest-freed first: allocation takes from the front, so recently freed cached
        # blocks survive longest (LRU eviction of the prefix cache).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of_block: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- storage views -------------------------------------------------------------------------
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
    def nbytes(self) -> int:
        """Bytes of storage held (K/V and their scales, the null block included)."""
        scales = 0 if self.kv_scales is None else self.kv_scales.numel() * self.kv_scales.element_size()
        return self.kv.numel() * self.kv.element_size() + scales

    def grow(self, num_new_blocks: int) -> None:
        """Add ``num_new_blocks`` free blocks (the storage is reallocated and copied; block ids stay valid, the null
        block moves to the new end). For pools that size themselves on demand (``PagedCache`` without a size)."""
        old, num = self.kv, self.num_blocks
        shape = (self.num_layers, 2, num + num_new_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv = _zeros(shape, old.dtype, old.device)
        self.kv[:, :, :num] = old[:, :, :num]
        if self.kv_scales is not None:
            old_scales = self.kv_scales
            self.kv_scales = _zeros((*shape[:3], self.num_kv_heads, self.block_size), torch.float32, old.device)
            self.kv_scales[:, :, :num] = old_scales[:, :, :num]
        self.num_blocks = num + num_new_blocks
        self.null_block = self.num_blocks
        self.ref_counts.extend([0] * num_new_blocks)
        for block in range(num, num + num_new_blocks):
            self._free[block] = None

    def release(self) -> None:
        """Give the storage back (the pool's owner is closing; every block must be free)."""
        self.kv = torch.empty((self.num_layers, 2, 0, self.block_size, self.num_kv_heads, self.head_dim),
                              dtype=self.kv.dtype, device=self.kv.device)
        if self.kv_scales is not None:
            self.kv_scales = torch.empty((self.num_layers, 2, 0, self.num_kv_heads, self.block_size),
                                         dtype=torch.float32, device=self.kv.device)

    def key_cache(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim]`` keys of one layer (a view)."""
        return self.kv[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def key_scales(self, layer: int) -> torch.Tensor | None:
        """``[num_blocks, kv_heads, block_size]`` fp32 scales of one layer's int8 keys (a view); None unless
        quantized."""
        return None if self.kv_scales is None else self.kv_scales[layer, 0]

    def value_scales(self, layer: int) -> torch.Tensor | None:
        return None if self.kv_scales is None else self.kv_scales[layer, 1]

    # ---- allocation ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    def allocate(self) -> int:
        """A fresh block with reference count 1; evicts the least recently freed cached block."""
        if not self._free:
            raise MemoryError("the KV block pool is exhausted")
        block, _ = self._free.popitem(last=False)
        old_hash = self._hash_of_block.pop(block, None)
        if old_hash is not None:
            del self._block_of_hash[old_hash]
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        count = self.ref_counts[block]
        if count <= 0:
            raise RuntimeError(f"double free of KV block {block}")
        self.ref_counts[block] = count - 1
        if count == 1:
            self._free[block] = None

    # ---- prefix cache --------------------------------------------------------------------------
    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding the full block with this hash, shared (refcount +1), or None."""
        self.prefix_queries += 1
        block = self._block_of_hash.get(block_hash)
        if block is None:
            return None
        self.prefix_hits += 1
        self.incref(block)
        return block

    def register_full_block(self, block: int, block_hash: bytes) -> None:
        """Make a block that now holds a full block of tokens findable by its hash."""
        if block in self._hash_of_block or block_hash in self._block_of_hash:
            return
        self._hash_of_block[block] = block_hash
        self._block_of_hash[block_hash] = block

    def reset_prefix_cache(self) -> None:
        self._hash_of_block.clear()
        self._block_of_hash.clear()

    # ---- copies --------------------------------------------------------------------------------
    def queue_copy(self, src: int, dst: int) -> None:
        # All queued copies read their sources at once, before any is written: a source that is itself
        # the destination of a queued copy must read that copy's source instead.
        for pending_src, pending_dst in self._pending_copies:
            if pending_dst == src:
                src = pending_src
        self._pending_copies.append((src, dst))

    def flush_copies(self, plan=None) -> None:
        """Do every queued copy-on-write block copy (all layers, K and V, their scales) in one operation."""
        if not self._pending_copies:
            return
        from ..execution.kernels.dispatch import copy_blocks

        # Staged in pinned memory on CUDA and copied without waiting: no host synchronisation per step.
        pairs = torch.tensor(self._pending_copies, dtype=torch.long, pin_memory=self.kv.is_cuda)
        pairs = pairs.to(self.device, non_blocking=True)
        self._pending_copies.clear()
        copy_blocks(self.kv, pairs, plan, scales=self.kv_scales)


def hash_block_tokens(parent: bytes | None, token_ids: Sequence[int], salt: str | None = None) -> bytes:
    """Chained, process-stable hash of one full block (parent hash, its token ids, optional tenant salt)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    if salt:
        encoded = salt.encode()
        h.update(b"salt" + struct.pack("<q", len(encoded)) + encoded)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockTable:
    """The blocks of one sequence, in order, and how many token slots of them are filled."""

    __slots__ = ("pool", "blocks", "num_tokens")

    def __init__(self, pool: BlockPool, blocks: list[int] | None = None, num_tokens: int = 0) -> None:
        self.pool = pool
        self.blocks: list[int] = blocks if blocks is not None else []
        self.num_tokens = num_tokens

    def blocks_needed(self, num_new_tokens: int) -> int:
        """Fresh blocks that ``append_slots(num_new_tokens)`` would take (copy-on-write included)."""
        bs = self.pool.block_size
        needed = -(-(self.num_tokens + num_new_tokens) // bs) - len(self.blocks)
        if num_new_tokens > 0 and self.num_tokens % bs and self.pool.ref_counts[self.blocks[-1]] > 1:
            needed += 1
        return max(needed, 0)

    def append_slots(self, num_new_tokens: int) -> list[int] | None:
        """Reserve slots for the next tokens; returns their slot ids, or None (nothing changed) if the pool
        has too few free blocks. A shared, partially filled last block is first copied (copy-on-write)."""
        pool = self.pool
        if self.blocks_needed(num_new_tokens) > pool.num_free_blocks:
            return None
        bs = pool.block_size
        if num_new_tokens > 0 and self.num_tokens % bs:
            last = self.blocks[-1]
            if pool.ref_counts[last] > 1:
                fresh = pool.allocate()
                pool.queue_copy(last, fresh)
                pool.decref(last)
                self.blocks[-1] = fresh
        start = self.num_tokens
        end = start + num_new_tokens
        while len(self.blocks) * bs < end:
            self.blocks.append(pool.allocate())
        self.num_tokens = end
        return self.slots(start, end)

    def fork(self) -> "BlockTable":
        """A second table sharing every block of this one."""
        for block in self.blocks:
            self.pool.incref(block)
        return BlockTable(self.pool, list(self.blocks), self.num_tokens)

    def copy(self) -> "BlockTable":
        """A second table with private copies of every block (what sharing saves; for measurements)."""
        if len(self.blocks) > self.pool.num_free_blocks:
            raise MemoryError("the KV block pool is exhausted")
        blocks = []
        for block in self.blocks:
            fresh = self.pool.allocate()
            self.pool.queue_copy(block, fresh)
            blocks.append(fresh)
        return BlockTable(self.pool, blocks, self.num_tokens)

    def adopt_cached_blocks(self, blocks: Iterable[int]) -> None:
        """Start an empty table with full blocks found in the prefix cache (already increfed)."""
        assert not self.blocks
        self.blocks = list(blocks)
        self.num_tokens = len(self.blocks) * self.pool.block_size

    def free(self) -> None:
        for block in reversed(self.blocks):
            self.pool.decref(block)
        self.blocks = []
        self.num_tokens = 0

    def slots(self, start: int, end: int) -> list[int]:
        bs = self.pool.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]
