"""The continuous-batching engine: scheduler + model runner + sampler around one block pool.

Requests are submitted from any thread (``submit``): they are validated in the caller's thread (bad input
raises ``ValueError`` there and never reaches the running batch), then handed to one engine thread that
runs ``step`` while there is work. Each step, finished requests leave and waiting ones join; a request's
tokens stream out through its queue as they are sampled, and ``abort`` stops a request at the next step.
A step whose forward fails fails only the requests in that step; every block they held is freed.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from typing import Iterable, Iterator, Sequence as Seq

import torch

from .block_pool import BlockTable
from .cache import make_pool
from .cpu_runtime import release_openmp_pool, tune_malloc
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .patches.attention import enable_paged_attention, supports_paged_attention
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerConfig
from .beam_search import BeamSearchState
from .sequence import FinishReason, RequestOutput, SamplingParams, Sequence, SequenceGroup

logger = logging.getLogger(__name__)

DEFAULT_KV_MEMORY_BYTES = 2 << 30
_engines: "weakref.WeakSet[LLMEngine]" = weakref.WeakSet()


@atexit.register
def _shutdown_engines() -> None:
    for engine in list(_engines):
        engine.shutdown()


class LLMEngine:
    """Serve many generation requests at once on paged KV memory with an unmodified HF causal LM.

    The KV pool takes ``num_blocks`` blocks of ``block_size`` tokens, or as many as fit in ``memory_bytes``
    (default 2 GiB), in the model's dtype. ``compile``: run the decoder layers through ``torch.compile`` (one
    graph shared by all layers and step shapes, one more for single-token steps; seconds at the first steps).
    ``pack_weights`` (default: on for CPU models): engine forwards multiply with pre-packed oneDNN weights (one
    more copy of the linear weights; plain forwards of the model are unchanged). ``fuse_layers`` (default: as
    ``pack_weights``; never with ``compile``): Llama-style attention, MLP and RMSNorm modules run fused forwards
    in engine forwards (q/k/v and gate/up as one packed GEMM each, the small ops as one C call each; see
    ``patches/fused_layers.py``). ``share_blocks=False`` copies blocks for n-samples and beams instead of
    sharing them.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 memory_bytes: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 share_blocks: bool = True, compile: bool = False, pack_weights: bool | None = None,
                 fuse_layers: bool | None = None) -> None:
        if max_num_batched_tokens <= 0 or max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        ok, why = supports_paged_attention(model)
        if not ok:
            raise ValueError(f"model: hf_paged cannot page this model ({why}); use HF generate")
        enable_paged_attention(model)
        self.model = model
        self.tokenizer = tokenizer
        # Off: n samples are n independent requests and beams copy their blocks (for measuring what sharing saves).
        self.share_blocks = share_blocks
        if num_blocks is None and memory_bytes is None:
            memory_bytes = DEFAULT_KV_MEMORY_BYTES
        self.pool = make_pool(model, block_size=block_size, num_blocks=num_blocks, memory_bytes=memory_bytes)
        self.scheduler = Scheduler(self.pool, SchedulerConfig(max_num_seqs, max_num_batched_tokens,
                                                              enable_prefix_caching))
        self._on_cpu = self.pool.device.type == "cpu"
        pack_weights = self._on_cpu if pack_weights is None else pack_weights
        self.runner = ModelRunner(model, self.pool, compile=compile, pack_weights=pack_weights,
                                  fuse=pack_weights if fuse_layers is None else fuse_layers)
        if self._on_cpu:
            tune_malloc()
        self.sampler = Sampler()
        config = model.config.get_text_config()
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = config.vocab_size
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        if eos is None:
            eos = config.eos_token_id
        self.eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.metrics = EngineMetrics()
        self._inbox: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._pending = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        _engines.add(self)
        self._by_id: dict[str, Sequence] = {}

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
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the model's context of {self.max_model_len}")
        total = min(len(ids) + params.max_new_tokens, self.max_model_len)
        need = -(-total // self.pool.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"max_new_tokens: prompt + max_new_tokens need {need} KV blocks but the pool has "
                             f"{self.pool.num_blocks}; the request can never fit")
        if request_id is not None and request_id in self._by_id:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seq = Sequence(ids, params, BlockTable(self.pool), request_id, self.eos_token_ids)
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
        return seq

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None

    def submit(self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None,
               stream: bool = False) -> Sequence:
        """Queue a request; returns its sequence (``seq.done`` is set when it finishes)."""
        seq = self.make_sequence(prompt, params, request_id)
        if stream:
            if seq.group is not None:
                raise ValueError("stream: streaming is for single-sequence requests (n=1, num_beams=1)")
            seq.stream = queue.SimpleQueue()
        self._post("add", seq)
        return seq

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def _post(self, kind: str, item: object) -> None:
        if self._on_cpu:  # the poster's idle OpenMP workers would slow the engine thread's (see cpu_runtime)
            release_openmp_pool()
        with self._wake:
            self._inbox.put((kind, item))
            self._pending += 1
            self._wake.notify()
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="hf_paged-engine", daemon=True)
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

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self.scheduler.has_work():
                    if self._on_cpu:  # idle: its OpenMP workers would slow other threads' (see cpu_runtime)
                        release_openmp_pool()
                    if not self._wake.wait(timeout=30.0):
                        self._thread = None
                        return
                if self._stopping:
                    self._thread = None
                    return
            self.step()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._wake:
                self._pending -= 1
            if kind == "add":
                self._by_id[item.request_id] = item
                self.scheduler.add(item)
            elif kind == "abort":
                seq = self._by_id.get(item)
                if seq is not None and not seq.finished:
                    if seq.group is not None:
                        self._finish_group(seq.group, FinishReason.ABORT)
                    else:
                        self._finish(seq, FinishReason.ABORT)

    def step(self) -> list[Sequence]:
        """One scheduling + forward + sampling iteration; returns the sequences that finished in it."""
        self._drain_inbox()
        step = self.scheduler.schedule()
        if step.preempted:
            self.metrics.preemptions += len(step.preempted)
        if not step.seqs:
            return []
        started = time.perf_counter()
        try:
            logits, rows = self.runner.execute(step)
            for seq, n in zip(step.seqs, step.num_new_tokens):
                old = seq.num_computed_tokens
                seq.num_computed_tokens = old + n
                self.scheduler.register_computed_blocks(seq, old)
            sampling, sample_rows = [], []
            for row, seq in enumerate(step.seqs[r] for r in rows):  # row: the seq's row of logits
                group = seq.group
                if group is not None and group.beam is not None:
                    seq.pending_logits = logits[row]
                elif group is not None and seq is group.root:  # n > 1: the prompt is done; fork n samples
                    children = [seq.fork_child(i, self.share_blocks) for i in range(seq.params.n)]
                    group.live = children
                    self.scheduler.replace([seq], children)
                    sampling.extend(children)
                    sample_rows.extend([row] * len(children))
                else:
                    sampling.append(seq)
                    sample_rows.append(row)
            if sample_rows != list(range(len(rows))):  # n > 1 repeats the prompt's row
                logits = logits[sample_rows] if sample_rows else logits[:0]
            # In place: the step's logits are ours (beam rows were taken out above by indexing, a copy).
            tokens, logprobs = self.sampler(logits, sampling, inplace=True) if sampling else ([], None)
            self._advance_beams(step.seqs)
        except Exception as exc:  # a failed forward fails only this step's requests
            logger.exception("engine step failed; failing its %d requests", len(step.seqs))
            for seq in step.seqs:
                if seq.group is not None:
                    self._finish_group(seq.group, FinishReason.ERROR, exc)
                elif not seq.finished:
                    self._finish(seq, FinishReason.ERROR, exc)
            return list(step.seqs)
        now = time.perf_counter()
        self.metrics.record_step(step, now - started, self.pool, self.scheduler)
        finished = []
        for i, (seq, token) in enumerate(zip(sampling, tokens)):
            if seq.error is not None:
                self._finish(seq, FinishReason.ERROR, seq.error)
                finished.append(seq)
                continue
            seq.token_ids.append(token)
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq, token)
            if seq.stream is not None:
                seq.stream.put(token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _advance_beams(self, seqs: list[Sequence]) -> None:
        """Run a beam-search step for every group whose live beams all have their logits."""
        groups = {id(s.group): s.group for s in seqs if s.group is not None and s.group.beam is not None}
        for group in groups.values():
            beams = group.live
            if any(b.pending_logits is None for b in beams):
                continue
            logits = torch.stack([b.pending_logits for b in beams])
            if len(beams) == 1:  # the prompt: HF starts from k identical beams
                logits = logits.expand(group.beam.k, -1)
            pairs = group.beam.step(logits)
            for b in beams:
                b.pending_logits = None
            if group.root.first_token_time is None:
                group.root.first_token_time = time.perf_counter()
            if group.beam.done:
                self._finish_group(group, FinishReason.STOP)
                continue
            children = []
            for i, (parent, token) in enumerate(pairs):
                child = beams[parent].fork_child(i, self.share_blocks)
                child.token_ids.append(token)
                children.append(child)
            group.live = children
            self.scheduler.replace(beams, children)

    def _finish_group(self, group: SequenceGroup, reason: FinishReason, error: BaseException | None = None) -> None:
        for seq in list(group.live):
            if seq is not group.root:
                self._finish(seq, reason, error)
        root = group.root
        if not root.finished:
            if group.beam is None and group.finished:
                reason = group.finished[0].finish_reason if reason == FinishReason.STOP else reason
            self._finish(root, reason, error)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        n_out = seq.num_output_tokens
        if token in seq.stop_ids and n_out >= p.min_new_tokens:
            return FinishReason.STOP
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                seq.text = text[: min(hits)]
                return FinishReason.STOP
        if n_out >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, error: BaseException | None = None) -> None:
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        group = seq.group
        if seq.text is None and self.tokenizer is not None and (group is None or group.beam is None):
            seq.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if group is None or seq is not group.root or group.beam is not None:
            self.metrics.record_finish(seq)
        if seq.stream is not None:
            seq.stream.put(None)
        if group is not None and seq is not group.root:
            if seq in group.live:
                group.live.remove(seq)
            if group.beam is None:
                group.finished.append(seq)
            if not group.live:
                self._finish_group(group, reason, error)
            return
        self._by_id.pop(seq.request_id, None)
        seq.done.set()

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
        for seq in seqs:
            self._post("add", seq)
        self._wait(seqs, use_tqdm)
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
        seq = self.submit(prompt, params, request_id, stream=True)
        while True:
            token = seq.stream.get()
            if token is None:
                return
            yield token

    def idle(self) -> bool:
        return not self._pending and not self.scheduler.has_work()
