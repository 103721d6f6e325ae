"""Property-based and unit tests of the KV block pool (``hf_paged.core.block_pool``).

The state machine drives a tiny pool (1 layer, 1 KV head) through long random sequences of table
operations and checks, after every step, reference counts, the free list (contents and LRU order), the
prefix cache (against an exact mirror), the waste bound, and that every token's K/V can be read back
unchanged from the ``KVCache`` the block ids address (no write into a shared block, no lost copy-on-write):
the pool only counts and queues copies; a step's copies are taken (``take_copies``) and done on the tensors
(``KVCache.copy_blocks``), as the engine's scheduler and runner do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hf_paged.core.block_pool import BlockPool, BlockTable, hash_block_tokens
from hf_paged.execution.kv_cache import KVCache
from hf_paged.execution.plan import default_plan

MAX_TABLES = 8
SALTS = (None, "tenant-a")


def chain_hashes(tokens, block_size, salt):
    """Chained hashes of the full blocks of ``tokens``."""
    hashes, parent = [], None
    for b in range(len(tokens) // block_size):
        parent = hash_block_tokens(parent, tokens[b * block_size:(b + 1) * block_size], salt)
        hashes.append(parent)
    return hashes


@dataclass
class Seq:
    """One live table and what the model knows about it."""

    table: BlockTable
    salt: str | None
    tokens: list = field(default_factory=list)  # token id of every position
    markers: list = field(default_factory=list)  # K/V marker of every position (K = +m, V = -m)
    pending: set = field(default_factory=set)  # positions whose slots are reserved but not yet written
    awaiting_copy: set = field(default_factory=set)  # written positions in a copy-on-write block not yet copied


MAX_GROWTH = 12  # blocks the machine may add with ``grow`` (pool and storage together)


class BlockPoolMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([2, 1, 4]), num_blocks=st.integers(4, 24), head_dim=st.sampled_from([1, 2]))
    def setup(self, block_size, num_blocks, head_dim):
        self.pool = BlockPool(num_blocks, block_size)
        self.kv_cache = KVCache(1, 1, head_dim, block_size=block_size, num_blocks=num_blocks, dtype=torch.float32)
        self.plan = default_plan(self.kv_cache.kv)
        self.bs = block_size
        self.grown = 0
        # Destinations of the copy-on-write copies queued since the last step (what take_copies must hand over).
        self.queued_dsts: list[int] = []
        self.seqs: list[Seq] = []
        self.next_marker = 1.0  # 0 is what a fresh pool holds: never a marker
        # Model of the free list, oldest-freed first (allocation takes from the front).
        self.free_order: list[int] = list(range(num_blocks))
        # Exact mirror of the prefix cache, and the markers each cached block must hold.
        self.block_of_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        self.cached_markers: dict[bytes, list] = {}
        # (tokens, salt) of sequences whose blocks were registered: what new requests may look up.
        self.known_prompts: list[tuple[tuple, str | None]] = []

    # ---- helpers -------------------------------------------------------------------------------
    def _pick(self, i):
        return self.seqs[i % len(self.seqs)]

    def _refs(self):
        return Counter(b for s in self.seqs for b in s.table.blocks)

    def _snapshot(self, seq):
        pool = self.pool
        return (list(seq.table.blocks), seq.table.num_tokens, list(pool.ref_counts), pool.num_free_blocks,
                pool.num_cached_blocks, pool.num_blocks, self.kv_cache.kv.clone())

    def _flat(self, half):
        return self.kv_cache.kv[0, half].reshape(-1, self.kv_cache.head_dim)

    def _write(self, seq, positions):
        slots = torch.tensor(seq.table.slots(0, seq.table.num_tokens), dtype=torch.long)[list(positions)]
        values = torch.tensor([seq.markers[p] for p in positions], dtype=self.kv_cache.dtype)[:, None]
        self._flat(0)[slots] = values
        self._flat(1)[slots] = -values
        seq.pending.difference_update(positions)

    def _flush(self):
        """A step's copies: taken from the pool (exactly the copy-on-write copies queued since the last step, each
        into a block of its own) and done on the tensors."""
        copies = self.pool.take_copies()
        assert [dst for _, dst in copies] == self.queued_dsts
        assert len(set(self.queued_dsts)) == len(self.queued_dsts)
        assert all(src != dst for src, dst in copies)
        self.kv_cache.copy_blocks(copies, self.plan)
        assert self.pool.take_copies() == []  # taking empties the queue
        self.queued_dsts = []
        for seq in self.seqs:
            seq.awaiting_copy.clear()

    def _add_seq(self, seq):
        self.seqs.append(seq)
        return seq

    def _append(self, seq, tokens, write_now):
        table, pool, k = seq.table, self.pool, len(tokens)
        before = self._snapshot(seq)
        old_blocks, start = before[0], before[1]
        needed = table.blocks_needed(k)
        slots = table.append_slots(k)
        if slots is None:
            # (e) nothing changed, and only because the pool really was too small.
            assert needed > before[3]
            after = self._snapshot(seq)
            assert after[:6] == before[:6]
            assert torch.equal(after[6], before[6])
            return False
        assert needed <= before[3]
        assert table.num_tokens == start + k
        assert slots == table.slots(start, start + k)
        assert len(set(slots)) == k
        fresh = [b for i, b in enumerate(table.blocks) if i >= len(old_blocks) or old_blocks[i] != b]
        changed = [i for i in range(len(old_blocks)) if table.blocks[i] != old_blocks[i]]
        # Only a shared, partially filled last block is ever replaced (copy-on-write).
        assert changed in ([], [len(old_blocks) - 1])
        if changed:
            assert start % self.bs and before[2][old_blocks[-1]] > 1
            self.queued_dsts.append(table.blocks[len(old_blocks) - 1])
            # Until the queued copy is done, the new block does not hold the tokens already written.
            seq.awaiting_copy.update(range(start - start % self.bs, start))
        # blocks_needed was exact, and the fresh blocks are the least recently freed ones, in order.
        assert len(fresh) == needed == before[3] - pool.num_free_blocks
        assert fresh == self.free_order[:needed]
        del self.free_order[:needed]
        for b in fresh:  # reallocation evicts a block from the prefix cache
            h = self.hash_of_block.pop(b, None)
            if h is not None:
                del self.block_of_hash[h]
                del self.cached_markers[h]
        for tok in tokens:
            seq.tokens.append(tok)
            seq.markers.append(self.next_marker)
            self.next_marker += 1.0
        new_positions = range(start, start + k)
        seq.pending.update(new_positions)
        if write_now:
            self._flush()
            self._write(seq, new_positions)
        return True

    # ---- rules ---------------------------------------------------------------------------------
    @precondition(lambda self: len(self.seqs) < MAX_TABLES)
    @rule(salt=st.sampled_from(SALTS))
    def new_table(self, salt):
        self._add_seq(Seq(BlockTable(self.pool), salt))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=10),
          write_now=st.booleans())
    def append(self, i, tokens, write_now):
        self._append(self._pick(i), tokens, write_now)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1), write_now=st.booleans(), prefer_shared=st.booleans())
    def append_one(self, i, write_now, prefer_shared):
        """A decode step (one token), the common case: fills partial blocks, triggers copy-on-write."""
        pool = self.pool
        shared = [s for s in self.seqs if s.table.num_tokens % self.bs and pool.ref_counts[s.table.blocks[-1]] > 1]
        seq = shared[i % len(shared)] if prefer_shared and shared else self._pick(i)
        self._append(seq, [i % 3], write_now)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1), extra=st.integers(0, 3))
    def append_too_many(self, i, extra):
        """An append that cannot fit returns None and changes nothing."""
        seq = self._pick(i)
        t = seq.table
        k = (self.pool.num_free_blocks + 1) * self.bs + (len(t.blocks) * self.bs - t.num_tokens) + extra
        assert not self._append(seq, [0] * k, write_now=True)

    @precondition(lambda self: self.queued_dsts or any(s.pending for s in self.seqs))
    @rule()
    def flush_and_write(self):
        """One engine step's end: do the queued copies, then write every reserved slot."""
        self._flush()
        for seq in self.seqs:
            if seq.pending:
                self._write(seq, sorted(seq.pending))

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_TABLES)
    @rule(i=st.integers(0, MAX_TABLES - 1))
    def fork(self, i):
        seq = self._pick(i)
        free_before = self.pool.num_free_blocks
        # Forks happen between steps (beam search reorders after the forward pass), i.e. with no copy
        # queued: see test_chained_copy_on_write_in_one_flush for a fork between append and flush.
        self._flush()
        child = seq.table.fork()
        assert child.blocks == seq.table.blocks and child.blocks is not seq.table.blocks
        assert child.num_tokens == seq.table.num_tokens
        assert self.pool.num_free_blocks == free_before
        self._add_seq(Seq(child, seq.salt, list(seq.tokens), list(seq.markers), set(seq.pending),
                         set(seq.awaiting_copy)))

    @precondition(lambda self: len(self.seqs) < MAX_TABLES and any(s.table.num_tokens % self.bs for s in self.seqs))
    @rule(i=st.integers(0, MAX_TABLES - 1), parent_writes=st.booleans(), write_now=st.booleans())
    def fork_and_diverge(self, i, parent_writes, write_now):
        """Parallel sampling: fork a table whose last block is partly filled, then one side appends."""
        partial = [s for s in self.seqs if s.table.num_tokens % self.bs]
        seq = partial[i % len(partial)]
        self.fork(self.seqs.index(seq))
        self._append(seq if parent_writes else self.seqs[-1], [i % 3], write_now)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1))
    def free(self, i):
        seq = self._pick(i)
        blocks = list(seq.table.blocks)
        seq.table.free()
        assert seq.table.blocks == [] and seq.table.num_tokens == 0
        self.seqs.remove(seq)
        refs = self._refs()
        self.free_order.extend(b for b in reversed(blocks) if refs[b] == 0)

    @precondition(lambda self: any(s.table.num_tokens for s in self.seqs))
    @rule(i=st.integers(0, MAX_TABLES - 1), drafted=st.integers(1, 6), accepted=st.integers(0, 6),
          write_now=st.booleans())
    def speculate(self, i, drafted, accepted, write_now):
        """A speculative step: the last token and ``drafted`` tokens get slots (and are written), the first
        ``accepted`` drafted ones are kept and the slots of the others are rolled back (``truncate``): blocks that
        held only rejected tokens are freed, shared and cached blocks are untouched."""
        seq = self._pick(i)
        if not self._append(seq, [i % 3] * drafted, write_now):
            return
        table, bs = seq.table, self.bs
        keep = table.num_tokens - drafted + min(accepted, drafted)
        kept_blocks = -(-keep // bs)
        if keep % bs and table.blocks[kept_blocks - 1] in self.hash_of_block:
            with pytest.raises(RuntimeError, match="prefix cache"):  # never done by the engine: refused
                table.truncate(keep)
            return
        blocks, refs_before = list(table.blocks), list(self.pool.ref_counts)
        table.truncate(keep)
        assert table.num_tokens == keep and table.blocks == blocks[:kept_blocks]
        del seq.tokens[keep:], seq.markers[keep:]
        seq.pending = {p for p in seq.pending if p < keep}
        seq.awaiting_copy = {p for p in seq.awaiting_copy if p < keep}
        for b in reversed(blocks[kept_blocks:]):
            assert self.pool.ref_counts[b] == refs_before[b] - 1
            if self.pool.ref_counts[b] == 0:
                self.free_order.append(b)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1))
    def register(self, i):
        """Make the table's full, written blocks findable by their chained hash."""
        seq = self._pick(i)
        bs, blocks = self.bs, seq.table.blocks
        hashes = chain_hashes(seq.tokens, bs, seq.salt)
        for b, h in enumerate(hashes):
            if any(p in seq.pending for p in range(b * bs, (b + 1) * bs)):
                break
            block = blocks[b]
            self.pool.register_full_block(block, h)
            if block not in self.hash_of_block and h not in self.block_of_hash:
                self.hash_of_block[block] = h
                self.block_of_hash[h] = block
                self.cached_markers[h] = seq.markers[b * bs:(b + 1) * bs]
        if hashes:
            self.known_prompts.append((tuple(seq.tokens), seq.salt))

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, MAX_TABLES - 1))
    def finish(self, i):
        """A request ends: its full blocks stay in the prefix cache, its table is freed."""
        self.flush_and_write()
        self.register(i)
        self.free(i)

    @precondition(lambda self: self.known_prompts and len(self.seqs) < MAX_TABLES)
    @rule(j=st.integers(0, 1000), cut=st.integers(0, 6), tail=st.lists(st.integers(0, 2), max_size=4),
          salt_flip=st.booleans())
    def start_from_cache(self, j, cut, tail, salt_flip):
        """A new request whose prompt starts like a known one: share the cached blocks of its prefix."""
        tokens, salt = self.known_prompts[j % len(self.known_prompts)]
        tokens = list(tokens[:max(1, len(tokens) - cut)]) + list(tail)
        if salt_flip:
            salt = SALTS[1 - SALTS.index(salt)]
        refs_before = list(self.pool.ref_counts)
        hits = []
        for h in chain_hashes(tokens, self.bs, salt):
            block = self.pool.cached_block(h)
            assert block == self.block_of_hash.get(h)  # exact mirror: no lost and no stale entry
            if block is None:
                break
            assert self.pool.ref_counts[block] == refs_before[block] + 1
            if refs_before[block] == 0:
                self.free_order.remove(block)
            hits.append(block)
        if not hits:
            return
        table = BlockTable(self.pool)
        table.adopt_cached_blocks(hits)
        assert table.num_tokens == len(hits) * self.bs
        n = table.num_tokens
        markers = [m for block in hits for m in self.cached_markers[self.hash_of_block[block]]]
        self._add_seq(Seq(table, salt, tokens[:n], markers))

    @precondition(lambda self: len(self.seqs) < MAX_TABLES and set(self.free_order) & set(self.hash_of_block))
    @rule(tok=st.integers(0, 2))
    def fill_pool(self, tok):
        """A new table takes every free block, evicting the prefix cache's least recently freed blocks."""
        seq = self._add_seq(Seq(BlockTable(self.pool), None))
        assert self._append(seq, [tok] * (self.pool.num_free_blocks * self.bs), write_now=True)
        assert self.pool.num_free_blocks == 0
        assert not self._append(seq, [tok], write_now=True)

    @precondition(lambda self: self.grown < MAX_GROWTH)
    @rule(n=st.integers(1, 4))
    def grow(self, n):
        """A growable cache out of blocks: the pool counts more, the storage is reallocated; every block id keeps
        its K/V (queued copies included), the null block moves to the new end, the new blocks are freed last."""
        old = self.pool.num_blocks
        self.pool.grow(n)
        self.kv_cache.grow(n)
        self.grown += n
        assert self.pool.num_blocks == self.kv_cache.num_blocks == old + n
        assert self.pool.null_block == self.kv_cache.null_block == old + n
        assert self.kv_cache.kv.shape[2] == old + n + 1
        assert not self._flat(0)[old * self.bs:].any() and not self._flat(1)[old * self.bs:].any()
        self.free_order.extend(range(old, old + n))

    # ---- invariants ----------------------------------------------------------------------------
    @invariant()
    def refcounts_match_references(self):  # (a)
        if not hasattr(self, "pool"):
            return
        refs = self._refs()
        assert self.pool.ref_counts == [refs[b] for b in range(self.pool.num_blocks)]

    @invariant()
    def free_list_is_unreferenced_blocks(self):  # (b)
        if not hasattr(self, "pool"):
            return
        zero = [b for b, c in enumerate(self.pool.ref_counts) if c == 0]
        assert self.pool.num_free_blocks == len(zero) == len(self.free_order)
        assert self.pool.num_used_blocks == self.pool.num_blocks - len(zero)
        assert sorted(self.free_order) == zero
        assert self.pool.num_cached_blocks == len(self.block_of_hash)

    @invariant()
    def tables_are_well_formed(self):  # (c) and (f)
        if not hasattr(self, "pool"):
            return
        bs = self.bs
        for seq in self.seqs:
            t = seq.table
            assert len(set(t.blocks)) == len(t.blocks)
            assert (len(t.blocks) - 1) * bs < t.num_tokens < len(t.blocks) * bs + 1
            assert len(seq.tokens) == len(seq.markers) == t.num_tokens

    @invariant()
    def no_lost_write(self):  # (d)
        if not hasattr(self, "pool"):
            return
        keys, values = self._flat(0), self._flat(1)
        for seq in self.seqs:
            written = [p for p in range(seq.table.num_tokens) if p not in seq.pending and p not in seq.awaiting_copy]
            if not written:
                continue
            slots = torch.tensor(seq.table.slots(0, seq.table.num_tokens), dtype=torch.long)[written]
            expected = torch.tensor([seq.markers[p] for p in written], dtype=self.kv_cache.dtype)[:, None]
            expected = expected.expand(-1, self.kv_cache.head_dim)
            assert torch.equal(keys[slots], expected), (seq.table.blocks, keys[slots].tolist(), expected.tolist())
            assert torch.equal(values[slots], -expected)

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for seq in self.seqs:
            seq.table.free()
        self.seqs = []
        assert self.pool.num_free_blocks == self.pool.num_blocks
        assert self.pool.ref_counts == [0] * self.pool.num_blocks
        self.kv_cache.release()
        assert self.kv_cache.kv.numel() == 0


BlockPoolMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBlockPoolMachine = BlockPoolMachine.TestCase


# ---- unit tests --------------------------------------------------------------------------------
def small_pool(num_blocks=4, block_size=2):
    return BlockPool(num_blocks, block_size)


def small_storage(pool):
    """One layer, one KV head of head_dim 1 under ``pool``'s block ids, and the plan its copies run with."""
    kv_cache = KVCache(1, 1, 1, block_size=pool.block_size, num_blocks=pool.num_blocks, dtype=torch.float32)
    return kv_cache, default_plan(kv_cache.kv)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_pool_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(bad, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, bad)


def test_pool_counts_only():
    pool = BlockPool(5, block_size=8)
    assert (pool.num_blocks, pool.block_size, pool.null_block) == (5, 8, 5)
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 0 and pool.num_cached_blocks == 0
    for gone in ("kv", "kv_scales", "key_cache", "flush_copies", "bytes_per_block", "release", "dtype", "device"):
        assert not hasattr(pool, gone), gone
    assert pool.take_copies() == []
    pool.grow(3)
    assert pool.num_blocks == 8 and pool.null_block == 8 and pool.num_free_blocks == 8
    assert sorted(pool.allocate() for _ in range(8)) == list(range(8))
    assert pool.num_used_blocks == 8 and pool.ref_counts == [1] * 8


