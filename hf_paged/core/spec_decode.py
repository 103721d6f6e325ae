"""Speculative decoding, the bookkeeping half: which requests speculate, the n-gram drafter, how far to speculate.

A speculating decode sequence is scheduled with ``1 + k`` query tokens (its last sampled token and ``k`` drafted
ones, ``Sequence.spec_token_ids``); the forward verifies them all, the accepted ones are appended and the slots of
the rejected tail are given back (``BlockTable.truncate``). This module holds what needs no model:

- ``speculates(params)``: requests whose next-token distribution depends on their own tokens in ways the verifier
  does not replay (logits processors, penalties, grammars, kept scores, beams) do not speculate;
- ``ngram_draft``: prompt lookup (the continuation of the latest earlier occurrence of the sequence's last n tokens,
  longest n first), in C speed through ``bytes.rfind`` on the token ids;
- ``SpeculationController``: how many tokens each request drafts this step (adaptive k: per request acceptance and
  a measured cost of the step per query token; the decision is logged and kept in ``last_plan``);
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


class SpeculationController:
    """How many tokens each speculating request drafts in a step.

    Each request's acceptance rate ``alpha`` (the chance a drafted token is accepted given the previous one was) is
    estimated from its verified drafts, with a prior of one accepted in two that its observations forget at 0.9 a
    step (a request that stopped drafting drifts back to the prior and tries again). The step's cost is modelled as
    ``a + b * T`` seconds for ``T`` query tokens, fitted on the engine's steps (recent ones weigh most), plus ``d``
    seconds of drafting per drafted token. Draft positions are added best first (the ``j``-th token of a request
    is accepted with chance ``alpha ** j``) while each raises the step's expected tokens per second: drafting stops
    when verifying is no longer nearly free (large batches) or acceptance is low. Not adaptive: always the cap.
    """

    PRIOR_RATIO = 1 / 32  # b / a before the steps have told it (the knee of a CPU decode step, in query tokens)
    FORGET = 0.9

    def __init__(self) -> None:
        self._sums = [0.0] * 5  # weighted sums of 1, T, T^2, t, T*t over the steps
        self.draft_cost = 0.0  # seconds per drafted token (EMA)
        self.last_plan: dict[str, float] = {"k_mean": 0.0, "speculating": 0.0}
        self._was_on: bool | None = None

    # ---- the cost model --------------------------------------------------------------------------------
    def record_step(self, num_tokens: int, seconds: float) -> None:
        w = self._sums
        for i, v in enumerate((1.0, num_tokens, num_tokens * num_tokens, seconds, num_tokens * seconds)):
            w[i] = 0.95 * w[i] + v

    def record_drafting(self, num_tokens: int, seconds: float) -> None:
        if num_tokens:
            per = seconds / num_tokens
            self.draft_cost = per if not self.draft_cost else 0.8 * self.draft_cost + 0.2 * per

    def cost(self) -> tuple[float, float]:
        """(a, b): seconds of a step of ``T`` query tokens are ``a + b * T``."""
        n, s1, s2, sy, sxy = self._sums
        if n < 1e-9:
            return 1.0, self.PRIOR_RATIO
        mean_t, mean_y = s1 / n, sy / n
        var = s2 / n - mean_t * mean_t
        b = (sxy / n - mean_t * mean_y) / var if var > 0.25 else -1.0
        if b <= 0:  # one step size seen so far, or noise: the prior's shape at the measured level
            a = mean_y / (1 + self.PRIOR_RATIO * mean_t)
            return a, a * self.PRIOR_RATIO
        return max(mean_y - b * mean_t, b), b

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
    def plan(self, seqs: list[Sequence], caps: list[int], base_tokens: int, base_yield: int,
             adaptive: list[bool]) -> list[int]:
        """Tokens to draft per sequence (at most ``caps``), for a step of ``base_tokens`` query tokens that yields
        ``base_yield`` tokens without speculation."""
        ks = [0 if a else c for c, a in zip(caps, adaptive)]
        a, b = self.cost()
        d = self.draft_cost
        tokens, yield_, drafted = base_tokens + sum(ks), float(base_yield), sum(ks)
        alphas = [self.alpha(s) for s in seqs]
        heap = [(-alphas[i], i) for i in range(len(seqs)) if adaptive[i] and caps[i] > 0]
        heapq.heapify(heap)
        while heap:
            gain, i = heapq.heappop(heap)
            gain = -gain
            # Adding this token raises tokens per second iff gain / (b + d) > yield / time.
            if gain * (a + b * tokens + d * drafted) <= (b + d) * yield_:
                break
            ks[i] += 1
            tokens, yield_, drafted = tokens + 1, yield_ + gain, drafted + 1
            if ks[i] < caps[i]:
                heapq.heappush(heap, (-gain * alphas[i], i))
        on = any(ks)
        self.last_plan = {"k_mean": sum(ks) / len(ks) if ks else 0.0, "speculating": float(sum(k > 0 for k in ks)),
                          "cost_a_s": a, "cost_b_s": b, "draft_cost_s": d}
        if seqs and on != self._was_on:
            logger.info("speculation %s: %d requests, mean k %.2f, mean acceptance %.2f, step cost %.2g s + %.2g s "
                        "per token, drafting %.2g s per token", "on" if on else "off", len(seqs),
                        self.last_plan["k_mean"], sum(alphas) / len(alphas), a, b, d)
            self._was_on = on
        return ks
