"""``hf_paged.wrap(model)``: the same model object, whose ``generate`` runs through the engine.

A padded batch of ``input_ids`` + ``attention_mask`` becomes one request per row (times
``num_return_sequences``); the rows join whatever else the engine is running, from any thread, and the
result is built with exactly the shape and padding of HF's output (``GenerateDecoderOnlyOutput`` with
``sequences`` and ``scores`` under ``return_dict_in_generate=True``). Assisted decoding runs on the engine as
speculative decoding, for any batch size: ``prompt_lookup_num_tokens=k`` (n-gram drafts from each row's own tokens,
up to ``max_matching_ngram_size`` long) and ``assistant_model=draft`` (a smaller model with the same tokenizer,
``num_assistant_tokens`` drafted at most). Anything the engine does not do (constraints, a streamer on more than
one sequence, an assistant with its own tokenizer, ...) is handed to HF's own ``generate`` on a ``PagedCache``, with
one logged line saying why. ``unwrap`` restores the model.

One engine per model: the first ``generate`` builds it (under a lock, so concurrent first callers share it) and
every later call, from any thread, joins its running batch. The engine installs nothing on the model between its
forwards, so a wrapped model can be copied (``copy.deepcopy``), pickled (``torch.save``), saved
(``save_pretrained``) and trained; a copy is wrapped with the same options and builds its own engine on first use.
Weights changed between calls are seen by the next call (see ``LLMEngine``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from typing import Any, AsyncIterator, Iterator, Sequence as Seq

import torch
from transformers import GenerationConfig

from . import distributed, streaming
from .execution.paged_cache import PagedCache
from .config import EngineConfig, SpeculativeConfig
from .engine.llm_engine import LLMEngine
from .admission import UnsupportedModel, cache_refusal, engine_refusal
from .core.sequence import SamplingParams, StreamDelta

logger = logging.getLogger("hf_paged")

_SLOT = "_hf_paged"  # the one attribute wrap adds to the model (besides its generate)

# Generation-config fields the engine implements; any other field set away from its default falls back.
_SUPPORTED_FIELDS = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id",
    "stop_strings", "output_scores", "return_dict_in_generate", "use_cache", "num_beams", "cache_implementation",
    "transformers_version", "_from_model_config", "_original_object_hash", "_commit_hash", "early_stopping",
    "length_penalty", "compile_config", "disable_compile", "decoder_start_token_id", "generation_kwargs",
    "prompt_lookup_num_tokens", "max_matching_ngram_size",
}
_FALLBACK_ARGS = ("prefix_allowed_tokens_fn", "assistant_tokenizer", "negative_prompt_ids",
                  "negative_prompt_attention_mask", "custom_generate", "synced_gpus")


class _Wrapping:
    """What ``wrap`` keeps on a model: the engine options, the tokenizer and, once built, the engine. A copy of the
    model (``deepcopy``, pickle) gets a fresh one with the same options: the copy's engine is its own."""

    def __init__(self, options: dict[str, Any], tokenizer: Any) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.engine: LLMEngine | None = None
        self.refusal: str | None = None  # why the engine refused the model (its probe step), once it has
        self.logged_fallbacks: set[str] = set()
        self._lock = threading.Lock()

    def engine_for(self, model: torch.nn.Module) -> LLMEngine:
        """The model's engine, built on first use; raises ``UnsupportedModel`` (every time) if it refused the
        model."""
        engine = self.engine
        if engine is None or engine.closed:
            with self._lock:
                if self.refusal is not None:
                    raise UnsupportedModel(self.refusal)
                if self.engine is None or self.engine.closed:
                    try:
                        self.engine = LLMEngine(model, self.tokenizer, **self.options)
                    except UnsupportedModel as exc:
                        self.refusal = exc.feature
                        raise
                engine = self.engine
        return engine

    def close(self) -> None:
        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None

    def __deepcopy__(self, memo: dict) -> "_Wrapping":
        return _Wrapping(copy.deepcopy(self.options, memo), self.tokenizer)

    def __reduce__(self):
        return _Wrapping, (self.options, self.tokenizer)