def test_double_free_raises():
    pool = small_pool()
    block = pool.allocate()
    pool.decref(block)
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(block)
    # Through tables: a forked block is freed once per holder, and a third free is an error.
    table = BlockTable(pool)
    table.append_slots(3)
    child = table.fork()
    blocks = list(table.blocks)
    table.free()
    child.free()
    assert pool.num_free_blocks == pool.num_blocks
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(blocks[0])
    assert pool.ref_counts == [0] * pool.num_blocks


def test_exhausted_pool_raises_memory_error():
    pool = small_pool(num_blocks=3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free_blocks == 0
    with pytest.raises(MemoryError):
        pool.allocate()
    table = BlockTable(pool)
    assert table.append_slots(1) is None
    assert table.blocks == [] and table.num_tokens == 0 and pool.ref_counts == [1, 1, 1]
    for block in blocks:
        pool.decref(block)
    assert pool.num_free_blocks == 3


@pytest.mark.parametrize("dtype, elem_bytes", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_kv_cache_sized_by_memory_bytes(dtype, elem_bytes):
    layers, kv_heads, head_dim, block_size = 3, 2, 8, 16
    per_block = 2 * layers * block_size * kv_heads * head_dim * elem_bytes  # K and V, every layer
    # 7 usable blocks and the null block fit; padded block tables point at the null block, the last one.
    kv_cache = KVCache(layers, kv_heads, head_dim, block_size=block_size, memory_bytes=per_block * 8 + per_block - 1,
                       dtype=dtype)
    assert kv_cache.num_blocks == 7 and kv_cache.null_block == 7
    assert kv_cache.bytes_per_block == per_block
    assert kv_cache.kv.shape == (layers, 2, 8, block_size, kv_heads, head_dim) and kv_cache.kv.dtype == dtype
    assert kv_cache.nbytes == kv_cache.kv.numel() * kv_cache.kv.element_size() == 8 * per_block
    assert not kv_cache.quantized and kv_cache.kv_scales is None
    assert kv_cache.key_cache(2).shape == (8, block_size, kv_heads, head_dim)
    assert kv_cache.key_cache(1).data_ptr() == kv_cache.kv[1, 0].data_ptr()  # views, not copies
    assert kv_cache.value_cache(1).data_ptr() == kv_cache.kv[1, 1].data_ptr()
    # A pool counting the same blocks.
    pool = BlockPool(kv_cache.num_blocks, kv_cache.block_size)
    assert pool.num_free_blocks == 7 and pool.null_block == kv_cache.null_block
    with pytest.raises(ValueError):
        KVCache(layers, kv_heads, head_dim, block_size=block_size, memory_bytes=per_block - 1, dtype=dtype)
    with pytest.raises(ValueError):
        KVCache(layers, kv_heads, head_dim, block_size=block_size, dtype=dtype)
    kv_cache.release()
    assert kv_cache.kv.numel() == 0 and kv_cache.nbytes == 0


def test_kv_cache_grow_keeps_blocks_and_moves_the_null_block():
    kv_cache = KVCache(2, 1, 3, block_size=2, num_blocks=3, dtype=torch.float32)
    kv_cache.kv.copy_(torch.arange(kv_cache.kv.numel(), dtype=torch.float32).view(kv_cache.kv.shape) + 1)
    before = kv_cache.kv[:, :, :3].clone()
    kv_cache.grow(4)
    assert kv_cache.num_blocks == 7 and kv_cache.null_block == 7 and kv_cache.kv.shape[2] == 8
    assert torch.equal(kv_cache.kv[:, :, :3], before)
    assert not kv_cache.kv[:, :, 3:].any()  # new blocks and the (moved) null block are zero


HASH_CASES = [(None, [1, 2, 3, 4], None), (None, [1, 2, 3, 4], "tenant"), (b"\x01" * 16, [1, 2, 3, 4], None),
              (None, [0], None), (None, [2**40, -1], "x")]


def test_hash_block_tokens_is_stable():
    first = [hash_block_tokens(p, t, s) for p, t, s in HASH_CASES]
    assert first == [hash_block_tokens(p, list(t), s) for p, t, s in HASH_CASES]
    assert first == [hash_block_tokens(p, tuple(t), s) for p, t, s in HASH_CASES]
    assert all(isinstance(h, bytes) and len(h) == 16 for h in first)
    assert len(set(first)) == len(first)
    base = hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(None, [1, 2, 3, 4], "a") != base
    assert hash_block_tokens(None, [1, 2, 3, 4], "a") != hash_block_tokens(None, [1, 2, 3, 4], "b")
    assert hash_block_tokens(b"\x01" * 16, [1, 2, 3, 4]) != base
    assert hash_block_tokens(b"\x01" * 16, [1, 2, 3, 4]) != hash_block_tokens(b"\x02" * 16, [1, 2, 3, 4])
    assert hash_block_tokens(base, [5, 6, 7, 8]) != hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 4, 3]) != base
    # Process-stable: another interpreter, with a different str-hash seed, gives the same bytes.
    code = ("from hf_paged.core.block_pool import hash_block_tokens as h\n"
            f"print([h(p, t, s).hex() for p, t, s in {HASH_CASES!r}])")
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == repr([h.hex() for h in first])


