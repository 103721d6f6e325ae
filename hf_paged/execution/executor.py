"""Executors: what runs an engine's steps. The engine is given one (by injection) and hands it each step as plain data.

``Executor`` is the interface; ``UniProcExecutor`` runs the steps in this process on one ``ModelRunner``, which owns
the KV tensors. ``hf_paged.distributed.TensorParallelExecutor`` runs the same runner on every rank of a sharded model.
"""

from __future__ import annotations

from typing import Collection, Protocol

import torch

from ..config import EngineConfig
from ..core.scheduler import SchedulerOutput
from .kv_cache import model_kv_cache
from .model_runner import ModelRunner
from .plan import ExecutionPlan


class Executor(Protocol):
    """Runs steps: ``num_blocks`` KV blocks of the config's ``block_size`` are there for the engine's block pool."""

    runner: ModelRunner
    num_blocks: int

    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]: ...

    retries_alone: bool  # whether a failed batch may be run again one sequence at a time

    def rebuild(self, changed: Collection[torch.Tensor] | None = None) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...


class UniProcExecutor:
    """One runner in this process."""

    retries_alone = True  # a failed step can be run again sequence by sequence (nothing else saw it)

    def __init__(self, model: torch.nn.Module, config: EngineConfig, plan: ExecutionPlan,
                 num_kv_heads: int | None = None) -> None:
        kv_cache = model_kv_cache(model, block_size=config.block_size, num_blocks=config.num_blocks,
                                  memory_bytes=config.kv_memory_bytes, kv_cache_dtype=config.kv_cache_dtype,
                                  num_kv_heads=num_kv_heads)
        self.runner = ModelRunner(model, kv_cache, plan)
        self.num_blocks = kv_cache.num_blocks

    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """The step's logits ``[num_sampling, vocab]`` (fp32) and the indices of the sequences they belong to."""
        return self.runner.execute(step)

    def rebuild(self, changed: Collection[torch.Tensor] | None = None) -> None:
        """The model's weights changed (``changed``; None: any of them): rebuild what the plan derived from them."""
        self.runner.build(changed)

    def sleep(self) -> None:
        self.runner.sleep()

    def wake_up(self) -> None:
        self.runner.wake_up()

    def close(self) -> None:
        self.runner.close()