class _PagedGenerate:
    """A wrapped model's ``generate`` (an instance attribute, so copies and pickles of the model carry it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.__doc__ = _paged_generate.__doc__

    def __call__(self, *args: Any, **kwargs: Any):
        if distributed.is_tensor_parallel(self.model):  # every rank calls it; rank 0's engine serves the call
            return distributed.spmd_generate(self.model, _paged_generate, args, kwargs)
        return _paged_generate(self.model, *args, **kwargs)

    def __reduce__(self):
        return _PagedGenerate, (self.model,)


def wrap(model: torch.nn.Module, tokenizer: Any = None, **engine_config: Any) -> torch.nn.Module:
    """Make ``model.generate`` run on hf_paged's continuous-batching engine; returns the same object.

    ``engine_config`` goes to ``LLMEngine`` (``num_blocks`` / ``memory_bytes``, ``block_size``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``, ...); a bad option raises
    ``ValueError`` naming it here. A model whose attention cannot be paged is returned unchanged, with the reason
    logged.
    """
    EngineConfig.from_options(engine_config)
    refusal = engine_refusal(model)
    if refusal is not None:
        logger.warning("hf_paged: not wrapping %s (%s); it keeps HF generate", type(model).__name__, refusal)
        return model
    if is_wrapped(model):
        unwrap(model)
    model.__dict__[_SLOT] = _Wrapping(dict(engine_config), tokenizer)
    model.__dict__["generate"] = _PagedGenerate(model)
    return model


def is_wrapped(model: torch.nn.Module) -> bool:
    return isinstance(model.__dict__.get(_SLOT), _Wrapping)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``wrap``: close the model's engine (its thread, its KV pool) and give back HF's own ``generate``."""
    slot = model.__dict__.pop(_SLOT, None)
    if isinstance(model.__dict__.get("generate"), _PagedGenerate):
        del model.__dict__["generate"]
    if isinstance(slot, _Wrapping):
        slot.close()
    return model


def fallback_reason(model: torch.nn.Module) -> str | None:
    """Why ``wrap(model).generate`` runs plain HF ``generate`` for this model (None: it runs on the engine). For a
    wrapped model this builds its engine if needed (the engine's probe step may refuse the model)."""
    slot = model.__dict__.get(_SLOT)
    if not isinstance(slot, _Wrapping):
        return engine_refusal(model) or "not wrapped (hf_paged.wrap was not called on it)"
    try:
        slot.engine_for(model)
    except UnsupportedModel as exc:
        return exc.feature
    return None


def get_engine(model: torch.nn.Module) -> LLMEngine:
    """The engine behind a wrapped model (built on first use; thread-safe: one engine per model)."""
    slot = model.__dict__.get(_SLOT)
    if not isinstance(slot, _Wrapping):
        raise ValueError(f"model: this {type(model).__name__} is not wrapped; call hf_paged.wrap(model) first")
    return slot.engine_for(model)


# Values of unsupported fields that change nothing (what _prepare_generation_config fills in).
_NEUTRAL = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False,
            "output_attentions": False, "output_hidden_states": False, "output_logits": False,
            "diversity_penalty": 0.0, "num_beam_groups": 1, "renormalize_logits": False}