def _full_table(pool, tokens, salt=None):
    table = BlockTable(pool)
    assert table.append_slots(len(tokens)) is not None
    for b, h in enumerate(chain_hashes(tokens, pool.block_size, salt)):
        pool.register_full_block(table.blocks[b], h)
    return table


def test_lru_eviction_reuses_oldest_freed_first():
    ha, hb = chain_hashes([1, 2, 3, 4], 2, None), chain_hashes([5, 6, 7, 8], 2, None)

    def freed_pool():
        pool = small_pool(num_blocks=4, block_size=2)
        a = _full_table(pool, [1, 2, 3, 4])
        b = _full_table(pool, [5, 6, 7, 8])
        a_blocks, b_blocks = list(a.blocks), list(b.blocks)
        assert pool.num_cached_blocks == 4
        a.free()  # freed first: its blocks are the oldest, its last block the oldest of all
        b.free()
        return pool, a_blocks, b_blocks

    pool, a_blocks, b_blocks = freed_pool()
    expected_order = a_blocks[::-1] + b_blocks[::-1]
    for n, block in enumerate(expected_order):
        assert pool.allocate() == block
        assert pool.num_cached_blocks == len(expected_order) - n - 1
    for block in expected_order:
        pool.decref(block)
    # After n allocations, the reused blocks left the cache; the ones not yet reused are still hits.
    for n in range(len(expected_order) + 1):
        pool, a_blocks, b_blocks = freed_pool()
        for _ in range(n):
            pool.allocate()
        remaining = expected_order[n:]
        for h, blk in zip(ha + hb, a_blocks + b_blocks):
            assert pool.cached_block(h) == (blk if blk in remaining else None)
        assert pool.prefix_hits == len(remaining) and pool.prefix_queries == 4


