"""Next-token selection for a batch of sequences, vectorised over the batch.

Order, as in HF: per-request logits processors, repetition / presence / frequency penalties, the min-new-tokens ban
on stop tokens, the structured-output masks (constrained rows only); then greedy rows take the argmax and sampled rows
go through temperature, top-k, top-p and min-p and draw from the result. A request with a seed draws from its own
generator, so its tokens do not depend on what else is in the batch. Logprobs are those of the model's raw
distribution (as vLLM reports them), with the ``top_logprobs`` most likely alternatives where asked.
"""

from __future__ import annotations

import torch

from .kernels.cpu_fused_ops import argmax_rows
from ..core.sequence import Sequence
from ..core.structured_output import GrammarCompiler

TopLogprobs = list[list[tuple[int, float]]]


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[row, ids]
            penalized = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
            big = torch.finfo(logits.dtype).max  # an extreme penalty saturates instead of making inf - inf = NaN
            logits[row, ids] = penalized.clamp(-big, big)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _warp(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on the rows that sample; returns the warped logits."""
    dev = logits.device
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=dev)
    logits = (logits / temps.unsqueeze(1)).nan_to_num(float("-inf"), torch.finfo(logits.dtype).max, float("-inf"))
    vocab = logits.shape[1]
    top_k = [min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    if all(k >= vocab for k in top_k) and all(p >= 1 for p in top_p) and not any(min_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev).unsqueeze(0)
    remove = rank >= torch.tensor(top_k, device=dev).unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
    cum = probs.cumsum(-1)
    remove |= (cum - probs) > torch.tensor(top_p, dtype=probs.dtype, device=dev).unsqueeze(1)
    remove |= probs < probs[:, :1] * torch.tensor(min_p, dtype=probs.dtype, device=dev).unsqueeze(1)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` from one uniform in [0, 1) per row: the first token whose cumulative
    probability exceeds it. (``torch.multinomial`` costs some twenty times more on a CPU at vocabulary sizes.)"""
    cum = probs.cumsum(-1)
    total = cum[:, -1:]
    # Below the total, strictly: the token found then always has a non-zero probability.
    targets = torch.minimum(uniforms.unsqueeze(1).to(cum.dtype) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cum, targets, right=True).squeeze(1)


class Sampler:
    def __init__(self, c_argmax: bool = True) -> None:
        self.c_argmax = c_argmax  # greedy rows' argmax in one C call (CPU kernels on)
        self.grammars: GrammarCompiler | None = None  # set with the first constrained request

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 inplace: bool = False) -> tuple[list[int], list[float] | None, TopLogprobs | None]:
        """logits ``[B, vocab]`` fp32 for ``seqs`` -> (next token per row, its logprob per row or None, the
        ``top_logprobs`` best (id, logprob) pairs per row or None).
        ``inplace``: the caller's logits may be overwritten (saves a copy of ``[B, vocab]`` a step); they are
        copied anyway where raw logits (logprobs), kept scores or user processors are involved."""
        if not inplace or any(s.params.logprobs or s.params.keep_scores or s.params.logits_processors for s in seqs):
            return self._select(logits, logits.clone(), seqs)
        # The engine's logits are inference tensors: writing into them is allowed in inference mode only.
        with torch.inference_mode(logits.is_inference()):
            return self._select(logits, logits, seqs)

    def _select(self, raw: torch.Tensor, logits: torch.Tensor,
                seqs: list[Sequence]) -> tuple[list[int], list[float] | None, TopLogprobs | None]:
        for row, seq in enumerate(seqs):
            procs = seq.params.logits_processors
            if procs:
                ids = torch.tensor([seq.token_ids], dtype=torch.long, device=logits.device)
                try:
                    logits[row : row + 1] = procs(ids, logits[row : row + 1])
                except Exception as exc:  # a request's own processor fails that request only
                    seq.error = exc
        if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
               for s in seqs):
            _apply_penalties(logits, seqs)
        banned = [(row, token) for row, seq in enumerate(seqs)
                  if seq.num_output_tokens < seq.params.min_new_tokens for token in seq.stop_ids]
        if banned:  # min_new_tokens: one indexed write for all rows (one host-to-device copy on a GPU)
            index = torch.tensor(banned, dtype=torch.long, pin_memory=logits.is_cuda)
            index = index.to(logits.device, non_blocking=True)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        constrained = [row for row, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:
            self.grammars.mask_rows(logits, constrained, [seqs[row].matcher for row in constrained])

        tokens = argmax_rows(logits) if self.c_argmax else None  # one C call on the CPU
        if tokens is None:
            tokens = logits.max(dim=-1).indices  # the first maximum, like argmax, in less than half its time
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            warped = _warp(logits[idx], [seqs[i] for i in sampled])
            uniforms = torch.rand(len(sampled), dtype=torch.float32)
            for j, i in enumerate(sampled):
                if seqs[i].generator is not None:
                    uniforms[j] = torch.rand(1, generator=seqs[i].generator)[0]
            drawn = _inverse_cdf(warped.softmax(-1), uniforms.to(logits.device))
            for j in (drawn >= logits.shape[1]).nonzero().flatten().tolist():  # not one token left to draw
                seqs[sampled[j]].error = ValueError("sampling: no token has a probability under these parameters")
            tokens[idx] = drawn.clamp(max=logits.shape[1] - 1)
            for j, i in enumerate(sampled):
                if seqs[i].params.keep_scores:
                    logits[i] = warped[j]
        for row, seq in enumerate(seqs):
            if seq.params.keep_scores:
                seq.scores.append(logits[row].clone())
        token_list = tokens.tolist()
        logprobs = top = None
        if any(s.params.logprobs for s in seqs):
            log_probs = torch.log_softmax(raw, dim=-1)
            logprobs = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            k = max(s.params.top_logprobs for s in seqs)
            if k:
                values, ids = log_probs.topk(k, dim=-1)
                values, ids = values.tolist(), ids.tolist()
                top = [list(zip(ids[r][:s.params.top_logprobs], values[r][:s.params.top_logprobs]))
                       for r, s in enumerate(seqs)]
        return token_list, logprobs, top
