"""The block pool: which KV blocks are free, shared or cached; counting only (the tensors live with the runner).

``BlockPool`` keeps a free list in least-recently-freed order, a reference count per block, and the prefix cache
(full blocks keyed by a chained content hash; a freed block keeps its hash until it is reused, so it can be hit
again). ``BlockTable`` is one sequence's list of blocks. Sharing is by reference count: ``fork`` shares every block,
and a write into a block held by more than one table first copies it (copy-on-write). Copies are queued on the pool
and handed to the runner with the step that needs them (``take_copies``), which does them before any K/V is written.

A sequence never holds more than one partially filled block, so waste is under one block per sequence.

A model with recurrent layers (state-space, linear-attention, short-convolution) also keeps one fixed-size state per
sequence: ``StateSlots`` counts those slots (``BlockPool.states``); a table takes one with its first slots, a fork takes
a fresh one with a queued copy of its parent's, and ``free`` gives it back.

Block ``num_blocks`` is the null block (``null_block``), never allocated: block tables padded to a common width point
their padding at it, so a kernel that reads or writes past a sequence's own blocks touches no block a sequence owns.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Iterable, Sequence


class BlockPool:
    """Reference counts, a free list and a prefix cache over ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer (got {value!r})")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Free blocks, oldest-freed first: allocation takes from the front, so recently freed cached
        # blocks survive longest (LRU eviction of the prefix cache).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of_block: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.states: StateSlots | None = None  # per-sequence recurrent-state slots, where the model has such layers
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def null_block(self) -> int:
        return self.num_blocks

    def grow(self, num_new_blocks: int) -> None:
        """Add ``num_new_blocks`` free blocks (the null block moves to the new end; the storage grows with it)."""
        num = self.num_blocks
        self.num_blocks = num + num_new_blocks
        self.ref_counts.extend([0] * num_new_blocks)
        for block in range(num, num + num_new_blocks):
            self._free[block] = None

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
        _queue_copy(self._pending_copies, src, dst)

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copy-on-write copies ``(src, dst)``, for the step that needs them (the queue is emptied)."""
        copies, self._pending_copies = self._pending_copies, []
        return copies


def _queue_copy(pending: list[tuple[int, int]], src: int, dst: int) -> None:
    # All queued copies read their sources at once, before any is written: a source that is itself the destination
    # of a queued copy must read that copy's source instead (the latest one: queued sources are already resolved,
    # and a slot may have been a source, been freed, then a destination).
    for pending_src, pending_dst in reversed(pending):
        if pending_dst == src:
            src = pending_src
            break
    pending.append((src, dst))


class StateSlots:
    """Which recurrent-state slots are in use (the state tensors live with the runner, one row per slot, grown as
    slots are taken); copies of forked sequences' states are queued like block copies."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self.num_slots = 0  # slots ever handed out: the rows the runner's state tensors need
        self._pending_copies: list[tuple[int, int]] = []

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if self._free:
            return self._free.pop()
        self.num_slots += 1
        return self.num_slots - 1

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"double free of recurrent-state slot {slot}")
        self._free.append(slot)

    def fork(self, slot: int | None) -> int | None:
        """A fresh slot holding (once the queued copy is done) the state of ``slot``."""
        if slot is None:
            return None
        fresh = self.allocate()
        _queue_copy(self._pending_copies, slot, fresh)
        return fresh

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies


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
    """The blocks of one sequence, in order, and how many token slots of them are filled. The first ``dropped``
    entries may be the null block: blocks given back because no query attends to them again (sliding window).
    ``state`` is its recurrent-state slot where the pool keeps them (taken with the first slots)."""

    __slots__ = ("pool", "blocks", "num_tokens", "dropped", "state")

    def __init__(self, pool: BlockPool, blocks: list[int] | None = None, num_tokens: int = 0, dropped: int = 0,
                 state: int | None = None) -> None:
        self.pool = pool
        self.blocks: list[int] = blocks if blocks is not None else []
        self.num_tokens = num_tokens
        self.dropped = dropped
        self.state = state

    def drop_before(self, index: int) -> None:
        """Give back the blocks before ``index`` (their entries become the null block; positions stay as they were)."""
        null = self.pool.null_block
        for b in range(self.dropped, min(index, len(self.blocks) - 1)):  # the last block is always kept
            self.pool.decref(self.blocks[b])
            self.blocks[b] = null
            self.dropped = b + 1

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
        if self.state is None and pool.states is not None:
            self.state = pool.states.allocate()
        start = self.num_tokens
        end = start + num_new_tokens
        while len(self.blocks) * bs < end:
            self.blocks.append(pool.allocate())
        self.num_tokens = end
        return self.slots(start, end)

    def truncate(self, num_tokens: int) -> None:
        """Roll the table back to its first ``num_tokens`` slots (speculative tokens that were rejected): blocks past
        them are released. The kept last block must not be in the prefix cache (its freed slots are written again);
        a shared one is copied on the next write, as ever."""
        if num_tokens >= self.num_tokens:
            return
        bs, pool = self.pool.block_size, self.pool
        keep = -(-num_tokens // bs)
        if num_tokens % bs and self.blocks[keep - 1] in pool._hash_of_block:
            raise RuntimeError(f"truncate: block {self.blocks[keep - 1]} is in the prefix cache")
        for block in reversed(self.blocks[max(keep, self.dropped):]):
            pool.decref(block)
        del self.blocks[keep:]
        self.num_tokens = num_tokens

    def fork(self) -> "BlockTable":
        """A second table sharing every block of this one."""
        for block in self.blocks[self.dropped:]:
            self.pool.incref(block)
        return BlockTable(self.pool, list(self.blocks), self.num_tokens, self.dropped, self._forked_state())

    def _forked_state(self) -> int | None:
        return self.pool.states.fork(self.state) if self.pool.states is not None else None

    def copy(self) -> "BlockTable":
        """A second table with private copies of every block (what sharing saves; for measurements)."""
        if len(self.blocks) > self.pool.num_free_blocks:
            raise MemoryError("the KV block pool is exhausted")
        blocks = self.blocks[: self.dropped]
        for block in self.blocks[self.dropped:]:
            fresh = self.pool.allocate()
            self.pool.queue_copy(block, fresh)
            blocks.append(fresh)
        return BlockTable(self.pool, blocks, self.num_tokens, self.dropped, self._forked_state())

    def adopt_cached_blocks(self, blocks: Iterable[int]) -> None:
        """Start an empty table with full blocks found in the prefix cache (already increfed)."""
        assert not self.blocks
        self.blocks = list(blocks)
        self.num_tokens = len(self.blocks) * self.pool.block_size

    def free(self) -> None:
        for block in reversed(self.blocks[self.dropped:]):
            self.pool.decref(block)
        if self.state is not None:
            self.pool.states.free(self.state)
            self.state = None
        self.blocks = []
        self.num_tokens = self.dropped = 0

    def slots(self, start: int, end: int) -> list[int]:
        return slot_ids(self.blocks, start, end, self.pool.block_size)


def slot_ids(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The slots of positions ``start:end`` of a sequence whose blocks are ``block_ids``."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]