def test_cache_hit_is_not_evicted_while_in_use_and_refreshes_lru():
    pool = small_pool(num_blocks=4, block_size=2)
    a = _full_table(pool, [1, 2, 3, 4])
    ha = chain_hashes([1, 2, 3, 4], 2, None)
    first, second = a.blocks
    a.free()  # free list now: the two never-used blocks, then second, then first
    # A new request hits the first cached block: shared, out of the free list.
    hit = pool.cached_block(ha[0])
    assert hit == first and pool.ref_counts[first] == 1 and pool.prefix_hits == 1
    user = BlockTable(pool)
    user.adopt_cached_blocks([hit])
    assert user.num_tokens == 2
    # Exhaust the pool: every other block is taken, the one in use never is.
    others = [pool.allocate() for _ in range(3)]
    assert first not in others and second in others
    with pytest.raises(MemoryError):
        pool.allocate()
    assert pool.cached_block(ha[0]) == first  # still cached, shared again
    assert pool.ref_counts[first] == 2
    assert pool.cached_block(ha[1]) is None  # second was reused: evicted from the cache
    for blk in others:
        pool.decref(blk)
    pool.decref(first)
    user.free()
    # Freed last, the re-used block is now the most recently freed: evicted last.
    order = [pool.allocate() for _ in range(4)]
    assert order == others + [first]
    for block in order:
        pool.decref(block)


