"""Speculative decoding in the engine's step: drafting before the schedule, verification after the forward.

``Speculator`` keeps the drafters (prompt lookup, draft models: one per draft model, built on the first request that
names it), the ``SpeculationController`` (adaptive k) and vLLM's acceptance counters. Per step:

1. ``propose`` (before ``Scheduler.schedule``): every running decode sequence that speculates gets up to ``k``
   drafted tokens (``seq.spec_token_ids``), ``k`` capped by its ``max_new_tokens`` and the context and chosen by
   the controller (prompt lookup drafts the caps first and the controller cuts them, reading how long each match
   is); the scheduler then gives it ``1 + k`` query tokens and their slots.
2. ``take_rows`` (after the forward): the logits rows of drafted sequences are taken out of the step's rows (the
   others are sampled as ever).
3. ``verify``: the sampler's verification; each sequence keeps its accepted drafted tokens' K/V and gives back the
   slots of the rejected ones (``Scheduler.accept_draft``); the accepted tokens and the one after them are appended
   one position at a time through the same checks as any token (stop tokens and strings, ``max_new_tokens``,
   ``min_new_tokens``, stop checks, streaming), so a request stops exactly where it stops without speculation.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from ..config import EngineConfig, SpeculativeConfig
from ..core.spec_decode import Drafter, NgramDrafter, SpecStats, SpeculationController, speculates
from ..core.scheduler import Scheduler, SchedulerOutput
from ..core.sequence import Sequence
from ..execution.draft_model import DraftModelDrafter
from ..execution.sampler import Sampler

logger = logging.getLogger(__name__)


class Speculator:
    clock = staticmethod(time.perf_counter)  # what steps are timed with (the controller's measurements)

    def __init__(self, config: EngineConfig, num_blocks: int, vocab_size: int, max_model_len: int) -> None:
        self.config = config
        self.num_blocks, self.vocab_size, self.max_model_len = num_blocks, vocab_size, max_model_len
        self.drafters: dict[Any, Drafter] = {}
        self.controller = SpeculationController()
        self.stats = SpecStats()
        self._started = 0.0  # when the step's drafting began
        self._lock = threading.Lock()

    def resolve(self, seq: Sequence) -> None:
        """Set how a new request speculates (its own config, else the engine's), building its drafter now (in the
        caller's thread: a bad draft model raises ``ValueError`` there)."""
        config = seq.params.speculative or self.config.speculative
        if config is None or not config.num_tokens or not speculates(seq.params):
            return
        self.drafter(config)
        seq.spec = config

    def drafter(self, config: SpeculativeConfig) -> Drafter:
        key = ("draft", id(config.draft_model)) if config.method == "draft" else \
            ("ngram", config.prompt_lookup_min, config.prompt_lookup_max)
        with self._lock:
            drafter = self.drafters.get(key)
            if drafter is None:
                drafter = self.drafters[key] = DraftModelDrafter(config.draft_model, self.config, self.num_blocks,
                                                                 self.vocab_size) \
                    if config.method == "draft" else NgramDrafter(config)
            return drafter

    def sleep(self) -> None:
        with self._lock:
            for drafter in self.drafters.values():
                drafter.sleep()

    def wake_up(self) -> None:
        with self._lock:
            for drafter in self.drafters.values():
                drafter.wake_up()

    def close(self) -> None:
        with self._lock:
            for drafter in self.drafters.values():
                drafter.close()
            self.drafters.clear()

    # ---- before the schedule -------------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        self._started = self.clock()
        seqs, caps, num_decodes = [], [], 0
        for seq in running:
            decodes = seq.num_tokens - seq.num_computed_tokens == 1 and seq.num_computed_tokens > 0
            num_decodes += decodes
            if seq.spec is not None and decodes:
                cap = min(seq.spec.num_tokens, seq.params.max_new_tokens - seq.num_output_tokens - 1,
                          self.max_model_len - seq.num_tokens - 1)
                if cap > 0:
                    seqs.append(seq)
                    caps.append(cap)
        if not seqs:
            return
        groups: dict[int, tuple[Drafter, list[int]]] = {}
        for i, seq in enumerate(seqs):
            drafter = self.drafter(seq.spec)
            groups.setdefault(id(drafter), (drafter, []))[1].append(i)
        for drafter, members in groups.values():  # drafts that cost nothing come first: the plan reads them
            if drafter.drafts_first:
                self._propose(drafter, [seqs[i] for i in members], [caps[i] for i in members])
                for i in members:
                    caps[i] = len(seqs[i].spec_token_ids)
        # A seeded sampled request drafts its cap: its draws then depend on its own tokens only, not on the batch.
        adaptive = [s.spec is not None and s.spec.adaptive and (s.generator is None or s.params.greedy) for s in seqs]
        ks = self.controller.plan(seqs, caps, num_decodes, adaptive)
        self.controller.forget(seqs)
        for drafter, members in groups.values():
            if drafter.drafts_first:
                for i in members:
                    seqs[i].spec_token_ids = seqs[i].spec_token_ids[:ks[i]]
            else:
                self._propose(drafter, [seqs[i] for i in members], [ks[i] for i in members])

    @staticmethod
    def _propose(drafter: Drafter, seqs: list[Sequence], ks: list[int]) -> None:
        try:
            drafter.propose(seqs, ks)
        except Exception:  # drafting is an optimisation: these requests decode without it from now on
            logger.exception("drafting failed; %d requests go on without speculation", len(seqs))
            for seq in seqs:
                seq.spec, seq.spec_token_ids, seq.spec_probs, seq.spec_match = None, [], None, 0

    # ---- after the forward ---------------------------------------------------------------------
    @staticmethod
    def take_rows(scheduled: list[Sequence], logits: torch.Tensor,
                  rows: list[int]) -> tuple[torch.Tensor, list[int], list[Sequence], torch.Tensor | None]:
        """Split the step's logits: (the others' logits, their rows, the drafted sequences, their logits)."""
        keep, drafted_rows, drafted = [], [], []
        for r, i in enumerate(rows):
            seq = scheduled[i]
            if seq.spec_token_ids:
                drafted_rows.append(r)
                if not drafted or drafted[-1] is not seq:
                    drafted.append(seq)
            else:
                keep.append(r)
        if not drafted:
            return logits, rows, [], None
        return _take(logits, keep), [rows[r] for r in keep], drafted, _take(logits, drafted_rows)

    def verify(self, sampler: Sampler, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple]:
        """Verify the drafted sequences; returns per sequence (tokens to append, logprobs, top logprobs, the computed
        count before its accepted tokens)."""
        for seq in seqs:  # a draft trimmed by the scheduler keeps the distributions of its remaining tokens only
            if seq.spec_probs is not None:
                seq.spec_probs = seq.spec_probs[:len(seq.spec_token_ids)]
        out = []
        for seq, (tokens, logprobs, top) in zip(seqs, sampler.verify(logits, seqs)):
            drafted, accepted = len(seq.spec_token_ids), len(tokens) - 1
            self.stats.record(drafted, accepted)
            self.controller.record_verified(seq, drafted, accepted)
            seq.spec_drafted += drafted
            seq.spec_accepted += accepted
            out.append((seq, tokens, logprobs, top))
        return out

    @staticmethod
    def append(verified: list[tuple], scheduler: Scheduler, outputs: Any) -> list[Sequence]:
        """Keep the accepted tokens' K/V, give back the rest, append the tokens one position at a time; returns the
        sequences that finished."""
        befores = [scheduler.accept_draft(seq, len(tokens) - 1) for seq, tokens, _, _ in verified]
        finished: list[Sequence] = []
        for j in range(max(len(tokens) for _, tokens, _, _ in verified)):
            live = [(seq, tokens[j], lp[j] if lp else None, top[j] if top else None)
                    for seq, tokens, lp, top in verified if len(tokens) > j and not seq.finished]
            if not live:
                break
            seqs = [item[0] for item in live]
            logprobs = [item[2] for item in live] if any(s.params.logprobs for s in seqs) else None
            tops = [item[3] for item in live] if any(s.params.top_logprobs for s in seqs) else None
            reasons = scheduler.append_tokens(seqs, [item[1] for item in live], logprobs, tops)
            finished += outputs.process(seqs, reasons)
        for (seq, _, _, _), before in zip(verified, befores):
            if not seq.finished:
                scheduler.kv.register_computed_blocks(seq, before)
        return finished

    def end_step(self, step: SchedulerOutput, num_appended: int) -> None:
        """Time a step that computed no prompt tokens (decodes, verifications) from drafting to appending, for the
        controller."""
        self.controller.record_step(len(step.seqs), num_appended, self.clock() - self._started,
                                    sum(s.num_draft for s in step.seqs))

    def summary(self) -> dict[str, float]:
        s, plan = self.stats, self.controller.last_plan
        out = {"spec_decode_num_drafts": s.num_drafts, "spec_decode_num_draft_tokens": s.num_draft_tokens,
               "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
               "spec_decode_acceptance_rate": s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else 0.0,
               "spec_decode_mean_k": plan["k_mean"], "spec_decode_on": plan["on"]}
        for pos, count in enumerate(s.accepted_per_pos):
            out[f"spec_decode_num_accepted_tokens_per_pos_{pos}"] = count
        return out


def _take(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits[rows]``: a view where the rows are consecutive (drafts verified as chunks come after the step's
    one-token decodes), else a copy."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return logits[rows[0]:rows[-1] + 1]
    return logits[rows]
