"""Iteration-level scheduling: which sequences compute how many tokens in the next step.

Every step: running sequences first (in arrival order), each asking for its tokens not yet computed (1
for a decode, a chunk for a prefill), within a token budget (``max_num_batched_tokens``); then waiting
sequences are admitted first come first served while budget, blocks and ``max_num_seqs`` allow, their
prompt chunked to fit the budget (chunked prefill, mixed with the decodes). ``allocate_slots`` returns
None when the pool is out of blocks; the scheduler then preempts the newest running sequence by
recompute (its blocks are freed, it goes back to the front of the queue and is recomputed from its
tokens later, so its output is unchanged).

With prefix caching on, an admitted sequence first takes the cached full blocks of its prompt and
computes only the rest (at least its last token, whose logits it needs).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_pool import BlockPool, hash_block_tokens
from .sequence import Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True


@dataclass
class ScheduledStep:
    """Sequences of one step and how many new tokens each computes (decodes first)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, config: SchedulerConfig) -> None:
        self.pool = pool
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_cached_tokens = 0
        self.num_prompt_tokens_scheduled = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[int] | None:
        """Slots for the sequence's next tokens, or None: the pool cannot hold them (preempt)."""
        return seq.block_table.append_slots(num_new_tokens)

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.allocate_slots(seq, n) is None:
                victim = running.pop()  # the newest running sequence
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: it was the last one
        if not preempted:
            while self.waiting and budget > 0 and len(running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                if not seq.block_table.blocks and self.config.enable_prefix_caching:
                    self._take_cached_prefix(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if self.allocate_slots(seq, n) is None:
                    self._release_cached_prefix(seq)
                    break
                self.waiting.popleft()
                running.append(seq)
                scheduled.append((seq, n))
                self.num_prompt_tokens_scheduled += n
                budget -= n
        scheduled.sort(key=lambda item: item[1] != 1)  # decodes (one token) first, stable
        return ScheduledStep([s for s, _ in scheduled], [n for _, n in scheduled], preempted)

    def _preempt(self, seq: Sequence) -> None:
        seq.block_table.free()
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- prefix cache --------------------------------------------------------------------------
    def _take_cached_prefix(self, seq: Sequence) -> None:
        # Leave at least the last token to compute: its logits are needed.
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.pool.block_size)
        hits = []
        for block_hash in hashes:
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        if hits:
            seq.block_table.adopt_cached_blocks(hits)
            seq.num_computed_tokens = len(hits) * self.pool.block_size
            self.num_prefix_cached_tokens += seq.num_computed_tokens

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of the sequence's first ``num_blocks`` full blocks (memoised on it)."""
        bs = self.pool.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            b = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, seq.token_ids[b * bs:(b + 1) * bs],
                                            seq.params.cache_salt))
        return hashes[:num_blocks]

    def _release_cached_prefix(self, seq: Sequence) -> None:
        if seq.num_computed_tokens and seq.block_table.blocks:
            self.num_prefix_cached_tokens -= seq.num_computed_tokens
        seq.block_table.free()
        seq.num_computed_tokens = 0

    def register_computed_blocks(self, seq: Sequence, old_computed: int) -> None:
        """After a step, make the sequence's newly filled full blocks findable in the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.pool.block_size
        first, last = old_computed // bs, seq.num_computed_tokens // bs
        if first == last:
            return
        hashes = self._block_hashes(seq, last)
        for b in range(first, last):
            self.pool.register_full_block(seq.block_table.blocks[b], hashes[b])

    def replace(self, old: list[Sequence], new: list[Sequence]) -> None:
        """Put ``new`` where ``old`` were (a request's root by its samples, beams by the next beams); old
        sequences' blocks are released (the new ones hold their own references)."""
        position = len(self.running)
        for seq in old:
            if seq in self.running:
                position = min(position, self.running.index(seq))
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            seq.block_table.free()
        ready = [s for s in new if s.num_computed_tokens >= s.num_tokens - 1 and s.num_computed_tokens > 0]
        self.running[position:position] = ready
        for seq in reversed([s for s in new if s not in ready]):  # parents preempted: recompute first
            seq.num_computed_tokens = 0
            seq.block_table.free()
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.block_table.free()
