"""The draft-model drafter: a smaller causal LM with the target's vocabulary proposes each speculating request's
next tokens, batched over the requests, on its own paged KV (its own ``ModelRunner``, ``KVCache`` and block pool).

Each request has a draft-side ``Sequence`` (``seq.draft``; its block table on the drafter's pool, freed with the
request's own blocks). A step first rolls the draft's K/V back to the tokens it shares with the request (drafted
tokens the target rejected are dropped), then runs one ragged forward over every request's tokens the draft has not
seen (the prompt, the first time; then the accepted tokens and the target's last one), then ``k - 1`` one-token
forwards, each sampling the next draft token per request: the argmax for greedy requests, else a draw from the
request's own warped distribution (temperature, top-k/p, min-p), kept in ``seq.spec_probs`` for the verifier's
rejection rule. A request whose draft K/V does not fit in the pool drafts nothing that step.
"""

from __future__ import annotations

import torch

from ..admission import engine_refusal, recurrent_mixers
from ..config import EngineConfig
from ..core.block_pool import BlockPool, BlockTable
from ..core.scheduler import ScheduledSequence, SchedulerOutput
from ..core.sequence import Sequence
from .kv_cache import model_kv_cache
from .model_runner import ModelRunner
from .plan import build_plan
from .sampler import _inverse_cdf, _warp


class DraftModelDrafter:
    drafts_first = False

    def __init__(self, model: torch.nn.Module, config: EngineConfig, num_blocks: int, vocab_size: int) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"speculative.draft_model: must be a causal LM module (got {type(model).__name__})")
        refusal = engine_refusal(model) or ("recurrent layers (a draft's state cannot be rolled back)"
                                            if recurrent_mixers(model) else None)
        if refusal is not None:
            raise ValueError(f"speculative.draft_model: the engine cannot run it ({refusal})")
        param = next(model.parameters())
        options = {**config.plan_options(), "cuda_graphs": False}
        plan = build_plan(param.device, param.dtype, **options)
        kv = model_kv_cache(model, block_size=config.block_size, num_blocks=num_blocks,
                            kv_cache_dtype=config.kv_cache_dtype)
        self.runner = ModelRunner(model, kv, plan)
        self.pool = BlockPool(kv.num_blocks, config.block_size)
        self.vocab_size = vocab_size

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        active: list[tuple[Sequence, int]] = []
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids, seq.spec_probs = [], None
            if k <= 0:
                continue
            d = seq.draft
            if d is None:
                d = seq.draft = Sequence(seq.token_ids, seq.params, BlockTable(self.pool), seq.request_id)
            else:  # keep the draft's K/V of the tokens the target kept (only its last drafts can differ)
                target, n = seq.token_ids, d.num_computed_tokens
                common = max(0, n - len(d.spec_token_ids))
                while common < n and common < len(target) - 1 and d.token_ids[common] == target[common]:
                    common += 1  # the target's last token is always fed again: its logits draft the next
                d.num_computed_tokens = common
                d.block_table.truncate(common)
                d.token_ids = list(target)
            d.spec_token_ids = []
            if d.block_table.append_slots(len(d.token_ids) - d.num_computed_tokens + k - 1) is None:
                d.block_table.truncate(d.num_computed_tokens)
                continue
            active.append((seq, k))
        if not active:
            return
        active.sort(key=lambda item: len(item[0].draft.token_ids) - item[0].draft.num_computed_tokens != 1)
        probs: dict[int, list[torch.Tensor]] = {id(seq): [] for seq, _ in active}
        step = [(seq, seq.draft.token_ids[seq.draft.num_computed_tokens:]) for seq, _ in active]
        for j in range(max(k for _, k in active)):
            tokens = self._forward(step, probs)
            for (seq, fed), token in zip(step, tokens):
                seq.draft.num_computed_tokens += len(fed)
                seq.spec_token_ids.append(token)
            step = [(seq, [seq.spec_token_ids[-1]]) for seq, k in active if k > j + 1]
            for seq, fed in step:
                seq.draft.token_ids.append(fed[0])
                seq.draft.spec_token_ids.append(fed[0])
        for seq, _ in active:
            if not seq.params.greedy:
                seq.spec_probs = torch.stack(probs[id(seq)])

    def _forward(self, step: list[tuple[Sequence, list[int]]], probs: dict[int, list[torch.Tensor]]) -> list[int]:
        """One forward of the draft model over ``(request, tokens it computes)``; the next draft token of each."""
        out = SchedulerOutput([ScheduledSequence(seq.request_id, fed, seq.draft.num_computed_tokens,
                                                 list(seq.draft.block_table.blocks), True) for seq, fed in step],
                              self.pool.take_copies())
        logits, _ = self.runner.execute(out)
        v = self.vocab_size
        if logits.shape[1] != v:  # the draft's vocabulary padded otherwise: the target's ids only
            logits = logits[:, :v] if logits.shape[1] > v else torch.nn.functional.pad(
                logits, (0, v - logits.shape[1]), value=float("-inf"))
        tokens = logits.max(dim=-1).indices.tolist()
        sampled = [i for i, (seq, _) in enumerate(step) if not seq.params.greedy]
        if sampled:
            seqs = [step[i][0] for i in sampled]
            q = _warp(logits[sampled], seqs).softmax(-1)
            uniforms = torch.stack([torch.rand(1, generator=s.generator)[0] for s in seqs])
            drawn = _inverse_cdf(q, uniforms.to(q.device)).clamp(max=v - 1).tolist()
            for row, (i, seq) in enumerate(zip(sampled, seqs)):
                tokens[i] = drawn[row]
                probs[id(seq)].append(q[row])
        return tokens

    def sleep(self) -> None:
        """Free the draft's KV tensors and packed weights (the engine sleeps: no request holds draft blocks)."""
        self.runner.sleep()

    def wake_up(self) -> None:
        """Its KV again, and packed weights re-derived from the draft model's weights as they are now."""
        self.runner.wake_up()

    def close(self) -> None:
        self.runner.close()