def test_copy_on_write_keeps_both_views():
    pool = small_pool(num_blocks=4, block_size=4)
    kv_cache, plan = small_storage(pool)
    keys = kv_cache.key_cache(0).view(-1)
    a = BlockTable(pool)
    keys[a.append_slots(2)] = torch.tensor([1.0, 2.0])
    b = a.fork()
    assert pool.ref_counts[a.blocks[0]] == 2 and b.blocks_needed(1) == 1
    slot = b.append_slots(1)
    assert b.blocks != a.blocks and pool.ref_counts[a.blocks[0]] == 1
    copies = pool.take_copies()
    assert copies == [(a.blocks[0], b.blocks[0])] and pool.take_copies() == []
    kv_cache.copy_blocks(copies, plan)
    keys[slot] = 3.0
    keys[a.append_slots(1)] = 4.0  # a's block is no longer shared: written in place
    assert pool.take_copies() == []
    assert keys[a.slots(0, 3)].tolist() == [1.0, 2.0, 4.0]
    assert keys[b.slots(0, 3)].tolist() == [1.0, 2.0, 3.0]
    a.free()
    b.free()


def test_copy_blocks_copies_every_layer_and_both_halves():
    pool = BlockPool(4, 2)
    kv_cache = KVCache(3, 2, 4, block_size=2, num_blocks=4, dtype=torch.float32)
    plan = default_plan(kv_cache.kv)
    kv_cache.kv.normal_()
    a = BlockTable(pool)
    a.append_slots(1)
    b = a.fork()
    b.append_slots(1)  # copy-on-write
    src, dst = a.blocks[0], b.blocks[0]
    before = kv_cache.kv.clone()
    kv_cache.copy_blocks(pool.take_copies(), plan)
    assert torch.equal(kv_cache.kv[:, :, dst], before[:, :, src])
    others = [blk for blk in range(kv_cache.num_blocks + 1) if blk != dst]
    assert torch.equal(kv_cache.kv[:, :, others], before[:, :, others])
    kv_cache.copy_blocks([], plan)  # nothing to do
    assert torch.equal(kv_cache.kv[:, :, others], before[:, :, others])


