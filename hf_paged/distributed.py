"""Tensor-parallel paged generation over ``torch.distributed``: one scheduler on rank 0, the same runner on every rank.

The model is sharded by transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under
``torchrun``). Rank 0's engine runs a :class:`TensorParallelExecutor`, which broadcasts each plain
``SchedulerOutput`` on a gloo control group (long timeout: idle workers wait on it) before running it; every other
rank's :class:`TensorParallelWorker` runs the same step on the same ``ModelRunner`` over its own KV tensors (its
local KV heads: :func:`local_kv_heads`, which refuses a sharding that splits heads; :func:`tensor_parallel_plan`
replicates such a model's attention), so the forwards' collectives pair. Only rank 0 counts blocks and samples. A
failed collective marks the group broken: the step's requests, and every later step's, fail with
:class:`TensorParallelError` instead of hanging. Entry points: ``torchrun ... -m hf_paged.cli`` (:func:`run_cli`),
an engine on rank 0 with :func:`worker_loop` on the others, or ``hf_paged.wrap`` in an SPMD script (rank 0 serves
the call, the others follow it). Messages: ``("start", engine_id, spec)``, ``("step", engine_id,
scheduler_output)``, ``("close", engine_id)``, ``("done", result)`` (the end of an SPMD call), ``("stop",)``;
``docs/architecture.md`` draws it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import envs

from .admission import kv_geometry
from .config import EngineConfig
from .core.scheduler import SchedulerOutput
from .execution.executor import UniProcExecutor
from .execution.kv_cache import model_kv_cache
from .execution.model_runner import ModelRunner
from .execution.plan import ExecutionPlan

logger = logging.getLogger(__name__)

# Idle workers wait on the control group for the next step as long as rank 0 runs: its timeout is long. A rank that
# dies is still noticed at once (its sockets close); a rank that hangs, by the default group's timeout.
CONTROL_TIMEOUT = timedelta(days=7)
# The default process group's timeout where hf_paged creates it (``init_tensor_parallel``): a collective inside a
# forward that waits longer than this means a rank is stuck; its requests then fail instead of hanging.
DEFAULT_COLLECTIVE_TIMEOUT = envs.tp_timeout()
_ATTENTION_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")


class TensorParallelError(RuntimeError):
    """A collective between the tensor-parallel ranks failed (a rank died or stopped answering)."""


# ---- the process group ------------------------------------------------------------------------------------------
def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def default_backend() -> str:
    """gloo on CPU, nccl where CUDA is available."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_tensor_parallel(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """Join the process group that torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``), with a bounded collective timeout; nothing if it exists already or
    ``WORLD_SIZE`` is 1. On CUDA each rank takes the device ``LOCAL_RANK``."""
    if envs.world_size() <= 1 or dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(envs.local_rank())
    dist.init_process_group(backend=backend, timeout=timeout or DEFAULT_COLLECTIVE_TIMEOUT)


# ---- what a sharded model looks like ----------------------------------------------------------------------------
def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks share ``model``'s weights (1: not sharded)."""
    if world_size() <= 1:
        return 1
    size = getattr(model, "_tp_size", None) or getattr(model, "tp_size", None)
    if isinstance(size, int) and size > 1:
        return size
    from torch.distributed.tensor import DTensor

    return world_size() if any(isinstance(p, DTensor) for p in model.parameters()) else 1


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    return tensor_parallel_size(model) > 1


def valid_world_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """World sizes over which both the query and the KV heads split into whole heads."""
    g = math.gcd(num_heads, num_kv_heads)
    return [w for w in range(1, g + 1) if g % w == 0]


def _local_rows(weight: torch.Tensor) -> int:
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return int(local.shape[0])


