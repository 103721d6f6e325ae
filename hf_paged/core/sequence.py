"""Requests and their sequences: sampling parameters (validated), token state, and outputs.

A ``Sequence`` is one stream of tokens the engine computes; its ``num_computed_tokens`` says how much of
``token_ids`` already has K/V in its block table, so prefill, chunked prefill, decode and recompute after
preemption are all the same thing: compute the tokens not yet computed, sample when none are left.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence as Seq

import torch

from ..config import SpeculativeConfig
from .block_pool import BlockTable
from .structured_output import StructuredOutputs


@dataclass
class SamplingParams:
    """Per-request generation settings (vLLM's names; HF's generation config maps onto them)."""

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 / -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF's: on prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's: on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings
    ignore_eos: bool = False
    logprobs: bool = False  # the log-probability of each sampled token
    top_logprobs: int = 0  # also the most likely alternatives at each position (at most 20)
    keep_scores: bool = False  # keep each step's processed logits (HF output_scores)
    logits_processors: Any = None  # an HF LogitsProcessorList (or callables (input_ids, scores) -> scores)
    stop_check: Callable[[list[int]], bool] | None = None  # after each token, the output so far: True stops (kept)
    cache_salt: str | None = None
    n: int = 1  # parallel samples of one prompt (prefilled once, sharing its blocks)
    num_beams: int = 1  # beam search (HF's semantics) when > 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1  # beam search: how many of the best hypotheses to return
    structured_outputs: StructuredOutputs | None = None  # the text must match this (a JSON schema, regex, ...)
    # Speculative decoding for this request (None: the engine's; a dict of SpeculativeConfig's fields works too;
    # num_tokens=0: off). Requests with processors, penalties, grammars, kept scores or beams do not speculate.
    speculative: SpeculativeConfig | None = None

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "length_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise bad("max_new_tokens", "must be a positive integer")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be a non-negative integer")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1, 0 (off) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be an integer in [0, 20]")
        if self.top_logprobs:
            self.logprobs = True
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2 ** 63 <= self.seed < 2 ** 63):
            raise bad("seed", "must be an integer in [-2**63, 2**63)")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be a positive integer")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise bad("num_beams", "must be a positive integer")
        if self.num_beams > 1:
            if self.n > 1:
                raise bad("n", "parallel sampling and beam search do not combine; use num_return_sequences")
            if self.temperature != 0:
                raise bad("temperature", "beam search is deterministic here: set temperature=0 (no beam sampling)")
            if self.early_stopping not in (True, False, "never"):
                raise bad("early_stopping", "must be True, False or 'never'")
        if not isinstance(self.num_return_sequences, int) or not 1 <= self.num_return_sequences <= self.num_beams:
            raise bad("num_return_sequences", "must be between 1 and num_beams")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise bad("structured_outputs", "must be a StructuredOutputs")
            if self.num_beams > 1:
                raise bad("structured_outputs", "beam search does not take a constraint")
        self.speculative = SpeculativeConfig.of(self.speculative)
        if self.speculative is not None and self.speculative.num_tokens and self.num_beams > 1:
            raise bad("speculative", "beam search does not speculate")
        if self.stop_check is not None and (self.num_beams > 1 or self.n > 1):
            raise bad("stop_check", "one per sequence: not with n > 1 or beam search")
            self.structured_outputs.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"


@dataclass
class RequestOutput:
    """What a finished (or streaming) request has produced."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None = None
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob), most likely first
    scores: list[torch.Tensor] | None = None
    error: BaseException | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list["RequestOutput"] | None = None  # n > 1 or beam search: every returned sequence, best first
    score: float | None = None  # beam search: the hypothesis' length-normalised log-probability

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamDelta:
    """What a streamed request gained since its previous delta (``LLMEngine.stream_text``).

    ``text`` never contains a stop string; while one could still be forming at the end of the text, that end is
    held back. The last delta of a request has ``finish_reason`` and the whole ``output``."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: FinishReason | None = None
    output: RequestOutput | None = None


_ids = itertools.count()


class Sequence:
    """One request's token stream and its KV state (one sequence per request for now)."""

    def __init__(self, prompt_token_ids: Seq[int], params: SamplingParams, block_table: BlockTable,
                 request_id: str | None = None, eos_token_ids: Seq[int] = ()) -> None:
        self.request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.block_table = block_table
        self.num_computed_tokens = 0
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks (prefix cache)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.eos_token_ids = set(eos_token_ids)
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.scores: list[torch.Tensor] = []
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.matcher: Any = None  # structured output: the grammar's state after this sequence's tokens
        self.text: str | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed)
        self.arrival_time = time.perf_counter()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        # Streamed requests: where each StreamDelta goes (anything with put()), and how they are made.
        self.stream: "queue.SimpleQueue[StreamDelta] | None" = None
        self.detokenizer: Any = None  # an IncrementalDetokenizer, for stop strings and streamed text
        self.text_sent = 0  # characters of the detokenizer's text already streamed
        self.tokens_sent = len(self.token_ids)  # tokens already streamed (the prompt counts as sent)
        self.stop_string: str | None = None  # the stop string that ended it
        self.done = threading.Event()
        self.group: SequenceGroup | None = None
        self.pending_logits: torch.Tensor | None = None  # beam search: this beam's logits, waiting for its group
        # Speculative decoding: how (None: not), this step's drafted tokens (and their draft distributions, if
        # sampled; for prompt lookup, how many tokens the match that found them is long and whether the matched
        # tokens were followed alike wherever they occurred), the decayed counts its acceptance rate is estimated
        # from, the draft model's sequence (its own block table on the drafter's pool), and the request's counters.
        self.spec: SpeculativeConfig | None = None
        self.spec_token_ids: list[int] = []
        self.spec_probs: torch.Tensor | None = None
        self.spec_match, self.spec_agreed = 0, False
        self.spec_hits, self.spec_trials = [0.0, 0.0], [0.0, 0.0]  # a draft's first token, its later ones
        self.draft: Sequence | None = None
        self.spec_drafted = self.spec_accepted = 0

    def fork_child(self, index: int, share_blocks: bool = True) -> "Sequence":
        """A sequence continuing this one: same tokens and K/V, blocks shared (or copied if not share_blocks)."""
        params = self.params
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + index)
        table = self.block_table.fork() if share_blocks else self.block_table.copy()
        child = Sequence(self.token_ids[: self.num_prompt_tokens], params, table, f"{self.request_id}-{index}")
        child.token_ids = list(self.token_ids)
        child.stop_ids, child.eos_token_ids = self.stop_ids, self.eos_token_ids
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.arrival_time, child.first_token_time = self.arrival_time, self.first_token_time
        child.first_scheduled_time = self.first_scheduled_time
        child.group = self.group
        child.matcher = self.matcher.deep_copy() if self.matcher is not None else None
        child.spec = self.spec
        return child

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        if self.group is not None and self.group.root is self:
            return self.group.output()
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids, token_ids=self.output_token_ids,
            text=self.text, finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if self.params.logprobs else None,
            top_logprobs=list(self.top_logprobs) if self.params.top_logprobs else None,
            scores=self.scores if self.params.keep_scores else None, error=self.error,
            metrics=self.timing(),
        )

    def timing(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.first_scheduled_time is not None:
            out["queue_s"] = self.first_scheduled_time - self.arrival_time
        if self.finish_time is not None:
            out["e2e_s"] = self.finish_time - self.arrival_time
        if self.first_token_time is not None:
            out["ttft_s"] = self.first_token_time - self.arrival_time
            if self.finish_time is not None and self.num_output_tokens > 1:
                out["tpot_s"] = (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)
        if self.spec_drafted:
            out["spec_decode_num_draft_tokens"] = self.spec_drafted
            out["spec_decode_num_accepted_tokens"] = self.spec_accepted
        return out


class SequenceGroup:
    """The sequences of one request with n > 1 (parallel sampling) or num_beams > 1 (beam search).

    The root sequence (what the caller holds) is prefilled once; at its first sample it is replaced by its
    children, which share its blocks. ``live`` are the sequences still generating, ``finished`` the done ones.
    """

    def __init__(self, root: Sequence, beam_state=None) -> None:
        self.root = root
        self.live: list[Sequence] = [root]
        self.finished: list[Sequence] = []
        self.beam = beam_state
        self.decode: Callable[[list[int]], str] | None = None  # the engine's tokenizer, for beam texts
        root.group = self

    def output(self) -> RequestOutput:
        root = self.root
        if self.beam is not None:
            samples = [RequestOutput(f"{root.request_id}-{i}", root.prompt_token_ids, ids, score=score,
                                     text=self.decode(ids) if self.decode else None,
                                     finish_reason=root.finish_reason)
                       for i, (ids, score) in enumerate(self.beam.results())] if root.error is None else []
        else:
            samples = [s.output() for s in sorted(self.finished, key=lambda s: s.request_id)]
        best = samples[0] if samples else None
        return RequestOutput(
            request_id=root.request_id, prompt_token_ids=root.prompt_token_ids,
            token_ids=best.token_ids if best else [], text=best.text if best else None,
            finish_reason=root.finish_reason, logprobs=best.logprobs if best else None,
            top_logprobs=best.top_logprobs if best else None, error=root.error,
            metrics=root.timing(), samples=samples, score=best.score if best else None,
        )