def test_table_copy_queues_private_copies():
    """``BlockTable.copy`` (share_blocks=False) takes fresh blocks and queues a copy of each."""
    pool = small_pool(num_blocks=6, block_size=2)
    kv_cache, plan = small_storage(pool)
    keys = kv_cache.key_cache(0).view(-1)
    a = BlockTable(pool)
    keys[a.append_slots(3)] = torch.tensor([1.0, 2.0, 3.0])
    b = a.copy()
    assert set(b.blocks).isdisjoint(a.blocks) and b.num_tokens == 3
    assert pool.take_copies() == list(zip(a.blocks, b.blocks))
    assert pool.ref_counts[a.blocks[0]] == 1 and pool.ref_counts[b.blocks[0]] == 1
    kv_cache.copy_blocks(list(zip(a.blocks, b.blocks)), plan)
    assert keys[b.slots(0, 3)].tolist() == [1.0, 2.0, 3.0]
    keys[b.append_slots(1)] = 5.0  # b's own block: no copy-on-write
    assert pool.take_copies() == [] and keys[a.slots(0, 3)].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(MemoryError):
        BlockTable(pool, [0, 1, 2, 3, 4, 5], 12).copy()
    a.free()
    b.free()


def test_chained_copy_on_write_in_one_flush():
    pool = small_pool(num_blocks=8, block_size=4)
    kv_cache, plan = small_storage(pool)
    keys = kv_cache.key_cache(0).view(-1)
    a = BlockTable(pool)
    keys[a.append_slots(1)] = 7.0
    b = a.fork()  # block shared by a and b
    a.append_slots(1)  # a: copy-on-write to a fresh block, queued
    c = a.fork()  # c shares a's fresh block before the copy is done
    c.append_slots(1)  # c: copy-on-write of a's fresh block, queued
    kv_cache.copy_blocks(pool.take_copies(), plan)
    seen = [keys[t.slots(0, 1)].tolist() for t in (a, b, c)]
    for t in (a, b, c):
        t.free()
    # All queued copies read their sources at once: c's copy must read a's source, not a's fresh block.
    assert seen == [[7.0], [7.0], [7.0]]