def local_kv_heads(model: torch.nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """The KV heads this rank's attention sees: ``num_kv_heads`` unless the model is sharded, else what this
    rank's ``k_proj`` shard holds. Raises ``ValueError`` (naming the world sizes that work) where the sharding
    splits a head."""
    tp = tensor_parallel_size(model)
    if tp <= 1:
        return num_kv_heads
    attention = next((m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "q_proj")), None)
    if attention is not None:
        q_rows, k_rows = _local_rows(attention.q_proj.weight), _local_rows(attention.k_proj.weight)
        local_q, local_kv = q_rows / head_dim, k_rows / head_dim
    else:  # packed q/k/v projections: what transformers' own sharding gives, if it splits evenly
        from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

        kv = get_kv_heads_per_rank(getattr(model, "tp_plan", {}) or {}, num_kv_heads, tp)
        local_kv = kv if kv is not None else num_kv_heads / tp
        local_q = num_heads * local_kv / num_kv_heads
    whole = local_kv == int(local_kv) and local_q == int(local_q) and local_kv >= 1 \
        and local_q * num_kv_heads == local_kv * num_heads
    if not whole:
        sizes = ", ".join(map(str, valid_world_sizes(num_heads, num_kv_heads)))
        raise ValueError(
            f"model: tensor parallelism over {tp} ranks splits attention heads mid-head ({num_heads} query heads, "
            f"{num_kv_heads} KV heads of {head_dim}: this rank holds {local_q:g} query and {local_kv:g} KV heads; "
            f"transformers' own forward fails on it). World sizes that split the heads evenly: {sizes}; or load "
            f"the model with tp_plan=hf_paged.distributed.tensor_parallel_plan(config, {tp}), which replicates "
            f"the attention and shards the rest")
    return int(local_kv)


