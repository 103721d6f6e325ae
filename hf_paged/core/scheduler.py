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

A decode sequence with drafted tokens (speculative decoding, ``seq.spec_token_ids``) computes them too, trimmed to
the budget; where their slots do not fit, it drops them and decodes one token. Drafted tokens count as computed only
once verified (``accept_draft``): the prefix cache never registers a block holding an unverified token, and the
slots of rejected ones are given back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import time

from .kv_cache_manager import KVCacheManager
from .sequence import FinishReason, Sequence


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 1 << 30


@dataclass
class ScheduledSequence:
    """What the runner needs of one sequence in a step: the tokens it computes, the position of the first, its whole
    block table (block ids), whether its last token's logits are sampled (``num_draft`` > 0: the last
    ``1 + num_draft`` tokens' logits, to verify the drafted tokens that end ``token_ids``), and its recurrent-state
    slot (if any)."""

    request_id: str
    token_ids: list[int]
    first_position: int
    block_ids: list[int]
    samples: bool
    state_slot: int | None = None
    num_draft: int = 0


@dataclass
class SchedulerOutput:
    """One step as plain data (picklable: tensor-parallel ranks receive it as it is): the scheduled sequences
    (decodes first), the copy-on-write block copies and forked recurrent-state copies ``(src, dst)`` to do before
    the forward."""

    seqs: list[ScheduledSequence]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    state_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_decodes(self) -> int:
        """The leading sequences that compute one token each."""
        n = 0
        while n < len(self.seqs) and len(self.seqs[n].token_ids) == 1:
            n += 1
        return n


def scheduled_seq(seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
    """``seq``'s next ``num_new_tokens`` tokens as a step computes them."""
    start = seq.num_computed_tokens
    draft = seq.spec_token_ids
    if draft:
        return ScheduledSequence(seq.request_id, seq.token_ids[start:] + draft, start, list(seq.block_table.blocks),
                                 True, seq.block_table.state, len(draft))
    end = start + num_new_tokens
    return ScheduledSequence(seq.request_id, seq.token_ids[start:end], start, list(seq.block_table.blocks),
                             end == seq.num_tokens, seq.block_table.state)


class Scheduler:
    def __init__(self, kv: KVCacheManager, config: SchedulerConfig) -> None:
        self.kv = kv
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_seqs: list[Sequence] = []  # the last step's sequences, in the order of its SchedulerOutput
        self.step_counts: list[int] = []
        self.preempted: list[Sequence] = []  # by the last schedule

    @property
    def num_prefix_cached_tokens(self) -> int:
        return self.kv.num_prefix_cached_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.spec_token_ids:  # a decode with a draft: 1 + k tokens while they fit, else a plain decode
                del seq.spec_token_ids[budget - 1:]
                if seq.spec_token_ids and self.kv.allocate_slots(seq, 1 + len(seq.spec_token_ids)) is not None:
                    scheduled.append((seq, 1 + len(seq.spec_token_ids)))
                    budget -= 1 + len(seq.spec_token_ids)
                    i += 1
                    continue
                seq.spec_token_ids = []
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
                budget -= n
        # Decodes (one token) first, then drafts being verified (their rows are decodes too), stable.
        scheduled.sort(key=lambda item: 0 if item[1] == 1 else 1 if item[0].spec_token_ids else 2)
        self.step_seqs, self.step_counts, self.preempted = [s for s, _ in scheduled], [n for _, n in scheduled], preempted
        states = self.kv.pool.states
        return SchedulerOutput([scheduled_seq(s, n) for s, n in scheduled], self.kv.pool.take_copies(),
                               states.take_copies() if states is not None else [])

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.spec_token_ids = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def drop_from_step(self, seqs: list[Sequence]) -> None:
        """Take ``seqs`` out of the last step (their forward failed): nothing of it is counted or cached for them."""
        keep = [(s, n) for s, n in zip(self.step_seqs, self.step_counts) if all(s is not d for d in seqs)]
        self.step_seqs, self.step_counts = [s for s, _ in keep], [n for _, n in keep]

    def postprocess(self) -> None:
        """After the step's forward: its tokens are computed, and the full blocks they filled are cached."""
        for seq, n in zip(self.step_seqs, self.step_counts):
            old = seq.num_computed_tokens
            seq.num_computed_tokens = old + n - len(seq.spec_token_ids)  # drafted tokens: once verified
            self.kv.register_computed_blocks(seq, old)
            self.kv.free_out_of_window(seq)

    def accept_draft(self, seq: Sequence, num_accepted: int) -> int:
        """After verification: the first ``num_accepted`` drafted tokens are computed, the slots of the others are
        given back; returns the computed count before (for ``register_computed_blocks`` once they are appended)."""
        old = seq.num_computed_tokens
        seq.num_computed_tokens = old + num_accepted
        seq.block_table.truncate(seq.num_computed_tokens)
        seq.spec_token_ids, seq.spec_probs = [], None
        return old

    def append_tokens(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float] | None,
                      top_logprobs: list | None) -> list[FinishReason | None]:
        """Append each sequence's sampled token (and its logprobs); per sequence, the reason it stops by token or
        length (stop strings are the output processor's: they need the text), else None."""
        now = time.perf_counter()
        reasons: list[FinishReason | None] = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.error is not None:  # its own logits processor failed: nothing to append
                reasons.append(FinishReason.ERROR)
                continue
            seq.token_ids.append(token)
            if logprobs is not None and seq.params.logprobs:
                seq.logprobs.append(logprobs[i])
                if top_logprobs is not None and seq.params.top_logprobs:
                    seq.top_logprobs.append(top_logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            n_out, p = seq.num_output_tokens, seq.params
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                seq.error = ValueError(f"structured_outputs: no token fits the grammar here "
                                       f"({seq.matcher.get_error() or 'every token was masked'})")
                reasons.append(FinishReason.ERROR)
            elif token in seq.stop_ids and n_out >= p.min_new_tokens:
                reasons.append(FinishReason.STOP)
            elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
                reasons.append(FinishReason.STOP)
            elif p.stop_check is not None and self._stop_check(seq):
                reasons.append(FinishReason.ERROR if seq.error is not None else FinishReason.STOP)
            elif n_out >= p.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
                reasons.append(FinishReason.LENGTH)
            else:
                reasons.append(None)
        return reasons

    @staticmethod
    def _stop_check(seq: Sequence) -> bool:
        try:
            return bool(seq.params.stop_check(seq.output_token_ids))
        except Exception as exc:  # a request's own check fails that request only
            seq.error = exc
            return True

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
