"""The continuous-batching engine: scheduler + model runner + sampler + output processor around one block pool.

Requests are submitted from any thread (``submit``): they are validated in the caller's thread (bad input
raises ``ValueError`` there and never reaches the running batch), then handed to one engine thread that
runs ``step`` while there is work. A step is schedule -> execute -> sample -> process: finished requests
leave and waiting ones join; a request's tokens stream out as ``StreamDelta``s as they are sampled, and
``abort`` stops a request at the next step. A step whose forward fails fails only the requests in that step;
every block they held is freed. ``close`` (or leaving a ``with`` block) stops the thread, aborts what is left,
frees the pool and drops everything the engine built for the model's forwards.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence as Seq

import torch

from ..admission import UnsupportedModel, engine_refusal
from ..config import EngineConfig
from ..core.beam_search import BeamSearchState
from ..core.block_pool import BlockPool, BlockTable
from ..core.kv_cache_manager import KVCacheManager
from ..core.kv_cache_spec import cache_groups
from ..core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ..core.sequence import RequestOutput, SamplingParams, Sequence, SequenceGroup, StreamDelta
from ..core.structured_output import GrammarCompiler
from ..cpu_runtime import release_openmp_pool, tune_malloc
from ..distributed import executor_class, is_tensor_parallel
from ..execution.cuda_graphs import DecodeGraphs
from ..execution.executor import Executor
from ..execution.kv_cache import KVCache
from ..execution.model_runner import ModelRunner, WeightWatcher, model_lock
from ..execution.plan import build_plan
from ..execution.probe import probe_engine
from ..execution.sampler import Sampler
from .metrics import EngineMetrics
from .output_processor import OutputProcessor
from .speculator import Speculator

logger = logging.getLogger(__name__)

_engines: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()


def _engine_thread(ref: "weakref.ref[LLMEngine]", wake: threading.Condition) -> None:
    """An engine's thread: steps while there is work, waits for posts while there is none, ends after 30 s idle.
    While it waits it holds only a weak reference: an engine that nobody references any more (never closed) is freed,
    with its KV pool and packed weights, instead of living on through its own thread."""
    while True:
        engine = ref()
        if engine is None:
            return
        with wake:
            if engine._stopping:
                engine._thread = None
                return
            if not engine._pending and not engine.scheduler.has_work():
                if engine._on_cpu:  # idle: its OpenMP workers would slow other threads' (see cpu_runtime)
                    release_openmp_pool()
                del engine
                woken = wake.wait(timeout=30.0)
                engine = ref()
                if engine is None:
                    return
                if not woken and not engine._stopping and not engine._pending and not engine.scheduler.has_work():
                    engine._thread = None
                    return
                continue
        engine.step()


@atexit.register
def _shutdown_engines() -> None:
    for engine in list(_engines):
        engine.shutdown()


def _eos_token_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class _LoopQueue:
    """The engine thread's end of an asyncio queue: ``put`` from any thread, delivered on the loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: "asyncio.Queue[StreamDelta]") -> None:
        self.loop, self.target = loop, target

    def put(self, item: StreamDelta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.target.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class LLMEngine:
    """Serve many generation requests at once on paged KV memory with an unmodified HF causal LM.

    The options are :class:`~hf_paged.config.EngineConfig`'s fields (the pool, the scheduler's limits, the plan's
    switches), as keywords or as ``config``; what the forwards run is decided once, in ``engine.plan``, and none of
    it changes the model outside the engine's own forwards. Several engines may serve one model: their forwards take
    turns. ``executor`` (injected; default: tensor-parallel for a sharded model, else this process) is called with
    the model, the config and the plan, and runs the steps.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, config: EngineConfig | None = None,
                 executor: Callable[..., Executor] | None = None, **options: Any) -> None:
        if config is None:
            config = EngineConfig.from_options(options)
        elif options:
            raise ValueError(f"{next(iter(options))}: give the engine options in config or as keywords, not both")
        refusal = engine_refusal(model)
        if refusal is not None:
            raise UnsupportedModel(refusal)
        self.model, self.config = model, config
        param = next(model.parameters())
        self.plan = build_plan(param.device, param.dtype, **config.plan_options(),
                               tensor_parallel=is_tensor_parallel(model))
        logger.info("hf_paged engine for %s: %s", type(model).__name__, self.plan)
        self._on_cpu = param.device.type == "cpu"
        text = model.config.get_text_config()
        self.max_model_len = config.max_model_len or getattr(text, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = text.vocab_size
        self.executor = (executor or executor_class(model))(model, config, self.plan)
        try:
            self._start_runner()
        except Exception:
            self.executor.close()
            raise
        self.pool = BlockPool(self.executor.num_blocks, config.block_size)
        kv = self.kv_cache
        self.kv = KVCacheManager(self.pool, config.enable_prefix_caching,
                                 cache_groups(self.runner.layer_windows, kv.num_kv_heads, kv.head_dim,
                                              self.runner.recurrent.layers if self.runner.recurrent else ()))
        self.scheduler = Scheduler(self.kv, SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                             self.max_model_len))
        self.weights = WeightWatcher(model)
        self.sampler = Sampler(c_argmax=self.plan.cpu_kernels)
        self.eos_token_ids = _eos_token_ids(model)
        self.metrics = EngineMetrics()
        self.outputs = OutputProcessor(self.scheduler, self.metrics, tokenizer, self.max_model_len,
                                       config.share_blocks)
        self._inbox: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._pending = 0  # messages posted, not yet taken by the engine thread
        self._pending_adds = 0  # of which new requests
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._grammar_lock = threading.Lock()
        self._asleep = False
        # Speculative decoding: built with the engine's config, or with the first request asking for it.
        self.speculator: Speculator | None = None
        if config.speculative is not None:  # its drafter now: a bad draft model is refused before any request
            try:
                if self.runner.recurrent is not None:
                    raise ValueError("speculative: not for a model with recurrent layers (their state cannot be "
                                     "rolled back past rejected tokens)")
                self._speculator().drafter(config.speculative)
            except Exception:
                self.executor.close()
                raise
        _engines.add(self)

    def _start_runner(self) -> None:
        """CUDA graphs where the plan has them, then the admission probe (not on a sharded model: its plain forward
        needs every rank)."""
        if self._on_cpu:
            tune_malloc()
        if self.plan.cuda_graphs and self.runner.recurrent is None:
            self.runner.decode_graphs = DecodeGraphs(self.runner, self.config.max_num_seqs, self.max_model_len)
        if not is_tensor_parallel(self.model):
            try:
                probe_engine(self.runner, self.vocab_size)
            except UnsupportedModel as exc:
                # A mixer whose multi-token path restarts its state (Mamba-1, Jamba) is exact one token at a time.
                recurrent = self.runner.recurrent
                if recurrent is None or recurrent.stepwise or exc.phase != "continued prefill":
                    raise
                recurrent.stepwise = True
                probe_engine(self.runner, self.vocab_size)
                logger.info("hf_paged engine for %s: recurrent states continued one token at a time",
                            type(self.model).__name__)

    @property
    def runner(self) -> ModelRunner:
        """The runner of this process (rank 0's on a tensor-parallel model)."""
        return self.executor.runner

    @property
    def kv_cache(self) -> KVCache:
        return self.executor.runner.kv_cache

    @property
    def tokenizer(self) -> Any:
        return self.outputs.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.outputs.tokenizer = tokenizer

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- submission (any thread) ---------------------------------------------------------------
    def make_sequence(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Validate a request and build its sequence (raises ValueError naming the bad field)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs the engine to have a tokenizer")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be integers in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the model's context of {self.max_model_len}")
        total = min(len(ids) + params.max_new_tokens, self.max_model_len)
        need = -(-total // self.pool.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"max_new_tokens: prompt + max_new_tokens need {need} KV blocks but the pool has "
                             f"{self.pool.num_blocks}; the request can never fit")
        if request_id is not None and request_id in self.outputs.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seq = Sequence(ids, params, BlockTable(self.pool), request_id, self.eos_token_ids)
        if params.structured_outputs is not None:
            seq.matcher = self._grammars().matcher(params.structured_outputs)
        if params.num_beams > 1:
            if params.logits_processors or params.repetition_penalty != 1 or params.stop \
                    or params.presence_penalty or params.frequency_penalty:
                raise ValueError("num_beams: beam search supports eos, min/max_new_tokens, length_penalty, "
                                 "early_stopping and num_return_sequences only")
            eos = sorted(seq.stop_ids)
            pad = eos[0] if eos else 0
            state = BeamSearchState(ids, params.num_beams, min(params.max_new_tokens, self.max_model_len - len(ids)),
                                    eos, params.length_penalty, params.early_stopping,
                                    params.num_return_sequences, pad, params.min_new_tokens)
            group = SequenceGroup(seq, state)
            group.decode = self._decode
        elif params.n > 1:
            SequenceGroup(seq)
        # A model with recurrent layers decodes without speculation (a state cannot be rolled back).
        if (params.speculative is not None or self.config.speculative is not None) and self.runner.recurrent is None:
            self._speculator().resolve(seq)
        return seq

    def _speculator(self) -> Speculator:
        with self._grammar_lock:
            if self.speculator is None:
                self.speculator = Speculator(self.config, self.pool.num_blocks, self.vocab_size, self.max_model_len)
            return self.speculator

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None

    def submit(self, prompt: str | Seq[int] | Sequence, params: SamplingParams | None = None,
               request_id: str | None = None, stream: bool | Any = False) -> Sequence:
        """Queue a request (or a sequence ``make_sequence`` built, not yet submitted); returns its sequence
        (``seq.done`` is set when it finishes). ``stream``: True, or a queue (anything with ``put``), to receive its
        ``StreamDelta``s in ``seq.stream``; an ``n > 1`` request streams its samples' deltas (ids
        ``<request_id>-<i>``), then its own last one."""
        seq = prompt if isinstance(prompt, Sequence) else self.make_sequence(prompt, params, request_id)
        if stream is not False and stream is not None:
            if seq.group is not None and seq.group.beam is not None:
                raise ValueError("stream: beam search requests do not stream")
            seq.stream = queue.SimpleQueue() if stream is True else stream
        self._post("add", seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step (its blocks are freed; its waiters see ``FinishReason.ABORT``)."""
        try:
            self._post("abort", request_id)
        except RuntimeError:  # closed: every request was aborted already
            pass

    def _post(self, kind: str, item: object) -> None:
        if self._on_cpu:  # the poster's idle OpenMP workers would slow the engine thread's (see cpu_runtime)
            release_openmp_pool()
        with self._wake:
            if self._closed:
                raise RuntimeError("this LLMEngine is closed")
            if kind == "add":
                self._wake_up()
            self._inbox.put((kind, item))
            self._pending += 1
            self._pending_adds += kind == "add"
            self._wake.notify()
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self), self._wake),
                                                name=f"hf_paged-engine-{id(self):x}", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step (requests still queued are not run; a later
        submission starts it again). Runs at interpreter exit: a thread still inside torch while the
        interpreter tears torch down can abort the process."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Stop the engine thread, abort every request still queued or running, free the KV pool and drop what the
        engine built for the model's forwards. The engine cannot be used afterwards; the model is as it was."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
        self.shutdown(timeout=60.0)
        self._drain_inbox()
        for request_id in list(self.outputs.requests):
            self.outputs.abort(request_id)
        if self.speculator is not None:
            self.speculator.close()
        self.executor.close()
        _engines.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _drain_inbox(self) -> bool:
        """Take what other threads posted; True if new requests arrived."""
        added = False
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return added
            with self._wake:
                self._pending -= 1
                self._pending_adds -= kind == "add"
            if kind == "add":
                self.outputs.add(item)
                added = True
            elif kind == "abort":
                self.outputs.abort(item)
            elif kind == "refresh":  # everything derived from the weights, whatever the check says
                self.weights.changed(full=True)
                self.executor.rebuild(None)
            if kind in ("refresh", "reset_prefix_cache"):
                self.kv.reset_prefix_cache()

    def _grammars(self) -> GrammarCompiler:
        """The engine's grammar compiler, built with the first constrained request (it reads the whole vocabulary)."""
        with self._grammar_lock:
            if self.sampler.grammars is None:
                self.sampler.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self.sampler.grammars

    def _sync_weights(self, was_idle: bool) -> None:
        """Before new requests run: if the model's weights changed since the last step (an optimizer step, a
        ``load_state_dict``, a merged adapter), cached prefixes hold stale K/V and packed copies stale weights."""
        changed = self.weights.changed(full=was_idle)
        if changed is not None:
            self.kv.reset_prefix_cache()
            self.executor.rebuild(changed)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """vLLM's route for RL frameworks: copy ``(name, tensor)`` pairs into the model's parameters (between two of
        the engine's forwards), then re-derive what the engine built from them and drop the prefix cache."""
        params = dict(self.model.named_parameters())
        weights = list(weights)
        unknown = [name for name, _ in weights if name not in params]
        if unknown:
            raise ValueError(f"weights: no parameter named {unknown[0]!r}")
        with model_lock(self.model), torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.refresh_weights()

    def sleep(self) -> None:
        """Free the KV pool's memory and the packed weights (a draft model's too) while the engine is idle (vLLM's
        ``sleep``: an RL loop trains meanwhile); the next request, or :meth:`wake_up`, brings them back (cached
        prefixes do not survive)."""
        with self._wake:
            if self._pending or self.scheduler.has_work():
                raise RuntimeError("sleep: requests are queued or running")
            if not self._asleep:
                self.kv.reset_prefix_cache()
                self.executor.sleep()
                if self.speculator is not None:
                    self.speculator.sleep()
                self._asleep = True

    def wake_up(self) -> None:
        """Allocate the KV pool again and re-derive the packed weights from the weights as they are now."""
        with self._wake:
            self._wake_up()

    def _wake_up(self) -> None:
        if self._asleep:
            self.executor.wake_up()
            if self.speculator is not None:
                self.speculator.wake_up()
            self.weights.changed(full=True)  # what was re-derived is current
            self._asleep = False

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes at the next step (vLLM's name; requests running keep their blocks)."""
        self._post("reset_prefix_cache", None)

    def refresh_weights(self) -> None:
        """Say that the model's weights changed, for writes the engine's check may not see (a few elements written
        through ``.data``): the next step drops the prefix cache and re-derives every packed weight."""
        self._post("refresh", None)

    def step(self) -> list[Sequence]:
        """One iteration (schedule -> execute -> sample -> process); returns the sequences that finished in it."""
        was_idle = not self.scheduler.has_work()
        if self._drain_inbox():
            self._sync_weights(was_idle)
        began = time.perf_counter()
        spec = self.speculator
        if spec is not None:
            spec.propose(self.scheduler.running)
        step = self.scheduler.schedule()
        self.metrics.preemptions += len(self.scheduler.preempted)
        if not step.seqs:
            return []
        started = time.perf_counter()
        try:
            logits, rows, failed = self._execute(step, self.scheduler.step_seqs)
        except Exception as exc:  # a model-wide failure: this step's requests fail, the engine goes on
            logger.exception("engine step failed; failing its %d requests", len(step.seqs))
            return self.outputs.fail(self.scheduler.step_seqs, exc)
        scheduled = self.scheduler.step_seqs
        verified: list = []
        try:
            self.scheduler.postprocess()
            if spec is not None:
                logits, rows, drafted, draft_logits = spec.take_rows(scheduled, logits, rows)
                if drafted:
                    verified = spec.verify(self.sampler, drafted, draft_logits)
            seqs, logits = self.outputs.rows_to_sample(scheduled, logits, rows)
            # In place: the step's logits are ours (beam rows were taken out above by indexing, a copy).
            sampled = self.sampler(logits, seqs, inplace=True) if seqs else ([], None, None)
            self.outputs.advance_beams(scheduled)
        except Exception as exc:
            logger.exception("sampling failed; failing the step's %d requests", len(scheduled))
            for seq in scheduled:
                seq.spec_token_ids, seq.spec_probs = [], None
            return self.outputs.fail(scheduled, exc)
        seconds = time.perf_counter() - started
        self.metrics.record_step(step.num_tokens, seconds, self.pool, self.scheduler)
        finished = self.outputs.process(seqs, self.scheduler.append_tokens(seqs, *sampled))
        appended = len(seqs) + sum(len(v[1]) for v in verified)
        if spec is not None and verified:
            finished += spec.append(verified, self.scheduler, self.outputs)
        if all(len(s.token_ids) == 1 + s.num_draft for s in step.seqs):  # no prompt tokens: decodes, verifications
            self.metrics.record_decode_step(appended, time.perf_counter() - began)
            if spec is not None:
                spec.end_step(step, appended)
        for seq, exc in failed:
            finished += self.outputs.fail([seq], exc)
        return finished

    def _execute(self, step: SchedulerOutput,
                 scheduled: list[Sequence]) -> tuple[torch.Tensor, list[int], list[tuple[Sequence, Exception]]]:
        """The step's forward: (logits, their rows' indices in ``scheduled``, the sequences that failed). If the
        batch fails, each sequence runs alone, so that a failure is only its own request's (a sequence writes the
        same K/V however its step is batched); the failed ones leave the step."""
        try:
            return (*self.executor.execute(step), [])
        except Exception:
            if len(step.seqs) == 1 or not self.executor.retries_alone:
                raise
            logger.exception("engine step failed; running its %d sequences one by one", len(step.seqs))
        parts, rows, failed = [], [], []
        for i, (seq, one) in enumerate(zip(scheduled, step.seqs)):
            try:
                logits, own = self.executor.execute(SchedulerOutput([one], step.block_copies if i == 0 else []))
            except Exception as exc:
                failed.append((seq, exc))
                continue
            parts.append(logits)
            rows += [i] * len(own)
        self.scheduler.drop_from_step([seq for seq, _ in failed])
        index = {id(seq): j for j, seq in enumerate(self.scheduler.step_seqs)}
        rows = [index[id(scheduled[i])] for i in rows]
        return (torch.cat(parts) if parts else torch.empty(0)), rows, failed

    # ---- convenience APIs ----------------------------------------------------------------------
    def generate(self, prompts: str | Seq[int] | Iterable[str | Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Offline batch API: run many prompts (text or token ids), one ``RequestOutput`` each, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params: give one SamplingParams or one per prompt")
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params_list)]
        try:
            for seq in seqs:
                self._post("add", seq)
            self._wait(seqs, use_tqdm)
        except BaseException:  # e.g. KeyboardInterrupt while waiting: nothing of this call keeps running
            for seq in seqs:
                if not seq.done.is_set():
                    self.abort(seq.request_id)
            raise
        return [s.output() for s in seqs]

    def _wait(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        if not use_tqdm:
            for seq in seqs:
                seq.done.wait()
            return
        from tqdm.auto import tqdm

        start = time.perf_counter()
        with tqdm(total=len(seqs), desc="hf_paged", unit="req", dynamic_ncols=True) as bar:
            done = 0
            while done < len(seqs):
                seqs[done].done.wait(timeout=0.5)
                now_done = sum(s.done.is_set() for s in seqs)
                tokens = sum(s.num_output_tokens for s in seqs)
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.1f} tok/s")
                bar.update(now_done - done)
                done = now_done

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> Iterator[int]:
        """Yield a request's tokens as they are sampled."""
        for delta in self.stream_text(prompt, params, request_id):
            yield from delta.token_ids

    def stream_text(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Iterator[StreamDelta]:
        """Yield a request's ``StreamDelta``s (new text, token ids, logprobs) as they are sampled; the last has the
        finish reason and the whole output. Leaving the loop early aborts the request."""
        seq = self.submit(prompt, params, request_id, stream=True)
        finished = False
        try:
            while not finished:
                delta = seq.stream.get()
                finished = delta.finish_reason is not None and delta.request_id == seq.request_id
                yield delta
        finally:
            if not finished:
                self.abort(seq.request_id)

    async def astream_text(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                           request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        """``stream_text`` for asyncio: the deltas arrive on the running loop; cancelling the consuming task (or
        closing the iterator early) aborts the request."""
        deltas: "asyncio.Queue[StreamDelta]" = asyncio.Queue()
        seq = self.submit(prompt, params, request_id, stream=_LoopQueue(asyncio.get_running_loop(), deltas))
        finished = False
        try:
            while not finished:
                delta = await deltas.get()
                finished = delta.finish_reason is not None and delta.request_id == seq.request_id
                yield delta
        finally:
            if not finished and not self._closed:
                self.abort(seq.request_id)

    def idle(self) -> bool:
        return not self._pending and not self.scheduler.has_work()

    def stats(self) -> dict[str, float]:
        """A snapshot for monitoring (safe from any thread): requests running and waiting, KV blocks, prefix-cache
        queries and hits (in tokens), preemptions, prompt and generated tokens so far, the tokens and time of steps
        that computed no prompt tokens (decode tokens/s: their ratio); recurrent-state slots in use
        where the model has recurrent layers; with speculative decoding, vLLM's counters (drafts, drafted and accepted
        tokens, accepted per draft position), the acceptance rate and the last step's mean k."""
        pool, bs = self.pool, self.pool.block_size
        stats = {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting) + self._pending_adds,
            "num_blocks": pool.num_blocks, "num_free_blocks": pool.num_free_blocks,
            "kv_cache_usage": pool.num_used_blocks / pool.num_blocks,
            "prefix_cache_queries": pool.prefix_queries * bs, "prefix_cache_hits": pool.prefix_hits * bs,
            "preemptions": self.metrics.preemptions, "prompt_tokens": self.metrics.prompt_tokens,
            "generation_tokens": self.metrics.generation_tokens,
            "decode_step_tokens": self.metrics.decode_step_tokens,
            "decode_step_time_s": self.metrics.decode_step_time_s,
            **(self.speculator.summary() if self.speculator is not None else {}),
        }
        if pool.states is not None:
            stats["state_slots_in_use"] = pool.states.num_used
        return stats
