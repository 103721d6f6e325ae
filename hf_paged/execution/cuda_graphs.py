"""CUDA graphs for the engine's decode-only steps; see "The CUDA path" in docs/architecture.md.

A decode step's launches do not depend on its tokens, so its forward is captured once per padded batch size
(:func:`graph_batch_sizes`, lazily) over static device buffers that each step overwrites in place. Padded rows are inert
(token 0 at position 0, length 1, slot and block-table entries on the pool's null block) and their logits are dropped;
steps with prefill run eagerly. Only the Triton attention is captured: its launches read no host list of the metadata
(split-K is bounded by ``max_decode_len``). Capture is behind ``capture(fn) -> graph`` (``graph.output``,
``graph.replay()``): :class:`CudaGraphCapturer` on the GPU, :class:`EagerGraphStandIn` for CPU tests.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from ..core.scheduler import ScheduledSequence, SchedulerOutput
from .kernels.paged_attention import PagedAttentionMetadata, step_running
from .step_inputs import build_step_inputs

if TYPE_CHECKING:
    from .model_runner import ModelRunner


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes graphs are captured at: 1, 2, 4, 8, 16, 24, ... up to ``max_num_seqs`` (included)."""
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs: must be positive (got {max_num_seqs})")
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of ``sizes`` (sorted) that holds ``num_seqs`` rows; None if none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class CapturedGraph(Protocol):
    output: Any

    def replay(self) -> None: ...


class GraphCapturer(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedGraph: ...


class _CudaGraph:
    __slots__ = ("graph", "output")

    def __init__(self, graph: "torch.cuda.CUDAGraph", output: torch.Tensor) -> None:
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapturer:
    """Captures with ``torch.cuda.CUDAGraph``, all graphs of one engine in one memory pool, after one warm-up run
    on a side stream (Triton compiles and cuBLAS initialises outside the capture). Capture errors are raised only
    for this thread's illegal calls (``capture_error_mode="thread_local"``): other threads may use CUDA meanwhile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedGraph:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = fn()
        return _CudaGraph(graph, output)


class _EagerGraph:
    __slots__ = ("owner", "fn", "output")

    def __init__(self, owner: "EagerGraphStandIn", fn: Callable[[], torch.Tensor], output: torch.Tensor) -> None:
        self.owner, self.fn, self.output = owner, fn, output

    def replay(self) -> None:
        self.owner.replays += 1
        self.output.copy_(self.fn())


class EagerGraphStandIn:
    """Capture and replay without a GPU: ``capture`` runs the callable once (as a real capture's warm-up) and records
    it; ``replay`` reruns it into the output tensor, as a graph rewrites its output in place. Faithful as long as the
    launches depend only on the static buffers, which is what it checks."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> CapturedGraph:
        self.captures += 1
        return _EagerGraph(self, fn, fn())


class DecodeGraphs:
    """The decode-step graphs of one engine's runner and their static input buffers."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int, max_model_len: int,
                 capturer: GraphCapturer | None = None) -> None:
        if not runner.plan.triton:
            raise ValueError("cuda_graphs: decode graphs need the Triton attention (plan.attention == 'triton')")
        kv = runner.kv_cache
        self.runner = runner
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        # Block-table width: no sequence holds more blocks than its context or the pool allow.
        self.width = max(1, min(-(-max_model_len // kv.block_size), kv.num_blocks))
        self.max_len = self.width * kv.block_size
        device, batch, null = kv.device, self.max_batch, kv.null_block
        self.input_ids = torch.zeros(1, batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((batch,), null * kv.block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((batch, self.width), null, dtype=torch.long, device=device)
        self.kv_lens = torch.ones(batch, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.long, device=device)
        self.capturer: GraphCapturer = capturer if capturer is not None else CudaGraphCapturer(device)
        self.graphs: dict[int, CapturedGraph] = {}
        self.num_replays = 0

    def reset(self) -> None:
        """Drop every graph (the weights or the forwards they captured changed); they are captured again on use."""
        self.graphs.clear()

    def accepts(self, step: SchedulerOutput) -> bool:
        """Whether ``step`` is decode-only and fits the largest graph."""
        return (0 < len(step.seqs) <= self.max_batch and step.num_decodes == len(step.seqs)
                and all(len(seq.block_ids) <= self.width for seq in step.seqs))

    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Run a decode-only step through its graph (padded to the graph's batch size with sequences on the null
        block); returns what ``ModelRunner.execute`` returns."""
        runner = self.runner
        size = padded_batch_size(len(step.seqs), self.sizes)
        padding = [ScheduledSequence("", [0], 0, [], False)] * (size - len(step.seqs))
        inputs = build_step_inputs(SchedulerOutput(step.seqs + padding), runner.kv_cache, runner.plan, None)
        meta, width = inputs.meta, inputs.meta.block_tables.shape[1]
        with runner._lock, runner._installed():
            self.input_ids[:, :size].copy_(inputs.input_ids)
            self.positions[:, :size].copy_(inputs.positions)
            self.slot_mapping[:size].copy_(meta.slot_mapping)
            self.kv_lens[:size].copy_(meta.kv_lens)
            self.block_tables[:size, :width].copy_(meta.block_tables)
            self.block_tables[:size, width:].fill_(runner.kv_cache.null_block)
            graph = self.graphs.get(size)
            if graph is None:
                graph = self.graphs[size] = self._capture(size)
            graph.replay()
            self.num_replays += 1
            logits = graph.output[0].index_select(0, inputs.logits_rows)
        runner.num_forward_tokens += len(step.seqs)
        return logits.float(), inputs.sample_rows

    def _capture(self, size: int) -> CapturedGraph:
        runner, kv = self.runner, self.runner.kv_cache
        meta = PagedAttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            kv_lens=self.kv_lens[:size], cu_seqlens_q=self.cu_seqlens_q[: size + 1], num_decodes=size,
            kv_lens_list=[self.max_len] * size, q_lens_list=[1] * size, block_size=kv.block_size, kv_cache=kv,
            plan=runner.plan, max_decode_len=self.max_len, layer_windows=runner.layer_windows,
            positions=self.positions[0, :size])
        ids, positions = self.input_ids[:, :size], self.positions[:, :size]
        model, mask = runner.model, runner._mask_placeholder

        def forward() -> torch.Tensor:  # Python runs at capture (and in the CPU stand-in's replays): checked there
            meta.layer_calls.clear()
            with step_running(meta):
                logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, paged_metadata=meta,
                               logits_to_keep=0, use_cache=False).logits
            meta.check_layer_calls()
            return logits

        return self.capturer.capture(forward)