def tensor_parallel_plan(config: Any, world: int) -> str | dict[str, str]:
    """The ``tp_plan`` to load ``config``'s model with over ``world`` ranks: ``"auto"`` (transformers' plan) when
    its query and KV heads both split evenly; otherwise transformers' plan with every attention rule set to
    ``"replicate"`` (each rank computes all heads and keeps all KV heads; the MLP and the rest stay sharded)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if world <= 1 or world in valid_world_sizes(heads, kv_heads):
        return "auto"
    plan = dict(getattr(text, "base_model_tp_plan", None) or {})
    if not plan:
        raise ValueError(f"model: {type(config).__name__} has no tensor-parallel plan in transformers")
    prefix = _base_model_prefix(config)
    return {f"{prefix}.{key}" if prefix else key: "replicate" for key in plan
            if any(part in key for part in ("attn", "attention"))}


def _base_model_prefix(config: Any) -> str:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)].base_model_prefix
    except Exception:  # noqa: BLE001 - an unknown class: the usual prefix
        return "model"


def load_tensor_parallel(path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, tp_plan=...)`` over the torchrun process group (joined first,
    with :func:`init_tensor_parallel`), the plan from :func:`tensor_parallel_plan`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    init_tensor_parallel()
    plan = tensor_parallel_plan(AutoConfig.from_pretrained(path), world_size())
    try:
        from transformers.distributed import DistributedConfig

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, distributed_config=DistributedConfig(
            tp_plan=plan), **kwargs).eval()
    except (ImportError, TypeError):  # an older transformers: the tp_plan argument
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, tp_plan=plan, **kwargs).eval()


# ---- the control channel ----------------------------------------------------------------------------------------
class ControlChannel:
    """Rank 0's messages to the other ranks, broadcast on a gloo group of its own (long timeout).

    ``mode``: ``"loop"`` (the default: the other ranks run :func:`worker_loop` and take each message at once) or
    ``"spmd"`` (after a ``wrap``-ed ``generate`` call: the other ranks listen only during such calls, so messages
    between calls are queued and sent with the next one)."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.lock = threading.RLock()
        self.mode = "loop"
        self.listening = False  # rank 0 inside an SPMD call
        self.queued: list[tuple] = []
        self.broken: BaseException | None = None
        self.stopped = False

    def check(self) -> None:
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is broken (a rank died or stopped answering): "
                                      f"{self.broken}") from self.broken
        if self.stopped:
            raise TensorParallelError("the tensor-parallel workers were stopped (hf_paged.distributed.stop_workers)")

    def mark_broken(self, exc: BaseException) -> None:
        if self.broken is None:
            logger.error("hf_paged tensor parallel: a collective failed; the group is broken: %s", exc)
            self.broken = exc

    def send(self, message: tuple, deferrable: bool = False) -> None:
        """Broadcast ``message`` (rank 0). ``deferrable`` messages wait for the next call in SPMD mode."""
        with self.lock:
            if deferrable and self.mode == "spmd" and not self.listening:
                self.queued.append(message)
                return
            self.check()
            batch, self.queued = self.queued + [message], []
            try:
                for item in batch:
                    dist.broadcast_object_list([item], src=0, group=self.group)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the ranks out of step
                self.mark_broken(exc)
                raise TensorParallelError(f"tensor-parallel control broadcast failed: {exc}") from exc

    def recv(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


_channel: ControlChannel | None = None
_channel_lock = threading.Lock()


def control_channel() -> ControlChannel:
    """The process's control channel (made on first use; every rank must reach this once, in the same order as
    its other ``new_group`` calls)."""
    global _channel
    with _channel_lock:
        if _channel is None:
            if world_size() <= 1:
                raise ValueError("model: tensor-parallel generation needs torch.distributed initialised "
                                 "(launch with torchrun)")
            _channel = ControlChannel()
        return _channel


# ---- rank 0 --------------------------------------------------------------------------------------------------------
_engine_ids = itertools.count()


class TensorParallelExecutor(UniProcExecutor):
    """Rank 0's executor: before each forward it sends the step (the scheduler's plain ``SchedulerOutput``) to the
    other ranks, which run it on the same ``ModelRunner`` over their own KV tensors."""

    retries_alone = False  # a failed collective leaves the ranks out of step: the step's requests fail

    def __init__(self, model: torch.nn.Module, config: EngineConfig, plan: ExecutionPlan) -> None:
        if rank() != 0:
            raise ValueError("model: the engine of a tensor-parallel model runs on rank 0; the other ranks run "
                             "hf_paged.distributed.worker_loop(model) (or call the wrapped model's generate)")
        text = model.config.get_text_config()
        _, kv_heads, head_dim = kv_geometry(model.config)
        super().__init__(model, config, plan, local_kv_heads(model, text.num_attention_heads, kv_heads, head_dim))
        self.channel = control_channel()
        self.engine_id = next(_engine_ids)
        self.num_steps = 0
        kv = self.runner.kv_cache
        spec = {"config": config, "num_blocks": kv.num_blocks, "dtype": kv.dtype, "kv_shape": tuple(kv.kv.shape),
                "plan": plan}
        self.channel.send(("start", self.engine_id, spec), deferrable=True)
        self._open = True

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        channel = self.channel
        with channel.lock:  # one step's broadcast and forward before anything else is sent
            channel.send(("step", self.engine_id, step))
            try:
                out = self.runner.execute(step)
            except Exception as exc:
                if _is_collective_failure(exc):
                    channel.mark_broken(exc)
                    raise TensorParallelError(f"a tensor-parallel collective failed in the forward: {exc}") from exc
                raise
        self.num_steps += 1
        return out

    def close(self) -> None:
        super().close()
        if self._open:
            self._open = False
            try:
                self.channel.send(("close", self.engine_id), deferrable=True)
            except TensorParallelError as exc:  # the workers are gone: nothing to release there
                logger.debug("tensor-parallel close not sent: %s", exc)


def executor_class(model: torch.nn.Module) -> type[UniProcExecutor]:
    """The executor an engine on ``model`` uses unless it is given one: tensor-parallel for a sharded model."""
    return TensorParallelExecutor if is_tensor_parallel(model) else UniProcExecutor


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def stop_workers() -> None:
    """Rank 0: end the other ranks' :func:`worker_loop` (also at interpreter exit)."""
    channel = _channel
    if channel is None or rank() != 0 or channel.stopped or channel.mode != "loop":
        return
    try:
        channel.send(("stop",))
    except TensorParallelError as exc:
        logger.debug("tensor-parallel stop not sent: %s", exc)
    channel.stopped = True


def worker_reports() -> list[dict]:
    """Rank 0, while the other ranks run :func:`worker_loop`: each worker's :class:`WorkerStats` (as a dict with its
    ``rank``)."""
    channel = control_channel()
    with channel.lock:
        channel.send(("report",))
        reports: list[Any] = [None] * world_size()
        dist.gather_object({"rank": 0}, reports, dst=0, group=channel.group)
    return reports[1:]


@atexit.register
def _stop_workers_at_exit() -> None:
    # Registered before the engine module's own exit hook (which imports this module), so it runs after it: no
    # engine thread still broadcasts after the stop.
    if _channel is not None and rank() == 0:
        stop_workers()


# ---- the other ranks ----------------------------------------------------------------------------------------------
@dataclass
class WorkerStats:
    """What a worker did (for checks and logs): steps and tokens run, engines started, its KV tensors' size."""

    steps: int = 0
    forward_tokens: int = 0
    engines_started: int = 0
    engines_open: int = 0
    kv_bytes: int = 0  # of the last engine's KV cache


class TensorParallelWorker:
    """A non-zero rank: a runner (with its KV tensors) per rank-0 engine, running each step rank 0 sends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.channel = control_channel()
        self.runners: dict[int, ModelRunner] = {}
        self.stats = WorkerStats()

    def _start(self, engine_id: int, spec: dict) -> None:
        config, model = spec["config"], self.model
        _, kv_heads, head_dim = kv_geometry(model.config)
        heads = local_kv_heads(model, model.config.get_text_config().num_attention_heads, kv_heads, head_dim)
        kv = model_kv_cache(model, block_size=config.block_size, num_blocks=spec["num_blocks"], dtype=spec["dtype"],
                            kv_cache_dtype=config.kv_cache_dtype, num_kv_heads=heads)
        if tuple(kv.kv.shape) != tuple(spec["kv_shape"]):
            raise TensorParallelError(f"rank {rank()}: KV cache {tuple(kv.kv.shape)} differs from rank 0's "
                                      f"{tuple(spec['kv_shape'])}")
        self.runners[engine_id] = ModelRunner(model, kv, spec["plan"])
        self.stats.engines_started += 1
        self.stats.kv_bytes = kv.nbytes

    def _step(self, engine_id: int, step: SchedulerOutput) -> None:
        runner = self.runners[engine_id]
        before = runner.num_forward_tokens
        try:
            runner.execute(step)
        except Exception as exc:
            if _is_collective_failure(exc):
                raise
            # The same inputs fail the same way on rank 0, whose engine fails the step's requests.
            logger.warning("rank %d: step failed (rank 0 fails its requests): %s", rank(), exc)
        self.stats.steps += 1
        self.stats.forward_tokens += runner.num_forward_tokens - before

    def report(self) -> dict:
        stats = dict(vars(self.stats))
        stats["engines_open"] = len(self.runners)
        stats["rank"] = rank()
        return stats

    def _close(self, engine_id: int) -> None:
        runner = self.runners.pop(engine_id, None)
        if runner is not None:
            runner.close()

    def serve(self, until: str = "stop") -> Any:
        """Run rank 0's messages until ``until`` ("stop", or "done": the end of an SPMD call, whose result is
        returned)."""
        while True:
            message = self.channel.recv()
            kind = message[0]
            if kind == "step":
                self._step(*message[1:])
            elif kind == "start":
                self._start(*message[1:])
            elif kind == "close":
                self._close(message[1])
            elif kind == "report":
                dist.gather_object(self.report(), None, dst=0, group=self.channel.group)
            elif kind == "done":
                if until == "done":
                    return message[1]
                logger.warning("rank %d: an SPMD call's end arrived in the worker loop", rank())
            elif kind == "stop":
                for engine_id in list(self.runners):
                    self._close(engine_id)
                self.channel.stopped = True
                return None
            self.stats.engines_open = len(self.runners)


_workers: "weakref.WeakKeyDictionary[torch.nn.Module, TensorParallelWorker]" = weakref.WeakKeyDictionary()


def worker_for(model: torch.nn.Module) -> TensorParallelWorker:
    worker = _workers.get(model)
    if worker is None:
        worker = _workers[model] = TensorParallelWorker(model)
    return worker


def worker_loop(model: torch.nn.Module) -> WorkerStats:
    """On every rank but 0: run the steps rank 0's engines send, on this rank's shard of ``model``, until rank 0
    stops (``stop_workers``, ``engine.close()`` then interpreter exit, or the CLI command's end). Returns what it
    did. Raises ``TensorParallelError`` if rank 0 went away without a stop."""
    if rank() == 0:
        raise ValueError("worker_loop: rank 0 runs the engine; call worker_loop on the other ranks")
    worker = worker_for(model)
    try:
        worker.serve("stop")
    except TensorParallelError:
        raise
    except Exception as exc:  # noqa: BLE001
        if _is_collective_failure(exc):
            raise TensorParallelError(f"rank {rank()}: lost rank 0: {exc}") from exc
        raise
    return worker.stats


# ---- wrap() inside a user's SPMD script -----------------------------------------------------------------------------
_in_call = threading.local()


def spmd_generate(model: torch.nn.Module, generate: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """A wrapped tensor-parallel model's ``generate``, called with the same inputs on every rank. Rank 0 runs it
    (on the engine, which drives the other ranks); the other ranks run it too, so they take the same path: HF's
    own ``generate`` where the engine does not apply, else (``follow_rank0``) they serve rank 0's steps until it
    is done and return its result."""
    channel = control_channel()
    if rank() == 0:
        with channel.lock:
            channel.mode, channel.listening, channel.stopped = "spmd", True, False
        result: Any = None
        try:
            result = generate(model, *args, **kwargs)
            return result
        finally:
            try:
                channel.send(("done", _to_cpu(result)))
            finally:
                channel.listening = False
    _in_call.active = True
    try:
        return generate(model, *args, **kwargs)
    finally:
        if getattr(_in_call, "active", False):  # not ended by follow_rank0: take rank 0's end of the call
            _in_call.active = False
            worker_for(model).serve("done")


def follows_rank0(model: torch.nn.Module) -> bool:
    """Inside an SPMD ``generate`` call on a rank other than 0 (its engine path is served by rank 0)."""
    return getattr(_in_call, "active", False) and rank() != 0 and is_tensor_parallel(model)


def follow_rank0(model: torch.nn.Module, device: torch.device | None = None) -> Any:
    """Serve rank 0's steps for this call; returns rank 0's result (on ``device``)."""
    _in_call.active = False
    result = worker_for(model).serve("done")
    if result is None:
        raise TensorParallelError(f"rank {rank()}: rank 0's generate call failed (see rank 0's error)")
    return _to_device(result, device)


def _to_cpu(obj: Any) -> Any:
    return _to_device(obj, torch.device("cpu"))


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and not hasattr(obj, "keys"):
        return tuple(_to_device(o, device) for o in obj)
    if hasattr(obj, "keys") and hasattr(obj, "__setitem__"):  # a ModelOutput
        for key in list(obj.keys()):
            obj[key] = _to_device(obj[key], device)
        return obj
    return obj


# ---- the command line ------------------------------------------------------------------------------------------------
def run_cli(args: Any, command: Callable[[Any], int], prepare: Callable[[], None] | None = None) -> int:
    """``torchrun ... -m hf_paged.cli <command>``: rank 0 runs the command (its model loaded tensor-parallel by
    the command's loader, see :func:`cli_load`), the other ranks load the same shards and run the worker loop
    until rank 0 is done. Stop signals go to rank 0 only (torchrun sends them to every rank). ``prepare`` runs on
    every rank before it joins the group (e.g. serve restarting its process with other OpenMP settings: a rank
    restarting after joining would leave the others waiting in a group it left)."""
    if prepare is not None:
        prepare()
    init_tensor_parallel()
    if rank() != 0:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when the workers stop
            signal.signal(sig, signal.SIG_IGN)
        model, _, _ = cli_load(getattr(args, "model", None), getattr(args, "dtype", "float32"))
        try:
            worker_loop(model)
        finally:
            dist.destroy_process_group()
        return 0
    try:
        return command(args)
    finally:
        stop_workers()
        dist.destroy_process_group()


def cli_load(path: str | None, dtype: str) -> tuple[Any, Any, str] | None:
    """For the command-line loaders: ``(model, tokenizer, name)`` loaded tensor-parallel when launched by torchrun
    with ``WORLD_SIZE`` > 1, else None (load as usual)."""
    if envs.world_size() <= 1:
        return None
    from pathlib import Path

    from transformers import AutoTokenizer

    if path is None:
        from .models import default_model_dir

        folder, name = default_model_dir(), "SmolLM2-135M-Instruct"
    else:
        folder = Path(path).expanduser()
        name = folder.name
        if not folder.is_dir():
            raise SystemExit(f"--model: {path}: tensor-parallel runs (torchrun) load model folders "
                             f"(safetensors), not single files")
    model = load_tensor_parallel(folder, getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(folder), name
