"""The engine's admission probe: one small ragged step through the engine's own forward before any request.

Two short prompts (the first longer than a short sliding window) are prefilled together in one step (two, for a model
with recurrent layers: the second continues the first's state), then one token is decoded for each in a further step,
through the runner exactly as requests run (the plan's kernels, fused layers, the per-layer call check); each step's
logits are compared with the model's own forward over the same tokens (no cache, its own attention). A model whose state
or attention none of ``hf_paged.admission``'s checks foresaw — a layer computing attention around hf_paged's, state
kept outside the K/V, positions taken from the flattened batch — gives different logits here, and the engine is
refused (``UnsupportedModel``) instead of answering requests wrongly. It writes only blocks no request holds yet.
"""

from __future__ import annotations

from typing import Any

import torch

from ..admission import UnsupportedModel
from ..core.scheduler import ScheduledSequence, SchedulerOutput

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


def probe_engine(runner: Any, vocab_size: int) -> None:
    """Raise ``UnsupportedModel`` unless the runner's forward of a small ragged batch (prefill, then decode) gives
    the model's own logits. Runs before the engine allocates anything: the probe's sequences take the first blocks."""
    kv = runner.kv_cache
    tolerance = _TOLERANCE.get(runner.plan.dtype, _TOLERANCE_LOW_PRECISION)
    if kv.quantized:
        tolerance = max(tolerance, _TOLERANCE_LOW_PRECISION)
    windows = [w for w in runner.layer_windows.values() if w]
    lengths = list(PROMPT_LENGTHS)
    if windows and min(windows) + 3 <= LONG_PROBE_TOKENS:  # past the window, where windowed and full attention differ
        lengths[0] = min(windows) + 3
    seqs, first_block = [], 0
    for salt, length in enumerate(lengths):
        blocks = -(-(length + 1) // kv.block_size)
        if first_block + blocks > kv.num_blocks:
            break  # a pool too small for both: probe with one sequence (none: the per-layer check still runs)
        seqs.append((_probe_tokens(length, vocab_size, salt), list(range(first_block, first_block + blocks))))
        first_block += blocks
    forward_tokens = runner.num_forward_tokens  # the probe's tokens are not requests' work
    # Recurrent layers: the prompts are prefilled in two chunks, the second continuing the first's state (a mixer
    # that restarts its state on a multi-token input would pass a one-step prefill).
    phases = ["first chunk", "continued prefill"] if runner.recurrent is not None else ["prefill"]
    done = [0] * len(seqs)
    try:
        for phase in phases + ["decode"]:
            if phase == "decode":
                for tokens, _ in seqs:
                    tokens.append((tokens[-1] * 13 + 5) % vocab_size)
            ends = [len(t) // 2 if phase == "first chunk" else len(t) for t, _ in seqs]
            step = [ScheduledSequence("probe", t[start:end], start, b, True, i)
                    for i, ((t, b), start, end) in enumerate(zip(seqs, done, ends))]
            if step:
                _check_step(runner, SchedulerOutput(step), [t[:end] for (t, _), end in zip(seqs, ends)], tolerance,
                            phase)
            done = ends
    finally:
        runner.num_forward_tokens = forward_tokens


def _check_step(runner: Any, step: SchedulerOutput, tokens: list[list[int]], tolerance: float, phase: str) -> None:
    try:
        logits, rows = runner.execute(step)
    except UnsupportedModel:
        raise
    except Exception as exc:
        raise UnsupportedModel(f"the engine's forward failed: {type(exc).__name__}: {exc}") from exc
    for i, row in enumerate(rows):
        distance = _distance(logits[i], _reference_logits(runner.model, tokens[row], runner.kv_cache.device))
        if not distance <= tolerance:
            raise UnsupportedModel(
                f"the engine's logits differ from the model's own forward in a {phase} step (relative "
                f"distance {distance:.3g}): some state or attention feature it does not reproduce", phase)


@torch.inference_mode()
def _reference_logits(model: torch.nn.Module, token_ids: list[int], device: torch.device) -> torch.Tensor:
    try:
        out = model(input_ids=torch.tensor([token_ids], device=device), use_cache=False)
    except Exception as exc:
        raise UnsupportedModel(f"the model's forward on input_ids alone failed: {type(exc).__name__}: {exc}") from exc
    return out.logits[0, -1]
