"""Per-sequence KV bookkeeping on the block pool: slots for new tokens, the prefix cache, freeing.

The ``BlockPool`` only keeps blocks (free list, reference counts, hash index, copies). This manager decides
what a sequence's blocks are: it reserves the slots of the tokens a step computes (``allocate_slots``, None
when the pool is out of blocks), lets a new sequence adopt the cached full blocks of its prompt
(``take_cached_prefix``: chained block hashes, memoised on the sequence, salted per tenant), registers the
full blocks a step filled so later prompts can find them, and returns a sequence's blocks when it leaves. A model
with recurrent layers also takes one state slot per sequence (``BlockPool.states``); its prefix cache is off: a
recurrent state is only known at the end of the tokens that made it, so a cached block could not resume it.
"""

from __future__ import annotations

from .block_pool import BlockPool, StateSlots, hash_block_tokens
from .kv_cache_spec import KVCacheGroup, SlidingWindowSpec
from .sequence import Sequence


class KVCacheManager:
    """The block tables of a model's paged layer groups (``kv_cache_spec``) on one pool."""

    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True,
                 groups: list[KVCacheGroup] | None = None) -> None:
        self.groups = list(groups or [])
        self.pool = pool
        paged = [g for g in self.groups if g.paged]
        # Every paged layer attends within a window: blocks behind the smallest one go back to the pool.
        sliding = [g.spec.window for g in paged if isinstance(g.spec, SlidingWindowSpec)]
        self.window = min(sliding) if sliding and len(sliding) == len(paged) else None
        recurrent = len(paged) < len(self.groups)
        if recurrent and pool.states is None:
            pool.states = StateSlots()
        self.enable_prefix_caching = enable_prefix_caching and not recurrent
        self.num_prefix_cached_tokens = 0  # prompt tokens served from the prefix cache

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[int] | None:
        """Slots for the sequence's next tokens, or None: the pool cannot hold them (nothing changed)."""
        return seq.block_table.append_slots(num_new_tokens)

    def free(self, seq: Sequence) -> None:
        seq.block_table.free()
        if seq.draft is not None:  # the draft model's blocks for it (speculative decoding)
            seq.draft.block_table.free()
            seq.draft = None

    def free_out_of_window(self, seq: Sequence) -> None:
        """After a step: give back the blocks of the sequence that no later query attends to (the next one, at
        position ``num_computed_tokens``, sees keys from ``num_computed_tokens - window + 1`` on)."""
        if self.window is not None:
            seq.block_table.drop_before((seq.num_computed_tokens - self.window + 1) // self.pool.block_size)

    # ---- prefix cache --------------------------------------------------------------------------
    def take_cached_prefix(self, seq: Sequence) -> None:
        """Start an empty sequence on the cached full blocks of its tokens (all but the last token, whose logits
        are needed, are eligible)."""
        if not self.enable_prefix_caching or seq.block_table.blocks:
            return
        hits = []
        for block_hash in self.block_hashes(seq, (seq.num_tokens - 1) // self.pool.block_size):
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits:
            seq.block_table.adopt_cached_blocks(hits)
            seq.num_computed_tokens = len(hits) * self.pool.block_size
            self.num_prefix_cached_tokens += seq.num_computed_tokens

    def release_cached_prefix(self, seq: Sequence) -> None:
        """Undo ``take_cached_prefix`` for a sequence that could not be admitted after all."""
        if seq.num_computed_tokens and seq.block_table.blocks:
            self.num_prefix_cached_tokens -= seq.num_computed_tokens
        seq.block_table.free()
        seq.num_computed_tokens = 0

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the sequence's first ``num_blocks`` full blocks (memoised on it)."""
        bs = self.pool.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            b = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, seq.token_ids[b * bs:(b + 1) * bs],
                                            seq.params.cache_salt))
        return hashes[:num_blocks]

    def register_computed_blocks(self, seq: Sequence, old_computed: int) -> None:
        """After a step, make the sequence's newly filled full blocks findable in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.pool.block_size
        first, last = old_computed // bs, seq.num_computed_tokens // bs
        if first == last:
            return
        hashes = self.block_hashes(seq, last)
        for b in range(first, last):
            self.pool.register_full_block(seq.block_table.blocks[b], hashes[b])

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their K/V no longer match the model, e.g. after its weights changed)."""
        self.pool.reset_prefix_cache()
