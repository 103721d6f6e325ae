"""One step's forward inputs from the scheduler's plain ``SchedulerOutput``: the same builder for the eager forward,
the CUDA graphs' staging and every tensor-parallel rank.

All scheduled tokens are flattened into a single row ``[1, T]`` with their own positions; the paged metadata (slots,
block tables, lengths) rides in the forward's kwargs to the registered ``hf_paged`` attention. Its rows are the
scheduled sequences, one-token ones (decodes) first. A sequence verifying a draft attends either as one causal chunk of
its ``1 + num_draft`` tokens (the prefill kernels, which read its K/V once for all of them: the C kernels on the CPU)
or as that many one-token rows (decodes to the attention kernels: what CUDA graphs replay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.block_pool import slot_ids
from ..core.scheduler import SchedulerOutput
from .kernels.paged_attention import PagedAttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    meta: PagedAttentionMetadata
    logits_rows: torch.Tensor  # the flattened rows whose logits are kept (the sampling sequences' last tokens)
    sample_rows: list[int]  # the scheduled sequence of each kept row (1 + num_draft rows for a drafted one)


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as one int64 tensor on ``device``: on CUDA staged in pinned host memory and copied without waiting
    (the host allocator keeps the buffer until the copy is done), so building a step's inputs never synchronises."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def build_step_inputs(step: SchedulerOutput, kv_cache, plan, layer_windows,
                      drafts_as_chunks: bool = False) -> StepInputs:
    """The forward's inputs and metadata for ``step`` on ``kv_cache`` (block tables padded with its null block); a
    drafted sequence attends as one chunk where ``drafts_as_chunks``, else as one-token rows."""
    bs, device = kv_cache.block_size, kv_cache.device
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    kv_lens: list[int] = []
    q_lens: list[int] = []
    tables: list[list[int]] = []
    cu = [0]
    sample_rows: list[int] = []
    keep: list[int] = []
    order = list(range(len(step.seqs)))
    if drafts_as_chunks and any(seq.num_draft for seq in step.seqs):  # the drafts join the chunks, after the decodes
        order.sort(key=lambda i: len(step.seqs[i].token_ids) > 1)
    for i in order:
        seq = step.seqs[i]
        start, n = seq.first_position, len(seq.token_ids)
        input_ids.extend(seq.token_ids)
        positions.extend(range(start, start + n))
        slot_mapping.extend(slot_ids(seq.block_ids or [kv_cache.null_block], start, start + n, bs))  # padding: null
        # One-token rows of a draft, each with its own causal length (the step's K/V are all written before any row
        # attends).
        attended = [(start + j + 1, 1) for j in range(n)] if seq.num_draft and not drafts_as_chunks else [(start + n, n)]
        for kv_len, q in attended:
            kv_lens.append(kv_len)
            q_lens.append(q)
            tables.append(seq.block_ids)
            cu.append(cu[-1] + q)
        if seq.samples:
            rows = 1 + seq.num_draft  # a draft is verified at each of its positions and after its last
            sample_rows.extend([i] * rows)
            keep.extend(range(cu[-1] - rows, cu[-1]))
    width = max(len(s.block_ids) for s in step.seqs)
    null = kv_cache.null_block
    # Everything in one host buffer (pinned on CUDA), copied to the device once per step, without waiting:
    # ids | positions | slots | cu_seqlens_q | kv_lens | logits rows to keep | block tables (padded).
    t, s = len(input_ids), len(tables)
    flat = input_ids + positions + slot_mapping + cu + kv_lens + keep
    for blocks in tables:
        flat += blocks
        flat += [null] * (width - len(blocks))
    num_decodes = next((r for r, q in enumerate(q_lens) if q != 1), s)
    ids, pos, slot_t, cu_q, lens, keep_t, tables = to_device(flat, device).split(
        [t, t, t, s + 1, s, len(keep), s * width])
    meta = PagedAttentionMetadata(
        slot_mapping=slot_t, block_tables=tables.view(s, width), kv_lens=lens.to(torch.int32), cu_seqlens_q=cu_q,
        num_decodes=num_decodes, kv_lens_list=kv_lens, q_lens_list=q_lens,
        block_size=bs, kv_cache=kv_cache, plan=plan, layer_windows=layer_windows, positions=pos)
    return StepInputs(ids.view(1, t), pos.view(1, t), meta, keep_t, sample_rows)
