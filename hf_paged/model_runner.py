"""One forward per engine step over a ragged, unpadded batch, through the unmodified HF model.

All scheduled tokens are flattened into a single row ``[1, T]`` with their own positions; the paged
metadata (slots, block tables, lengths) rides in the forward's kwargs to the registered ``hf_paged``
attention, which writes the new K/V into the pool and attends over the blocks. A ready 4-D mask
placeholder makes transformers skip building a ``[T, T]`` mask. Logits are computed only for the last
token of the sequences that sample this step (``logits_to_keep``).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from .block_pool import BlockPool
from .kernels.paged_attention import PagedAttentionMetadata
from .patches.compiled_layers import compile_layers, compile_settings, uncompile_layers
from .patches.fused_layers import fuse_layers, unfuse_layers
from .patches.linear import pack_linear_weights, packed_linears
from .scheduler import ScheduledStep


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: BlockPool, compile: bool = False,
                 pack_weights: bool = False, fuse: bool = False) -> None:
        self.model = model
        uncompile_layers(model)  # a previous engine's compiled layers, if any
        num_fused, grouped = fuse_layers(model) if fuse and not compile else (0, [])
        if not num_fused:
            unfuse_layers(model)
        self.fused = num_fused > 0
        # Packed oneDNN weights; compiled layers reach them through the hf_paged::packed_linear op.
        self.packed = pack_weights and pack_linear_weights(model, skip=grouped) > 0
        self.compiled = compile and compile_layers(model)
        self.pool = pool
        self.device = pool.device
        # transformers returns a 4-D mask unchanged, so no causal mask is built; hf_paged ignores it.
        self._mask_placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.num_forward_tokens = 0

    def build(self, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata, list[int]]:
        """(input_ids, position_ids, metadata, sampling rows) of one step."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        kv_lens: list[int] = []
        cu = [0]
        sample_rows: list[int] = []
        num_decodes = 0
        for i, (seq, n) in enumerate(zip(step.seqs, step.num_new_tokens)):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table.slots(start, end))
            tables.append(seq.block_table.blocks)
            kv_lens.append(end)
            cu.append(cu[-1] + n)
            if n == 1 and num_decodes == i:
                num_decodes += 1
            if end == seq.num_tokens:
                sample_rows.append(i)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev),
            kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.long, device=dev),
            num_decodes=num_decodes,
            kv_lens_list=kv_lens,
            q_lens_list=list(step.num_new_tokens),
            block_size=self.pool.block_size,
            pool=self.pool,
        )
        ids = torch.tensor([input_ids], dtype=torch.long, device=dev)
        pos = torch.tensor([positions], dtype=torch.long, device=dev)
        return ids, pos, meta, sample_rows

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> tuple[torch.Tensor, list[int]]:
        """Run the step's forward; returns (logits ``[num_sampling, vocab]`` in fp32, their row indices)."""
        ids, pos, meta, sample_rows = self.build(step)
        self.pool.flush_copies()
        keep = meta.cu_seqlens_q[1:][sample_rows] - 1
        with ExitStack() as scope:
            if self.packed or self.compiled or self.fused:
                scope.enter_context(packed_linears())
            if self.compiled:
                scope.enter_context(compile_settings())
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=self._mask_placeholder,
                             paged_metadata=meta, logits_to_keep=keep, use_cache=False)
        self.num_forward_tokens += ids.shape[1]
        return out.logits[0].float(), sample_rows
