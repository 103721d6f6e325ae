"""Speculative decoding, the bookkeeping half: which requests speculate, the n-gram drafter, how far to speculate.

A speculating decode sequence is scheduled with ``1 + k`` query tokens (its last sampled token and ``k`` drafted
ones, ``Sequence.spec_token_ids``); the forward verifies them all, the accepted ones are appended and the slots of
the rejected tail are given back (``BlockTable.truncate``). This module holds what needs no model:

- ``speculates(params)``: requests whose next-token distribution depends on their own tokens in ways the verifier
  does not replay (logits processors, penalties, grammars, kept scores, beams) do not speculate;
- ``ngram_match``: prompt lookup (the continuation of the latest earlier occurrence of the sequence's last n tokens,
  longest n first), in C speed through ``bytes.rfind`` on the token ids, with how far back the match runs and
  whether the other occurrences were followed alike;
- ``SpeculationController``: how many tokens each request drafts this step (adaptive k: on or off per batch size by
  the measured tokens per second of steps with and without drafts; the acceptance rates expected of each draft
  order the positions; the decision is logged and kept in ``last_plan``);
- ``SpecStats``: vLLM's acceptance counters.

Drafters implement ``Drafter``: ``propose(seqs, ks)`` sets ``seq.spec_token_ids`` (and, where the draft is sampled
from a distribution, ``seq.spec_probs``: one row per drafted token). A drafter whose drafts cost nothing beside the
step (``drafts_first``: prompt lookup) drafts each request's cap before the plan, which then cuts the drafts by what
they are; the others draft what the plan asks. An EAGLE-style head would be one more drafter reading the target's
hidden states.
"""

from __future__ import annotations

import heapq
import logging
import math
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
    drafts_first: bool  # drafts at the caps, before the plan (which may cut them); else drafts the plan's k

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set ``seq.spec_token_ids`` (at most ``k`` tokens each) and, for sampled drafts, ``seq.spec_probs``."""

    def sleep(self) -> None:
        """Free what the drafter holds while the engine sleeps (no request is running)."""

    def wake_up(self) -> None: ...

    def close(self) -> None: ...


MATCH_LONGEST = 32  # how far back ngram_match measures a match
AGREEMENT_LOOKS = 16  # how many other earlier occurrences ngram_match reads the next token of


def ngram_match(tokens: list[int], k: int, min_n: int, max_n: int) -> tuple[list[int], int, bool]:
    """(up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens, n from ``max_n`` down to
    ``min_n``; how many tokens before them agree with the sequence's last ones, up to ``MATCH_LONGEST``; whether every
    other earlier occurrence of those n tokens, up to ``AGREEMENT_LOOKS`` of them, was followed by the draft's first
    token too): ([], 0, False) if none occurs. Both say how sure the draft is: a long match is a span being copied,
    and n tokens that have been followed by different tokens (a common word, a line break) say little of what comes
    next."""
    if k <= 0 or len(tokens) < 2:
        return [], 0, False
    buf = array("i", tokens).tobytes()
    last = len(buf) - 4  # an occurrence must end before the last token: something follows it
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = buf[-4 * n:]
        end, start, agreed, looks = last, -1, True, 0
        while looks < AGREEMENT_LOOKS and (pos := buf.rfind(pattern, 0, end)) >= 0:
            end = pos + 4 * n - 1  # look further left (past a misaligned find: one inside token ids)
            if pos % 4:
                continue
            if start < 0:
                start = pos // 4 + n
            elif tokens[pos // 4 + n] == tokens[start]:
                looks += 1
            else:
                agreed = False
                break
        if start >= 0:
            length, limit = n, min(MATCH_LONGEST, start)
            while length < limit and tokens[start - length - 1] == tokens[-length - 1]:
                length += 1
            return tokens[start:start + k], length, agreed
    return [], 0, False


class NgramDrafter:
    """Prompt lookup over each request's own prompt and output: no model."""

    drafts_first = True

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids, seq.spec_match, seq.spec_agreed = ngram_match(seq.token_ids, k, self.min_n,
                                                                              self.max_n)

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

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


