"""Next-token selection for a batch of sequences, vectorised over the batch.

Order, as in HF: per-request logits processors, repetition / presence / frequency penalties, the min-new-tokens ban
on stop tokens, the structured-output masks (constrained rows only); then greedy rows take the argmax and sampled rows
go through temperature, top-k, top-p and min-p and draw from the result. A request with a seed draws from its own
generator, so its tokens do not depend on what else is in the batch. Logprobs are those of the model's raw
distribution (as vLLM reports them), with the ``top_logprobs`` most likely alternatives where asked.

``verify`` checks drafted tokens (speculative decoding) against the logits at each of their positions: greedy rows
accept while the argmax equals the draft, then take the argmax; sampled rows use the rejection rule (draft ``x``
kept with probability ``min(1, p(x) / q(x))``, else a token drawn from ``max(0, p - q)`` renormalised; after a fully
accepted draft one more from ``p``), ``q`` one-hot for drafts without a distribution, so each token's distribution is
``p``'s as without speculation.
"""

from __future__ import annotations

import torch

from .kernels.cpu_fused_ops import argmax_rows
from ..core.sequence import Sequence
from ..core.structured_output import GrammarCompiler

TopLogprobs = list[list[tuple[int, float]]]
Verified = tuple[list[int], list[float] | None, TopLogprobs | None]


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

    def verify(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Verified]:
        """logits ``[sum(1 + k_i), vocab]`` fp32: for each sequence, in order, the rows of its last token and of its
        ``k_i`` drafted tokens (``seq.spec_token_ids``; sampled drafts' distributions in ``seq.spec_probs``) -> per
        sequence (the accepted drafted tokens then one more, their logprobs or None, top logprobs or None)."""
        counts = [1 + len(s.spec_token_ids) for s in seqs]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        row_seqs = [s for s, c in zip(seqs, counts) for _ in range(c)]
        raw = logits
        if any(s.params.logprobs for s in seqs) or any(s.num_output_tokens < s.params.min_new_tokens for s in seqs):
            logits = logits.clone()
        banned = [(starts[i] + j, token) for i, s in enumerate(seqs) for j in range(counts[i])
                  if s.num_output_tokens + j < s.params.min_new_tokens for token in s.stop_ids]
        if banned:
            index = torch.tensor(banned, dtype=torch.long, device=logits.device)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        greedy_ids = argmax_rows(logits) if self.c_argmax else None
        if greedy_ids is None:
            greedy_ids = logits.max(dim=-1).indices
        greedy_ids = greedy_ids.cpu()
        # Greedy rows: the drafted tokens accepted, for all sequences in one comparison (-1 pads: never a token).
        width = max(counts) - 1
        drafts = torch.tensor([s.spec_token_ids + [-1] * (width - len(s.spec_token_ids)) for s in seqs])
        at = torch.tensor(starts[:-1]).unsqueeze(1) + torch.arange(width).unsqueeze(0)
        accepted = (greedy_ids[at.clamp(max=len(row_seqs) - 1)] == drafts).cumprod(1).sum(1).tolist()
        greedy_ids = greedy_ids.tolist()
        sampled = [r for r, s in enumerate(row_seqs) if not s.params.greedy]
        probs = {}
        if sampled:
            warped = _warp(logits[sampled], [row_seqs[r] for r in sampled]).softmax(-1)
            probs = {r: warped[j] for j, r in enumerate(sampled)}
        out_tokens = []
        for i, seq in enumerate(seqs):
            draft, base = seq.spec_token_ids, starts[i]
            if seq.params.greedy:
                n = accepted[i]
                out_tokens.append(draft[:n] + [greedy_ids[base + n]])
            else:
                out_tokens.append(self._rejection(seq, draft, [probs[base + j] for j in range(counts[i])]))
        logprobs: list = [None] * len(seqs)
        tops: list = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            if seq.params.logprobs:
                rows = torch.log_softmax(raw[starts[i]:starts[i] + len(out_tokens[i])], dim=-1)
                ids = torch.tensor(out_tokens[i], device=rows.device)
                logprobs[i] = rows.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
                if seq.params.top_logprobs:
                    values, top_ids = rows.topk(seq.params.top_logprobs, dim=-1)
                    tops[i] = [list(zip(a, b)) for a, b in zip(top_ids.tolist(), values.tolist())]
        return list(zip(out_tokens, logprobs, tops))

    @staticmethod
    def _rejection(seq: Sequence, draft: list[int], p: list[torch.Tensor]) -> list[int]:
        """Rejection sampling of one sequence's draft against its target distributions ``p`` (one per draft token
        and one after the last)."""
        q = seq.spec_probs

        def uniform() -> float:
            return float(torch.rand(1, generator=seq.generator)[0])

        def draw(dist: torch.Tensor) -> int:
            token = int(_inverse_cdf(dist.unsqueeze(0), torch.tensor([uniform()], device=dist.device))[0])
            return min(token, dist.shape[0] - 1)

        tokens = []
        for j, x in enumerate(draft):
            px = float(p[j][x])
            qx = float(q[j][x]) if q is not None else 1.0
            if qx > 0 and uniform() * qx < px:  # accept with probability min(1, p(x) / q(x))
                tokens.append(x)
                continue
            residual = p[j].clone()
            if q is None:
                residual[x] = 0.0
            else:
                residual = (residual - q[j].to(residual.dtype)).clamp_min_(0.0)
            tokens.append(draw(residual if float(residual.sum()) > 0 else p[j]))
            return tokens
        tokens.append(draw(p[len(draft)]))
        return tokens
