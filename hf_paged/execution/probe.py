"""The engine's admission probe: one small ragged step through the engine's own forward before any request.

Two short prompts (the first longer than a short sliding window) are prefilled together in one step, then one token
is decoded for each in a second step, through the runner exactly as requests run (the plan's kernels, fused layers, the per-layer call check); each step's logits
are compared with the model's own forward over the same tokens (no cache, its own attention). A model whose state
or attention none of ``hf_paged.admission``'s checks foresaw — a layer computing attention around hf_paged's, state
kept outside the K/V, positions taken from the flattened batch — gives different logits here, and the engine is
refused (``UnsupportedModel``) instead of answering requests wrongly. Its blocks are freed; nothing is cached.
"""

from __future__ import annotations

from typing import Any

import torch

from ..admission import UnsupportedModel
from ..core.block_pool import BlockPool, BlockTable
from ..core.scheduler import ScheduledStep
from ..core.sequence import SamplingParams, Sequence

PROMPT_LENGTHS = (5, 3)
LONG_PROBE_TOKENS = 64  # a window up to this short is exceeded by the first probe prompt
# Relative L2 distance between the engine's and the model's logits allowed per dtype: rounding only (fp32 sums in
# another order; bf16/fp16 kernels, int8 K/V). A wrong attention pattern or lost state moves logits far more.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_TOLERANCE_LOW_PRECISION = 0.15


def _probe_tokens(length: int, vocab_size: int, salt: int) -> list[int]:
    return [(31 * i + 17 * salt + 7) % vocab_size for i in range(length)]


def _distance(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-6))


def probe_engine(runner: Any, pool: BlockPool, vocab_size: int) -> None:
    """Raise ``UnsupportedModel`` unless the runner's forward of a small ragged batch (prefill, then decode) gives
    the model's own logits."""
    model = runner.model
    tolerance = _TOLERANCE.get(runner.plan.dtype, _TOLERANCE_LOW_PRECISION)
    if pool.kv_cache_dtype == "int8":
        tolerance = max(tolerance, _TOLERANCE_LOW_PRECISION)
    params = SamplingParams(max_new_tokens=1)
    forward_tokens = runner.num_forward_tokens  # the probe's tokens are not requests' work
    windows = [w for w in runner.layer_windows.values() if w]
    lengths = list(PROMPT_LENGTHS)
    if windows and min(windows) + 3 <= LONG_PROBE_TOKENS:  # past the window, where windowed and full attention differ
        lengths[0] = min(windows) + 3
    seqs = []
    for salt, length in enumerate(lengths):
        if sum(-(-(n + 1) // pool.block_size) for n in lengths[: salt + 1]) > pool.num_blocks:
            break  # a pool too small for both: probe with one sequence
        seqs.append(Sequence(_probe_tokens(length, vocab_size, salt), params, BlockTable(pool)))
    try:
        for phase in ("prefill", "decode"):
            if phase == "decode":
                for seq in seqs:
                    seq.token_ids.append((seq.token_ids[-1] * 13 + 5) % vocab_size)
            counts = [seq.num_tokens - seq.num_computed_tokens for seq in seqs]
            for seq, n in zip(seqs, counts):
                if seq.block_table.append_slots(n) is None:
                    return  # no room to probe (a pool smaller than two blocks): the per-layer check still runs
            try:
                logits, rows = runner.execute(ScheduledStep(seqs, counts, []))
            except UnsupportedModel:
                raise
            except Exception as exc:
                raise UnsupportedModel(f"the engine's forward failed: {type(exc).__name__}: {exc}") from exc
            for seq, n in zip(seqs, counts):
                seq.num_computed_tokens += n
            for i, row in enumerate(rows):
                want = _reference_logits(model, seqs[row].token_ids, pool.device)
                distance = _distance(logits[i], want)
                if not distance <= tolerance:
                    raise UnsupportedModel(
                        f"the engine's logits differ from the model's own forward in a {phase} step (relative "
                        f"distance {distance:.3g}): some state or attention feature it does not reproduce")
    finally:
        for seq in seqs:
            seq.block_table.free()
        runner.num_forward_tokens = forward_tokens


@torch.inference_mode()
def _reference_logits(model: torch.nn.Module, token_ids: list[int], device: torch.device) -> torch.Tensor:
    try:
        out = model(input_ids=torch.tensor([token_ids], device=device), use_cache=False)
    except Exception as exc:
        raise UnsupportedModel(f"the model's forward on input_ids alone failed: {type(exc).__name__}: {exc}") from exc
    return out.logits[0, -1]