def test_chained_copy_on_write_through_a_reused_block():
    pool = small_pool(num_blocks=5, block_size=4)
    kv_cache, plan = small_storage(pool)
    keys = kv_cache.key_cache(0).view(-1)
    a = BlockTable(pool)
    keys[a.append_slots(1)] = 7.0  # block 0
    d = BlockTable(pool)
    keys[d.append_slots(1)] = 9.0  # block 1
    b, e = a.fork(), d.fork()
    a.append_slots(1)  # copy-on-write 0 -> 2, queued
    c = a.fork()  # c shares block 2 (which holds 7.0 once the copy is done)
    spare = [pool.allocate(), pool.allocate()]  # blocks 3 and 4
    b.free()  # block 0 (the queued copy's source) is free again, the only free block
    d.append_slots(1)  # copy-on-write 1 -> 0: block 0 reused as a destination
    pool.decref(spare.pop())
    c.append_slots(1)  # copy-on-write of block 2: reads what a's copy reads (block 0 as it is now: 7.0)
    kv_cache.copy_blocks(pool.take_copies(), plan)
    seen = {name: keys[t.slots(0, 1)].tolist() for name, t in (("a", a), ("c", c), ("d", d), ("e", e))}
    for t in (a, c, d, e):
        t.free()
    pool.decref(spare.pop())
    assert seen == {"a": [7.0], "c": [7.0], "d": [9.0], "e": [9.0]}
