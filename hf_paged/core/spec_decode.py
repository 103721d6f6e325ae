"""Speculative decoding, the bookkeeping half: which requests speculate, the n-gram drafter, how far to speculate.

A speculating decode sequence is scheduled with ``1 + k`` query tokens (its last sampled token and ``k`` drafted
ones, ``Sequence.spec_token_ids``); the forward verifies them all, the accepted ones are appended and the slots of
the rejected tail are given back (``BlockTable.truncate``). This module holds what needs no model:

- ``speculates(params)``: requests whose next-token distribution depends on their own tokens in ways the verifier
  does not replay (logits processors, penalties, grammars, kept scores, beams) do not speculate;
- ``ngram_draft``: prompt lookup (the continuation of the latest earlier occurrence of the sequence's last n tokens,
  longest n first), in C speed through ``bytes.rfind`` on the token ids;
- ``SpeculationController``: how many tokens each request drafts this step (adaptive k: on or off per batch size by
  the measured tokens per second of steps with and without drafts; per request acceptance orders the positions; the
  decision is logged and kept in ``last_plan``);
- ``SpecStats``: vLLM's acceptance counters.

Drafters implement ``Drafter``: ``propose(seqs, ks)`` sets ``seq.spec_token_ids`` (and, where the draft is sampled
from a distribution, ``seq.spec_probs``: one row per drafted token); an EAGLE-style head would be one more drafter
reading the target's hidden states.
"""

from __future__ import annotations

import heapq
import logging
from array import array
from dataclasses import dataclass, field
from typing import Protocol

from ..config import SpeculativeConfig
from .sequence import SamplingParams, Sequence

logger = logging.getLogger(__name__)


def speculates(params: SamplingParams) -> bool:
    """Whether a request with ``params`` may speculate (its verification needs only its logits)."""
    return not (params.logits_processors or params.repetition_penalty != 1.0 or params.presence_penalty
                or params.frequency_penalty or params.structured_outputs is not None or params.keep_scores
                or params.num_beams > 1)


class Drafter(Protocol):
    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set ``seq.spec_token_ids`` (at most ``k`` tokens each) and, for sampled drafts, ``seq.spec_probs``."""

    def close(self) -> None: ...


def ngram_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (n from ``max_n`` down to
    ``min_n``); [] if none occurs."""
    if k <= 0 or len(tokens) < 2:
        return []
    buf = array("i", tokens).tobytes()
    last = len(buf) - 4  # an occurrence must end before the last token: something follows it
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = buf[-4 * n:]
        end = last
        while (pos := buf.rfind(pattern, 0, end)) >= 0:
            if pos % 4 == 0:
                start = pos // 4 + n
                return tokens[start:start + k]
            end = pos + 4 * n - 1  # misaligned (inside token ids): look further left
    return []


class NgramDrafter:
    """Prompt lookup over each request's own prompt and output: no model."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids = ngram_draft(seq.token_ids, k, self.min_n, self.max_n)

    def close(self) -> None:
        pass


@dataclass
class SpecStats:
    """vLLM's speculative-decoding counters: drafts (sequences that drafted in a step), drafted and accepted tokens,
    accepted tokens per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < drafted:
            self.accepted_per_pos.extend([0] * (drafted - len(self.accepted_per_pos)))
        for pos in range(accepted):
            self.accepted_per_pos[pos] += 1


class _Bucket:
    """Decayed sums over the decode-only steps of one batch size: per mode (0: no draft, 1: drafts) the steps,
    the tokens they yielded, their seconds and their drafted tokens; the mode chosen and the steps since a probe."""

    def __init__(self) -> None:
        self.sums = [[0.0] * 4, [0.0] * 4]
        self.on: bool | None = None
        self.since_probe = 0

    def record(self, mode: int, tokens: int, seconds: float, drafted: int) -> None:
        s = self.sums[mode]
        for i, v in enumerate((1.0, tokens, seconds, drafted)):
            s[i] = SpeculationController.FORGET_STEPS * s[i] + v

    def rate(self, mode: int) -> float:
        s = self.sums[mode]
        return s[1] / s[2] if s[2] > 0 else 0.0

    def draft_cost(self) -> float:
        """Seconds a drafted token adds to a step: the steps with drafts' mean time over those without, per
        drafted token."""
        (n0, _, t0, _), (n1, _, t1, d1) = self.sums
        return max((t1 / n1 - t0 / n0) / (d1 / n1), 0.0) if n0 and n1 and d1 else 0.0


