"""Iteration-level scheduling: which sequences compute how many tokens in the next step.

Every step: running sequences first (in arrival order), each asking for its tokens not yet computed (1
for a decode, a chunk for a prefill), within a token budget (``max_num_batched_tokens``); then waiting
sequences are admitted first come first served while budget, blocks and ``max_num_seqs`` allow, their
prompt chunked to fit the budget (chunked prefill, mixed with the decodes). ``allocate_slots`` returns
None when the pool is out of blocks; the scheduler then preempts the newest running sequence by
recompute (its blocks are freed, it goes back to the front of the queue and is recomputed from its
tokens later, so its output is unchanged).

With prefix caching on, an admitted sequence first takes the cached full blocks of its prompt and
computes only the rest (at least its last token, whose logits it needs); the ``KVCacheManager`` keeps that
bookkeeping. After the forward, ``postprocess`` records what the step computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import time

from .kv_cache_manager import KVCacheManager
from .sequence import Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


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
    def __init__(self, kv: KVCacheManager, config: SchedulerConfig) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prompt_tokens_scheduled = 0

    @property
    def num_prefix_cached_tokens(self) -> int:
        return self.kv.num_prefix_cached_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.kv.allocate_slots(seq, n) is None:
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
                self.kv.take_cached_prefix(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if self.kv.allocate_slots(seq, n) is None:
                    self.kv.release_cached_prefix(seq)
                    break
                self.waiting.popleft()
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.perf_counter()
                running.append(seq)
                scheduled.append((seq, n))
                self.num_prompt_tokens_scheduled += n
                budget -= n
        scheduled.sort(key=lambda item: item[1] != 1)  # decodes (one token) first, stable
        return ScheduledStep([s for s, _ in scheduled], [n for _, n in scheduled], preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, step: ScheduledStep) -> None:
        """After the step's forward: its tokens are computed, and the full blocks they filled are cached."""
        for seq, n in zip(step.seqs, step.num_new_tokens):
            old = seq.num_computed_tokens
            seq.num_computed_tokens = old + n
            self.kv.register_computed_blocks(seq, old)

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
            self.kv.free(seq)
        ready = [s for s in new if s.num_computed_tokens >= s.num_tokens - 1 and s.num_computed_tokens > 0]
        self.running[position:position] = ready
        for seq in reversed([s for s in new if s not in ready]):  # parents preempted: recompute first
            seq.num_computed_tokens = 0
            self.kv.free(seq)
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq)
