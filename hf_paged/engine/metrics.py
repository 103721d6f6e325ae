"""Counters and gauges the engine keeps: queue sizes, KV blocks and slot utilisation, preemptions,
prefix-cache hits, time to first token and time per output token."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.block_pool import BlockPool
    from ..core.scheduler import Scheduler
    from ..core.sequence import Sequence


@dataclass
class EngineMetrics:
    steps: int = 0
    running: int = 0
    waiting: int = 0
    blocks_in_use: int = 0
    peak_blocks_in_use: int = 0
    kv_slot_utilization: float = 1.0  # filled slots / slots of the blocks in use
    utilization_at_peak: float = 1.0
    preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cached_tokens: int = 0
    cached_blocks: int = 0
    forward_tokens: int = 0
    prompt_tokens: int = 0  # of every request added
    generation_tokens: int = 0  # every sampled token
    output_tokens: int = 0  # of finished requests
    finished: int = 0
    step_time_s: float = 0.0
    decode_step_tokens: int = 0  # tokens appended by steps that computed no prompt tokens (decodes, verifications)
    decode_step_time_s: float = 0.0  # those steps' time, drafting to appending
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)

    def record_step(self, num_tokens: int, seconds: float, pool: "BlockPool", scheduler: "Scheduler") -> None:
        self.steps += 1
        self.step_time_s += seconds
        self.forward_tokens += num_tokens
        self.running = len(scheduler.running)
        self.waiting = len(scheduler.waiting)
        used = pool.num_used_blocks
        self.blocks_in_use = used
        seen: set[int] = set()
        filled = 0
        bs = pool.block_size
        for seq in scheduler.running:
            table = seq.block_table
            blocks = table.blocks
            for i in range(table.dropped, len(blocks)):  # entries before `dropped` are the null block
                if blocks[i] not in seen:
                    seen.add(blocks[i])
                    filled += bs if i < len(blocks) - 1 else table.num_tokens - i * bs
        self.kv_slot_utilization = filled / (len(seen) * bs) if seen else 1.0
        if used >= self.peak_blocks_in_use:
            self.peak_blocks_in_use = used
            self.utilization_at_peak = self.kv_slot_utilization
        self.cached_blocks = pool.num_cached_blocks
        self.prefix_cached_tokens = scheduler.num_prefix_cached_tokens
        if pool.prefix_queries:
            self.prefix_cache_hit_rate = pool.prefix_hits / pool.prefix_queries

    def record_decode_step(self, tokens: int, seconds: float) -> None:
        self.decode_step_tokens += tokens
        self.decode_step_time_s += seconds

    def record_finish(self, seq: "Sequence") -> None:
        self.finished += 1
        self.output_tokens += seq.num_output_tokens
        timing = seq.timing()
        if "ttft_s" in timing:
            self.ttft_s.append(timing["ttft_s"])
        if "tpot_s" in timing:
            self.tpot_s.append(timing["tpot_s"])

    def summary(self) -> dict[str, float]:
        def mean(xs: list[float]) -> float:
            return statistics.fmean(xs) if xs else 0.0

        return {
            "running": self.running, "waiting": self.waiting, "blocks_in_use": self.blocks_in_use,
            "peak_blocks_in_use": self.peak_blocks_in_use, "kv_slot_utilization": self.kv_slot_utilization,
            "kv_slot_utilization_at_peak": self.utilization_at_peak, "preemptions": self.preemptions,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate, "prefix_cached_tokens": self.prefix_cached_tokens,
            "cached_blocks": self.cached_blocks, "mean_ttft_s": mean(self.ttft_s), "mean_tpot_s": mean(self.tpot_s),
            "finished": self.finished, "output_tokens": self.output_tokens, "steps": self.steps,
        }