class SpeculationController:
    """How many tokens each speculating request drafts in a step.

    On or off, by measurement: for decode-only steps of each batch size (exact up to 8, then by powers of two), the
    tokens per second of whole steps (drafting, forward, verification, appending) with drafts and without, decayed
    sums of the last few of each (``record_step``). A batch size speculates while its steps with drafts yield at least
    as many tokens per second as those without; every ``PROBE``-th step of it goes the other way (drafting all it
    can, or not at all), so both figures stay current; a new batch size measures one step of each first. Each change
    is logged (INFO) and the last plan kept in ``last_plan`` (and the engine's stats).

    When on, each request's acceptance rate ``alpha`` (the chance a drafted token is accepted given the previous one
    was: its verified drafts, a prior of one in two, forgotten at 0.9 a step so that a request that stopped drafting
    drifts back and tries again) orders the draft positions (the ``j``-th is accepted with chance ``alpha ** j``);
    they are added best first while each raises the step's expected tokens per second, a drafted token costing what
    the measured steps say it does. Not adaptive: always the cap.
    """

    FORGET = 0.9
    FORGET_STEPS = 0.9
    PROBE = 16

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket] = {}
        self.last_plan: dict[str, float] = {"k_mean": 0.0, "speculating": 0.0, "on": 0.0}

    @staticmethod
    def bucket_key(num_decodes: int) -> int:
        return num_decodes if num_decodes <= 8 else 1 << (num_decodes - 1).bit_length()

    # ---- measurements ------------------------------------------------------------------------------------
    def record_step(self, num_decodes: int, tokens: int, seconds: float, drafted: int) -> None:
        """A decode-only step of ``num_decodes`` sequences: ``tokens`` appended, ``drafted`` tokens verified, in
        ``seconds`` from drafting to appending."""
        if num_decodes:
            self.buckets.setdefault(self.bucket_key(num_decodes), _Bucket()).record(int(drafted > 0), tokens, seconds,
                                                                                    drafted)

    # ---- acceptance ------------------------------------------------------------------------------------
    @staticmethod
    def alpha(seq: Sequence) -> float:
        return (seq.spec_hits + 1.0) / (seq.spec_trials + 2.0)

    def forget(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.spec_hits *= self.FORGET
            seq.spec_trials *= self.FORGET

    @staticmethod
    def record_verified(seq: Sequence, drafted: int, accepted: int) -> None:
        seq.spec_hits += accepted
        seq.spec_trials += accepted + (accepted < drafted)

    # ---- the plan --------------------------------------------------------------------------------------
    def mode(self, num_decodes: int) -> tuple[bool, bool]:
        """(speculate this step, the step is a probe or a first measurement: draft all it can)."""
        b = self.buckets.setdefault(self.bucket_key(num_decodes), _Bucket())
        n0, n1 = b.sums[0][0], b.sums[1][0]
        if not n0 or not n1:  # measure both first: a step without drafts, then one with
            return bool(n0), True
        on = b.rate(1) >= b.rate(0)
        if on != b.on:
            logger.info("speculation %s at batch %d: %.1f tokens/s with drafts, %.1f without",
                        "on" if on else "off", num_decodes, b.rate(1), b.rate(0))
            b.on = on
        b.since_probe += 1
        if b.since_probe >= self.PROBE:
            b.since_probe = 0
            return not on, True
        return on, False

    def plan(self, seqs: list[Sequence], caps: list[int], num_decodes: int, adaptive: list[bool]) -> list[int]:
        """Tokens to draft per sequence (at most ``caps``), in a step with ``num_decodes`` decoding sequences."""
        on, full = self.mode(num_decodes)
        ks = [0 if a else c for c, a in zip(caps, adaptive)]
        b = self.buckets[self.bucket_key(num_decodes)]
        if on and full:
            ks = list(caps)
        elif on:
            (n0, _, t0, _) = b.sums[0]
            step, cost, yield_ = t0 / n0, b.draft_cost(), float(num_decodes)
            alphas = [self.alpha(s) for s in seqs]
            heap = [(-alphas[i], i) for i in range(len(seqs)) if adaptive[i] and caps[i] > 0]
            heapq.heapify(heap)
            while heap:
                gain, i = heapq.heappop(heap)
                gain = -gain
                if gain * step <= cost * yield_:  # this token no longer raises tokens per second
                    break
                ks[i] += 1
                step, yield_ = step + cost, yield_ + gain
                if ks[i] < caps[i]:
                    heapq.heappush(heap, (-gain * alphas[i], i))
        self.last_plan = {"k_mean": sum(ks) / len(ks) if ks else 0.0, "speculating": float(sum(k > 0 for k in ks)),
                          "on": float(on), "tok_s_with_drafts": b.rate(1), "tok_s_without": b.rate(0),
                          "draft_cost_s": b.draft_cost()}
        return ks