class SpeculationController:
    """How many tokens each speculating request drafts in a step.

    On or off, by measurement of whole decode steps (drafting, forward, verification, appending: ``record_step``).
    Steps without drafts fit the time of a plain step of ``B`` sequences, ``a + b * B`` (decayed least squares);
    each step with drafts is compared with what plain steps would take for the tokens it appended,
    ``plain(B) * tokens / B``. Per batch size (exact up to 8, then by powers of two), decayed sums of both times over
    its last steps with drafts decide: off, it speculates again once they take less than plain steps would; on, it
    stops once they take ``MARGIN`` times as long (a few steps of answers in the model's own words must not switch
    it off where it pays over the whole answer; past the margin, it clearly does not pay). A probe
    step goes the other way (drafting one token a request, the cheapest try, or none), so that both figures stay
    current: after ``PROBE`` steps, then twice as many each time the decision holds, up to ``PROBE_MAX`` (a probe
    of an expensive drafter, a draft model that must first catch up on the tokens it missed, costs several steps),
    and after ``PROBE`` again once it changes. The engine's first decode step drafts nothing (the plain fit needs a
    point); a new batch size then takes ``FIRST_STEPS`` steps with drafts before its first decision, each drafting
    the plan below and at least a token a request, the first planned with the cost of a drafted token at the nearest
    batch size measured (one token a request before any). One step never decides: the first tokens of answers are
    rarely copied, and one such step would keep speculation off where it pays. Each change is logged (INFO) and the
    last plan kept in ``last_plan`` (and the engine's stats).

    When on, each draft's acceptance rates (``alpha``: that its first token is accepted, ``a1``, and that a later one
    is, given the one before was, ``a2``) order the draft positions (the ``j``-th is accepted with chance
    ``a1 * a2 ** (j - 1)``); they are added best first while each raises the step's expected tokens per second, a
    drafted token costing what the measured steps say it does. Not adaptive: always the cap. The rates, from verified
    drafts with a prior of one in two:

    - a prompt-lookup draft (``seq.spec_match``, its match's length, and ``seq.spec_agreed``): those of every draft
      whose match was about as long (``match_class``) and agreed or not alike, across requests. A match that runs
      far back is a span being copied, which tends to go on; a one-token match is often chance, and more so where
      the same tokens were followed by different ones elsewhere.
    - a draft model's: the request's own, forgotten at 0.9 a step so that a request that stopped drafting drifts
      back and tries again; copying, once begun, tends to go on, so ``a2`` is well above ``a1``.
    """

    FORGET = 0.9  # per step, each request's acceptance counts
    FORGET_MATCH = 0.995  # per verified draft, its match class's counts
    DECAY = 0.9  # per measured step, the step-time sums
    PROBE = 16
    FIRST_STEPS = 4  # steps with drafts a batch size measures before its first decision (one is mostly noise)
    MARGIN = 1.05  # speculating, it stops once steps with drafts take this much longer than plain steps would
    PROBE_MAX = 128

    def __init__(self) -> None:
        self._plain = [0.0] * 5  # steps without drafts: decayed sums of 1, B, B^2, t, B * t
        # Per batch size, steps with drafts: decayed sums of their seconds, plain steps' seconds for their tokens,
        # drafted tokens, seconds over a plain step; how many were measured.
        self._drafted: dict[int, list[float]] = {}
        self._on: dict[int, bool] = {}
        self._since_probe: dict[int, int] = {}
        self._probe_every: dict[int, int] = {}
        # Per match key: decayed [first hits, first trials, later hits, later trials].
        self._by_match: dict[tuple[int, bool], list[float]] = {}
        self.last_plan: dict[str, float] = {"k_mean": 0.0, "speculating": 0.0, "on": 0.0}

    @staticmethod
    def bucket(num_decodes: int) -> int:
        return num_decodes if num_decodes <= 8 else 1 << (num_decodes - 1).bit_length()

    # ---- measurements ------------------------------------------------------------------------------------
    def record_step(self, num_decodes: int, tokens: int, seconds: float, drafted: int) -> None:
        """A decode-only step of ``num_decodes`` sequences: ``tokens`` appended, ``drafted`` tokens verified, in
        ``seconds`` from drafting to appending."""
        if not num_decodes:
            return
        if not drafted:
            values: tuple[float, ...] = (1.0, num_decodes, num_decodes * num_decodes, seconds, num_decodes * seconds)
            sums = self._plain
        elif self._plain[0]:
            plain = self.plain_time(num_decodes)
            values = (seconds, plain * tokens / num_decodes, drafted, seconds - plain)
            sums = self._drafted.setdefault(self.bucket(num_decodes), [0.0] * 5)
            sums[4] += 1
        else:
            return
        for i, v in enumerate(values):
            sums[i] = self.DECAY * sums[i] + v

    def plain_time(self, num_decodes: int) -> float:
        """Seconds of a step without drafts of ``num_decodes`` sequences (0 before any was measured)."""
        n, s1, s2, sy, sxy = self._plain
        if not n:
            return 0.0
        mean_b, mean_t = s1 / n, sy / n
        var = s2 / n - mean_b * mean_b
        slope = max((sxy / n - mean_b * mean_t) / var, 0.0) if var > 0.25 else 0.0
        return max(mean_t + slope * (num_decodes - mean_b), 1e-9)

    def draft_cost(self, num_decodes: int) -> float | None:
        """Seconds a drafted token adds to a step of this batch size, as measured there, else at the nearest batch
        size measured; None before any step with drafts."""
        key = self.bucket(num_decodes)
        measured = [b for b, sums in self._drafted.items() if sums[2]]
        if not measured:
            return None
        sums = self._drafted[min(measured, key=lambda b: (abs(math.log(b / key)), b))]
        return max(sums[3] / sums[2], 0.0)

    # ---- acceptance ------------------------------------------------------------------------------------
    @staticmethod
    def match_class(length: int) -> int:
        """Prompt-lookup matches of about the same length: 1, 2, 3, 4-5, 6-9, 10-15, 16 and more."""
        return length if length <= 3 else 4 + (length >= 6) + (length >= 10) + (length >= 16)

    @classmethod
    def match_key(cls, seq: Sequence) -> tuple[int, bool]:
        """The drafts a prompt-lookup draft's rates are pooled with: its match's class, whether the match agreed."""
        return cls.match_class(seq.spec_match), seq.spec_agreed

    def alpha(self, seq: Sequence) -> tuple[float, float]:
        """(the chance the first drafted token is accepted, that a later one is, given the one before was)."""
        if seq.spec_match:
            h0, t0, h1, t1 = self._by_match.get(self.match_key(seq), (0.0, 0.0, 0.0, 0.0))
        else:
            (h0, h1), (t0, t1) = seq.spec_hits, seq.spec_trials
        return (h0 + 1.0) / (t0 + 2.0), (h1 + 1.0) / (t1 + 2.0)

    def forget(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            for counts in (seq.spec_hits, seq.spec_trials):
                counts[0] *= self.FORGET
                counts[1] *= self.FORGET

    def record_verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        outcome = (accepted > 0, 1, max(accepted - 1, 0), min(accepted, drafted - 1))
        seq.spec_hits[0] += outcome[0]
        seq.spec_trials[0] += outcome[1]
        seq.spec_hits[1] += outcome[2]
        seq.spec_trials[1] += outcome[3]
        if seq.spec_match:
            counts = self._by_match.setdefault(self.match_key(seq), [0.0] * 4)
            for i, v in enumerate(outcome):
                counts[i] = self.FORGET_MATCH * counts[i] + v

    # ---- the plan --------------------------------------------------------------------------------------
    def mode(self, num_decodes: int) -> tuple[bool, str]:
        """(speculate this step, how: ``"plan"``; ``"first"``, one of a batch size's first steps with drafts: the
        plan, at least a token a request; ``"probe"``, from off: a token a request)."""
        key = self.bucket(num_decodes)
        sums = self._drafted.get(key)
        if not self._plain[0]:  # measure first: a step without drafts
            return False, "plan"
        if not sums or sums[4] < self.FIRST_STEPS:  # then a few with drafts, before the first decision
            return True, "first"
        on = sums[0] <= sums[1] * (self.MARGIN if self._on.get(key, True) else 1.0)
        if on != self._on.get(key):
            logger.info("speculation %s at batch %d: steps with drafts took %.3g s where plain steps would take "
                        "%.3g s", "on" if on else "off", num_decodes, sums[0], sums[1])
            self._on[key] = on
            self._probe_every[key], self._since_probe[key] = self.PROBE, 0
        self._since_probe[key] = self._since_probe.get(key, 0) + 1
        if self._since_probe[key] >= self._probe_every[key]:
            self._since_probe[key] = 0
            self._probe_every[key] = min(2 * self._probe_every[key], self.PROBE_MAX)
            return not on, "probe"
        return on, "plan"

    def plan(self, seqs: list[Sequence], caps: list[int], num_decodes: int, adaptive: list[bool]) -> list[int]:
        """Tokens to draft per sequence (at most ``caps``), in a step with ``num_decodes`` decoding sequences."""
        on, how = self.mode(num_decodes)
        ks = [0 if a else c for c, a in zip(caps, adaptive)]
        cost = self.draft_cost(num_decodes)
        if on and (cost is None or how == "probe"):  # nothing measured yet, or a probe: the cheapest try
            ks = [min(c, 1) if a else c for c, a in zip(caps, adaptive)]
        elif on:
            step, yield_ = self.plain_time(num_decodes), float(num_decodes)
            alphas = [self.alpha(s) for s in seqs]
            heap = [(-alphas[i][0], i) for i in range(len(seqs)) if adaptive[i] and caps[i] > 0]
            heapq.heapify(heap)
            while heap:
                gain, i = heapq.heappop(heap)
                gain = -gain
                if gain * step <= cost * yield_:  # this token no longer raises tokens per second
                    break
                ks[i] += 1
                step, yield_ = step + cost, yield_ + gain
                if ks[i] < caps[i]:
                    heapq.heappush(heap, (-gain * alphas[i][1], i))
            if how == "first":  # a measurement: every request drafts at least a token
                ks = [max(k, min(c, 1)) if a else k for k, c, a in zip(ks, caps, adaptive)]
        self.last_plan = {"k_mean": sum(ks) / len(ks) if ks else 0.0, "speculating": float(sum(k > 0 for k in ks)),
                          "on": float(on), "plain_step_s": self.plain_time(num_decodes), "draft_cost_s": cost or 0.0}
        return ks
