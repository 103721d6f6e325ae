"""What happens to a step's sampled tokens: the requests' side of the engine, after the forward and the sampler.

For each sampled token the ``OutputProcessor`` appends it (with its logprobs), detokenizes incrementally where
text is needed (stop strings, streaming; :mod:`~hf_paged.detokenizer`), checks the stop conditions on the new
text only, sends the request's ``StreamDelta``, and finishes it: its blocks go back through the scheduler, its
waiter is woken. It also keeps the bookkeeping of requests made of several sequences (``SequenceGroup``): the
prompt of an ``n > 1`` request forks into its samples after the prefill, and beam-search groups advance when
all of their beams have their logits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..detokenizer import IncrementalDetokenizer
from .metrics import EngineMetrics
from ..core.scheduler import Scheduler
from ..core.sequence import FinishReason, Sequence, SequenceGroup, StreamDelta


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, metrics: EngineMetrics, tokenizer: Any, max_model_len: int,
                 share_blocks: bool = True) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.share_blocks = share_blocks
        self.requests: dict[str, Sequence] = {}  # unfinished requests by id (their root sequence)

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        if self.tokenizer is not None and (seq.stream is not None or seq.params.stop):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        self.metrics.prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.finished:
            if seq.group is not None:
                self.finish_group(seq.group, FinishReason.ABORT)
            else:
                self.finish(seq, FinishReason.ABORT)

    def fail(self, seqs: list[Sequence], error: BaseException) -> list[Sequence]:
        """A step failed: every request in it finishes with the error (its blocks freed)."""
        for seq in seqs:
            if seq.group is not None:
                self.finish_group(seq.group, FinishReason.ERROR, error)
            elif not seq.finished:
                self.finish(seq, FinishReason.ERROR, error)
        return list(seqs)

    # ---- after the forward ---------------------------------------------------------------------
    def rows_to_sample(self, scheduled: list[Sequence], logits: torch.Tensor,
                       rows: list[int]) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences that sample this step and their logits. A beam keeps its logits for its group; the prompt
        of an ``n > 1`` request is replaced by its ``n`` samples (sharing its blocks), each sampling from its row."""
        sampling: list[Sequence] = []
        sample_rows: list[int] = []
        for row, seq in enumerate(scheduled[r] for r in rows):  # row: the seq's row of logits
            group = seq.group
            if group is not None and group.beam is not None:
                seq.pending_logits = logits[row]
            elif group is not None and seq is group.root:
                children = [seq.fork_child(i, self.share_blocks) for i in range(seq.params.n)]
                for child in children:
                    child.detokenizer = (IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
                                         if seq.detokenizer is not None else None)
                    child.stream = seq.stream
                group.live = children
                self.scheduler.replace([seq], children)
                sampling.extend(children)
                sample_rows.extend([row] * len(children))
            else:
                sampling.append(seq)
                sample_rows.append(row)
        if sample_rows != list(range(len(rows))):  # n > 1 repeats the prompt's row; beams take theirs out
            logits = logits[sample_rows] if sample_rows else logits[:0]
        return sampling, logits

    def advance_beams(self, seqs: list[Sequence]) -> None:
        """Run a beam-search step for every group whose live beams all have their logits."""
        groups = {id(s.group): s.group for s in seqs if s.group is not None and s.group.beam is not None}
        for group in groups.values():
            beams = group.live
            if any(b.pending_logits is None for b in beams):
                continue
            logits = torch.stack([b.pending_logits for b in beams])
            if len(beams) == 1:  # the prompt: HF starts from k identical beams
                logits = logits.expand(group.beam.k, -1)
            pairs = group.beam.step(logits)
            for b in beams:
                b.pending_logits = None
            if group.root.first_token_time is None:
                group.root.first_token_time = time.perf_counter()
            if group.beam.done:
                self.finish_group(group, FinishReason.STOP)
                continue
            children = []
            for i, (parent, token) in enumerate(pairs):
                child = beams[parent].fork_child(i, self.share_blocks)
                child.token_ids.append(token)
                children.append(child)
            group.live = children
            self.scheduler.replace(beams, children)

    def process(self, seqs: list[Sequence], reasons: list[FinishReason | None]) -> list[Sequence]:
        """After the scheduler appended the step's tokens (``reasons``: stopped by token or length): detokenize, check
        stop strings, stream, finish what stopped; returns the finished sequences."""
        finished = []
        self.metrics.generation_tokens += len(seqs)
        for seq, reason in zip(seqs, reasons):
            # A stop token's text is not shown; the last token of a completed grammar is.
            shown = reason in (None, FinishReason.LENGTH) or (reason == FinishReason.STOP
                                                              and seq.token_ids[-1] not in seq.stop_ids)
            if seq.detokenizer is not None and shown:
                new_text = seq.detokenizer.add(seq.token_ids[-1])
                if seq.params.stop and new_text and self._find_stop_string(seq, len(new_text)):
                    reason = FinishReason.STOP
            if reason is not None:
                self.finish(seq, reason, seq.error)
                finished.append(seq)
            elif seq.stream is not None:
                self._send(seq, final=False)
        return finished

    @staticmethod
    def _find_stop_string(seq: Sequence, new_chars: int) -> bool:
        """Whether a stop string ends in the text's last ``new_chars`` characters; the text is cut before it."""
        detok = seq.detokenizer
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, detok.length - new_chars - longest + 1)  # only where a new character can complete a stop
        window = detok.text_from(start)
        hits = [(i, s) for i, s in ((window.find(s), s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        first, seq.stop_string = min(hits)
        seq.text = detok.text[: start + first]
        return True

    def _send(self, seq: Sequence, final: bool) -> None:
        """Stream what the sequence gained since its last delta. Text that could still begin a stop string is held
        back until the sequence finishes."""
        new_ids = seq.token_ids[seq.tokens_sent:]
        seq.tokens_sent = len(seq.token_ids)
        text = ""
        detok = seq.detokenizer
        if detok is not None:
            if final and seq.stop_string is not None:
                text = seq.text[seq.text_sent:]  # cut before the stop string
            else:
                if final:
                    detok.flush()
                held = 0 if final else max((len(s) - 1 for s in seq.params.stop), default=0)
                end = detok.length - held
                if end > seq.text_sent:
                    text = detok.text_from(seq.text_sent)[: end - seq.text_sent]
            seq.text_sent += len(text)
        n = len(new_ids)
        seq.stream.put(StreamDelta(
            request_id=seq.request_id, text=text, token_ids=new_ids,
            logprobs=seq.logprobs[len(seq.logprobs) - n:] if seq.params.logprobs and n else None,
            top_logprobs=seq.top_logprobs[len(seq.top_logprobs) - n:] if seq.params.top_logprobs and n else None,
            finish_reason=seq.finish_reason if final else None, output=seq.output() if final else None))

    # ---- finishing -----------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        group = seq.group
        if seq.text is None and self.tokenizer is not None and (group is None or group.beam is None):
            seq.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if group is None or seq is not group.root or group.beam is not None:
            self.metrics.record_finish(seq)
        if seq.stream is not None:
            self._send(seq, final=True)
        if group is not None and seq is not group.root:
            if seq in group.live:
                group.live.remove(seq)
            if group.beam is None:
                group.finished.append(seq)
            if not group.live:
                self.finish_group(group, reason, error)
            return
        self.requests.pop(seq.request_id, None)
        seq.done.set()

    def finish_group(self, group: SequenceGroup, reason: FinishReason, error: BaseException | None = None) -> None:
        for seq in list(group.live):
            if seq is not group.root:
                self.finish(seq, reason, error)
        root = group.root
        if not root.finished:
            if group.beam is None and group.finished:
                reason = group.finished[0].finish_reason if reason == FinishReason.STOP else reason
            self.finish(root, reason, error)
