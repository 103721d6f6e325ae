"""Beam search for one request inside the engine, with HF's exact selection rules.

The state is that of HF's vectorised ``_beam_search`` for a batch of one (running beams and their
scores, the finished hypotheses, the early-stopping heuristic), and each step calls the same
``GenerationMixin`` helpers (``_get_top_k_continuations``, ``_get_running_beams_for_next_iteration``,
``_update_finished_beams``, ...), so the chosen sequences equal ``generate(num_beams=k)``. What the engine
adds is memory: a step returns, for each new running beam, the old beam it continues, and the engine forks
that beam's block table (reference counts) instead of copying its K/V.
"""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerationMixin

_NEG = -1.0e9


class BeamSearchState:
    def __init__(self, prompt_ids: list[int], num_beams: int, max_new_tokens: int, eos_token_ids: list[int],
                 length_penalty: float, early_stopping: bool | str, num_return_sequences: int, pad_token_id: int,
                 min_new_tokens: int = 0) -> None:
        k = num_beams
        self.k = k
        self.prompt_len = p = len(prompt_ids)
        self.max_length = p + max_new_tokens
        self.cur_len = p
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_return_sequences = num_return_sequences
        self.min_new_tokens = min_new_tokens
        self.beams_to_keep = max(2, 1 + len(eos_token_ids)) * k
        self.top_num_beam_mask = torch.cat((torch.ones(k, dtype=torch.bool),
                                            torch.zeros(self.beams_to_keep - k, dtype=torch.bool)))
        self.running_sequences = torch.full((1, k, self.max_length), pad_token_id, dtype=torch.long)
        self.running_sequences[:, :, :p] = torch.tensor(prompt_ids)
        self.sequences = self.running_sequences.clone()
        self.running_beam_scores = torch.zeros((1, k))
        self.running_beam_scores[:, 1:] = _NEG
        self.beam_scores = torch.full((1, k), _NEG)
        self.is_sent_finished = torch.zeros((1, k), dtype=torch.bool)
        self.heuristic_unsatisfied = torch.ones((1, 1), dtype=torch.bool)
        self.running_beam_indices = torch.full((1, k, max_new_tokens), -1, dtype=torch.int32)
        self.beam_indices = self.running_beam_indices.clone()
        self.done = False

    def step(self, logits: torch.Tensor) -> list[tuple[int, int]]:
        """logits ``[k, vocab]`` of the running beams, in order -> (parent beam, token) of the new running beams."""
        m = GenerationMixin
        k, cur_len, p = self.k, self.cur_len, self.prompt_len
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if cur_len - p < self.min_new_tokens and len(self.eos):
            log_probs[:, self.eos] = float("-inf")
        log_probs = (log_probs.view(1, k, -1) + self.running_beam_scores[:, :, None]).reshape(1, -1)
        topk_log_probs, topk_seqs, topk_beam_indices = m._get_top_k_continuations(
            m, accumulated_log_probs=log_probs, running_sequences=self.running_sequences,
            running_beam_indices=self.running_beam_indices, cur_len=cur_len, decoder_prompt_len=p,
            do_sample=False, beams_to_keep=self.beams_to_keep, num_beams=k, batch_size=1,
            vocab_size=logits.shape[-1])  # transformers < 5.23 requires it, later ones ignore it
        last = topk_seqs[:, :, cur_len]
        hits = torch.isin(last, self.eos) | (cur_len + 1 >= self.max_length)
        self.running_sequences, self.running_beam_scores, self.running_beam_indices = \
            m._get_running_beams_for_next_iteration(m, topk_log_probs=topk_log_probs, topk_running_sequences=topk_seqs,
                                                    topk_running_beam_indices=topk_beam_indices,
                                                    next_token_hits_stopping_criteria=hits, num_beams=k)
        self.sequences, self.beam_scores, self.beam_indices, self.is_sent_finished = m._update_finished_beams(
            m, sequences=self.sequences, topk_running_sequences=topk_seqs, beam_scores=self.beam_scores,
            topk_log_probs=topk_log_probs, beam_indices=self.beam_indices, topk_running_beam_indices=topk_beam_indices,
            is_early_stop_heuristic_unsatisfied=self.heuristic_unsatisfied, is_sent_finished=self.is_sent_finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=self.top_num_beam_mask, num_beams=k,
            cur_len=cur_len, decoder_prompt_len=p, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping)
        parents = self.running_beam_indices[0, :, cur_len - p].tolist()
        tokens = self.running_sequences[0, :, cur_len].tolist()
        self.cur_len = cur_len = cur_len + 1
        self.heuristic_unsatisfied = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.heuristic_unsatisfied,
            running_beam_scores=self.running_beam_scores, beam_scores=self.beam_scores,
            is_sent_finished=self.is_sent_finished, cur_len=cur_len, max_length=self.max_length,
            decoder_prompt_len=p, early_stopping=self.early_stopping, length_penalty=self.length_penalty)
        self.done = not bool(m._beam_search_has_unfinished_sequences(
            self.heuristic_unsatisfied, self.is_sent_finished, hits, self.early_stopping))
        return list(zip(parents, tokens))

    def results(self) -> list[tuple[list[int], float]]:
        """The best ``num_return_sequences`` hypotheses: (generated token ids, score)."""
        out = []
        for i in range(self.num_return_sequences):
            length = int((self.beam_indices[0, i] >= 0).sum())
            out.append((self.sequences[0, i, self.prompt_len:self.prompt_len + length].tolist(),
                        float(self.beam_scores[0, i])))
        return out