_ASSISTANT_FIELDS = {"num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                     "assistant_lookbehind", "target_lookbehind"}  # only read with an assistant_model


def _unsupported(gen: GenerationConfig) -> str | None:
    for name, value in gen.to_dict().items():
        if name in _SUPPORTED_FIELDS or name in _ASSISTANT_FIELDS or value is None:
            continue
        if name in _NEUTRAL and value == _NEUTRAL[name]:
            continue
        return f"generation option {name}={value!r}"
    if gen.num_beams and gen.num_beams > 1:
        if gen.do_sample:
            return "beam sampling (num_beams > 1 with do_sample)"
        if (gen.repetition_penalty or 1.0) != 1.0 or gen.stop_strings:
            return "beam search with repetition_penalty / stop_strings"
    return None


def _paged_generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                    logits_processor: Any = None, **kwargs: Any):
    """HF's ``generate`` signature and output, run on the model's hf_paged engine (see ``hf_paged.wrap``)."""
    given = [name for name in _FALLBACK_ARGS if kwargs.get(name) is not None]
    if given or kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None:
        what = f"argument {given[0]}" if given else "a caller-supplied past_key_values / inputs_embeds"
        return _fallback(self, what, inputs, generation_config, logits_processor, kwargs)
    call_kwargs = dict(kwargs)
    assistant = call_kwargs.pop("assistant_model", None)
    stopping = call_kwargs.pop("stopping_criteria", None)
    input_ids = inputs if inputs is not None else call_kwargs.pop("input_ids", None)
    attention_mask = call_kwargs.pop("attention_mask", None)
    tokenizer = call_kwargs.pop("tokenizer", None)
    streamer = call_kwargs.pop("streamer", None)  # HF streamers: fed by streaming.generate_with_streamer
    gen, model_kwargs = self._prepare_generation_config(generation_config, **call_kwargs)
    model_kwargs.pop("use_cache", None)
    if input_ids is None or model_kwargs:
        what = "no input_ids" if input_ids is None else f"model inputs {sorted(model_kwargs)}"
        return _fallback(self, what, inputs, generation_config, logits_processor, kwargs)
    reason = _unsupported(gen)
    if reason:
        return _fallback(self, reason, inputs, generation_config, logits_processor, kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    # Only left padding (HF's convention for decoder-only generation) maps onto rows without padding.
    if (mask[:, 1:].long() - mask[:, :-1].long()).lt(0).any():
        return _fallback(self, "right-padded attention_mask", inputs, generation_config, logits_processor, kwargs)
    gen.validate()

    if (gen.num_beams or 1) > 1 and logits_processor:
        return _fallback(self, "beam search with a logits_processor", inputs, generation_config, logits_processor,
                         kwargs)
    if stopping and ((gen.num_beams or 1) > 1 or (gen.num_return_sequences or 1) > 1 or streamer is not None):
        return _fallback(self, "stopping_criteria with beams, num_return_sequences or a streamer", inputs,
                         generation_config, logits_processor, kwargs)
    if streamer is not None:
        reason = streaming.streamer_fallback_reason(input_ids, gen.num_return_sequences or 1, gen.num_beams or 1)
        if reason:
            return _fallback(self, reason, inputs, generation_config, logits_processor, kwargs)
    if distributed.follows_rank0(self):  # a tensor-parallel rank > 0: rank 0's engine runs this call's steps here
        return distributed.follow_rank0(self, input_ids.device)
    try:
        engine = get_engine(self)
    except UnsupportedModel as exc:
        return _fallback(self, exc.feature, inputs, generation_config, logits_processor, kwargs)
    params = _sampling_params(gen, input_ids.shape[1], logits_processor, tokenizer, engine, assistant)
    n = gen.num_return_sequences or 1
    if streamer is not None:
        out = streaming.generate_with_streamer(engine, input_ids[0][mask[0]].tolist(), params, streamer, input_ids)
        return _build_output(input_ids, [out], n, gen, params)
    return _build_output(input_ids, _run_rows(engine, input_ids, mask, params, stopping), n, gen, params)


class _RowStopping:
    """HF stopping criteria for one row of a wrapped ``generate``, evaluated as HF evaluates them on that row: on the
    row as HF holds it (its left padding included), with the batch's shape (every row this one), on a copy of the
    criteria whose mutable state (lists, dicts, tensors: e.g. lm-eval's per-row ``done_tracker``) is the row's own."""

    def __init__(self, criteria: Any, padded_row: torch.Tensor, batch: int) -> None:
        self.criteria = [self._own_state(c) for c in criteria]
        self.row = padded_row.cpu()
        self.batch = batch

    @staticmethod
    def _own_state(criterion: Any) -> Any:
        mine = copy.copy(criterion)
        for name, value in vars(criterion).items():
            if isinstance(value, (list, dict, set, torch.Tensor)):
                setattr(mine, name, copy.deepcopy(value))
        return mine

    def __call__(self, output_ids: list[int]) -> bool:
        ids = torch.cat([self.row, torch.tensor(output_ids, dtype=self.row.dtype)]).expand(self.batch, -1)
        for criterion in self.criteria:
            done = criterion(ids, None)
            if bool(done[0] if isinstance(done, torch.Tensor) and done.dim() else done):
                return True
        return False


def _run_rows(engine: LLMEngine, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
              stopping: Any = None) -> list:
    """Every row (its unpadded tokens) as one request on the engine; their outputs (``n`` samples each), in order.
    Sampled rows without a seed get one from torch's global generator (``set_seed``), ``base + row``: a seeded batch
    gives the same outputs whatever the engine's timing."""
    roots = []
    base = int(torch.randint(0, 1 << 62, (1,))) if params.temperature > 0 and params.seed is None else None
    try:
        for row in range(input_ids.shape[0]):
            row_params = params
            if base is not None:
                row_params = dataclasses.replace(row_params, seed=base + row * params.n)
            if stopping:
                row_params = dataclasses.replace(row_params, stop_check=_RowStopping(stopping, input_ids[row],
                                                                                     input_ids.shape[0]))
            roots.append(engine.submit(input_ids[row][mask[row]].tolist(), row_params))
    except ValueError:
        for seq in roots:
            engine.abort(seq.request_id)
        raise
    for seq in roots:
        seq.done.wait()
    errors = [s.error for s in roots if s.error is not None]
    if errors:
        raise RuntimeError("hf_paged engine failed a request") from errors[0]
    outputs = []
    for seq in roots:
        out = seq.output()
        outputs.extend(out.samples if out.samples else [out])
    return outputs


def _sampling_params(gen: GenerationConfig, input_len: int, logits_processor: Any, tokenizer: Any,
                     engine: LLMEngine, assistant: torch.nn.Module | None = None) -> SamplingParams:
    if gen.max_new_tokens is not None:
        max_new = gen.max_new_tokens
    else:
        max_new = (gen.max_length or 20) - input_len
    min_new = gen.min_new_tokens or max(0, (gen.min_length or 0) - input_len)
    eos = gen.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    stop = gen.stop_strings or []
    if stop and engine.tokenizer is None:
        if tokenizer is None:
            raise ValueError("stop_strings: pass tokenizer= to generate (as HF requires) or to hf_paged.wrap")
        engine.tokenizer = tokenizer
    sample = bool(gen.do_sample)
    beams = gen.num_beams or 1
    nrs = gen.num_return_sequences or 1
    params = SamplingParams(
        n=nrs if beams == 1 else 1, num_beams=beams, num_return_sequences=nrs if beams > 1 else 1,
        length_penalty=gen.length_penalty if gen.length_penalty is not None else 1.0,
        early_stopping=gen.early_stopping if gen.early_stopping is not None else False,
        max_new_tokens=max_new, min_new_tokens=min_new, temperature=(gen.temperature or 1.0) if sample else 0.0,
        top_k=(gen.top_k or 0) if sample else 0, top_p=(gen.top_p or 1.0) if sample else 1.0,
        min_p=(gen.min_p or 0.0) if sample else 0.0, repetition_penalty=gen.repetition_penalty or 1.0,
        stop_token_ids=eos_ids, ignore_eos=True, stop=[stop] if isinstance(stop, str) else list(stop),
        keep_scores=bool(gen.output_scores and gen.return_dict_in_generate),
        logits_processors=logits_processor or None, speculative=_speculative(gen, assistant),
    )
    params.validate()
    return params


def _speculative(gen: GenerationConfig, assistant: torch.nn.Module | None) -> SpeculativeConfig | None:
    """HF's assisted-decoding options as the engine's speculative decoding (None: the engine's default). Beam search
    ignores them, as HF's ``generate`` does (with a warning)."""
    if (gen.num_beams or 1) > 1 and (assistant is not None or gen.prompt_lookup_num_tokens):
        logger.warning("hf_paged: beam search does not speculate; %s ignored, as HF ignores it",
                       "assistant_model" if assistant is not None else "prompt_lookup_num_tokens")
        return None
    if assistant is not None:
        return SpeculativeConfig("draft", gen.num_assistant_tokens or 5, draft_model=assistant)
    if gen.prompt_lookup_num_tokens:
        return SpeculativeConfig("ngram", gen.prompt_lookup_num_tokens,
                                 prompt_lookup_max=gen.max_matching_ngram_size or 2)
    return None


def _build_output(input_ids: torch.Tensor, outputs: list, n: int, gen: GenerationConfig, params: SamplingParams):
    """HF's padded ``[rows * n, prompt + generated]`` result from one output per returned sequence."""
    eos = gen.eos_token_id
    first_eos = eos if isinstance(eos, int) else (eos[0] if eos else None)
    if (gen.num_beams or 1) > 1:  # HF's beam search fills with `pad_token_id or eos`: a pad id of 0 counts as unset
        pad = (gen.pad_token_id or first_eos) if first_eos is not None else -1
    else:
        pad = gen.pad_token_id if gen.pad_token_id is not None else (first_eos if first_eos is not None else 0)
    prompt = input_ids.repeat_interleave(n, dim=0)
    width = max(len(o.token_ids) for o in outputs)
    out = torch.full((len(outputs), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for i, o in enumerate(outputs):
        out[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=input_ids.dtype)
    sequences = torch.cat([prompt, out], dim=1)
    if not gen.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    scores = None
    if params.keep_scores:
        vocab = outputs[0].scores[0].shape[-1]
        scores = tuple(
            torch.stack([o.scores[t] if t < len(o.scores) else torch.full((vocab,), float("-inf")) for o in outputs])
            for t in range(width)
        )
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores)


def _fallback(model, reason: str, inputs, generation_config, logits_processor, kwargs: dict):
    plain = kwargs.get("past_key_values") is not None or cache_refusal(model) is not None
    slot = model.__dict__.get(_SLOT)
    logged = slot.logged_fallbacks if isinstance(slot, _Wrapping) else set()
    if reason not in logged:  # once per reason and model: a loop of generate calls logs it once
        logged.add(reason)
        logger.warning("hf_paged: %s -> HF generate%s", reason, "" if plain else " on a PagedCache")
    generate = type(model).generate
    if plain:
        return generate(model, inputs, generation_config, logits_processor, **kwargs)
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if ids is None:
        return generate(model, inputs, generation_config, logits_processor, **kwargs)
    gen, _ = model._prepare_generation_config(generation_config, **{k: v for k, v in kwargs.items()
                                                                     if k not in ("input_ids", "attention_mask")})
    rows = ids.shape[0] * max(gen.num_beams or 1, gen.num_return_sequences or 1)
    length = ids.shape[-1] + (gen.max_new_tokens if gen.max_new_tokens is not None else (gen.max_length or 20))
    options = slot.options if isinstance(slot, _Wrapping) else {}
    block_size = options.get("block_size", 16)
    cache = PagedCache(model, block_size=block_size, num_blocks=rows * (-(-length // block_size) + 1),
                       kv_cache_dtype=options.get("kv_cache_dtype", "auto"))
    try:
        return generate(model, inputs, generation_config, logits_processor, past_key_values=cache, **kwargs)
    finally:
        cache.free()


# ---- text deltas for applications ----------------------------------------------------------------------------------
def _engine_of(target: Any) -> Any:
    return target if hasattr(target, "stream_text") else get_engine(target)


def stream_text(target: Any, prompt: str | Seq[int], params: SamplingParams | None = None,
                request_id: str | None = None) -> Iterator[StreamDelta]:
    """Yield a request's ``StreamDelta``s (new text, token ids; the last has ``finish_reason`` and the whole
    ``output``) as it runs in the shared batch. ``target``: an ``LLMEngine`` or a wrapped model. Leaving the loop
    early aborts the request. (``LLMEngine.stream_text``.)"""
    return _engine_of(target).stream_text(prompt, params, request_id=request_id)


def astream_text(target: Any, prompt: str | Seq[int], params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[StreamDelta]:
    """:func:`stream_text` for asyncio (``LLMEngine.astream_text``); cancelling the consumer aborts the request."""
    return _engine_of(target).astream_text(prompt, params, request_id=request_id)
