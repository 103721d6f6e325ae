"""``pipeline("text-generation", ..., backend="hf_paged")``: HF's text-generation pipeline, generating on the engine.

:class:`PagedTextGenerationPipeline` keeps ``TextGenerationPipeline``'s pre- and post-processing (the same outputs) on a
``hf_paged.wrap``-ed model: every input is an engine request, many in flight, results in input order; call options the
engine hands back to HF keep HF's iteration (one logged line says why). Use it as ``pipeline_class=`` or through the
flag: :func:`install` gives ``TextGenerationPipeline`` an ``__init__`` that turns a new instance into the paged class
when ``backend="hf_paged"`` is passed (or always, while ``hf_paged.enable()`` is on), which also catches a ``pipeline``
imported before hf_paged; :func:`uninstall` removes it. Engine options go in ``engine_options={...}``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Sized
from typing import Any, Iterator

from transformers.pipelines.text_generation import TextGenerationPipeline

from . import patch_registry

logger = logging.getLogger("hf_paged")

BACKEND = "hf_paged"
_lock = threading.Lock()
_state = {"installed": False, "all": False, "engine_options": {}}
wrapped_while_enabled: "weakref.WeakSet[Any]" = weakref.WeakSet()  # hf_paged.disable() unwraps these
# At most this many requests of one list / stream in flight per engine slot (max_num_seqs): the rest wait in line.
_IN_FLIGHT_PER_SLOT = 2


def check_engine_options(options: dict[str, Any] | None, field: str = "engine_options") -> dict[str, Any]:
    """A copy of ``options``; ValueError naming the field or the option when it is not a dict of ``LLMEngine``
    options with acceptable values."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{field}: expected a dict of LLMEngine options, got {type(options).__name__}")
    from ..config import EngineConfig

    EngineConfig.from_options(options)
    return dict(options)


def serve_model(model: Any, tokenizer: Any, engine_options: dict[str, Any]) -> bool:
    """Wrap ``model`` for the engine (keeping an existing wrap unless other options are given); whether the engine
    serves it. A model the engine cannot page keeps HF ``generate`` (``wrap`` logs why)."""
    from .. import api

    slot = model.__dict__.get(api._SLOT)
    if not api.is_wrapped(model) or (engine_options and engine_options != slot.options):
        api.wrap(model, tokenizer, **engine_options)
        if not api.is_wrapped(model):
            return False
        if _state["all"]:
            wrapped_while_enabled.add(model)
        slot = model.__dict__[api._SLOT]
    if tokenizer is not None and slot.tokenizer is None:
        slot.tokenizer = tokenizer
        if slot.engine is not None and slot.engine.tokenizer is None:
            slot.engine.tokenizer = tokenizer
    api.get_engine(model)  # built now, in this thread, before worker threads use it
    return True


class PagedTextGenerationPipeline(TextGenerationPipeline):
    """``TextGenerationPipeline`` on hf_paged's continuous-batching engine (see the module docstring)."""

    def __init__(self, *args: Any, backend: str = BACKEND, engine_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if backend != BACKEND:
            raise ValueError(f"backend: PagedTextGenerationPipeline runs on {BACKEND!r}, got {backend!r}")
        if engine_options is None:  # hf_paged.enable(**options): the default for every pipeline
            engine_options = _state["engine_options"]
        options = check_engine_options(engine_options)
        super().__init__(*args, **kwargs)
        self.engine_options = options
        self.served_by_engine = serve_model(self.model, self.tokenizer, options)

    def _engine_fallback_reason(self, forward_params: dict[str, Any]) -> str | None:
        """Why this call's generation would go to HF's ``generate`` (the wrapped ``generate``'s own checks), or None."""
        if not self.served_by_engine:
            return "the model is not served by the engine"
        from .. import api

        kwargs = self._prepare_generate_kwargs({k: v for k, v in forward_params.items() if k != "prefix_length"})
        for name in api._FALLBACK_ARGS:
            if kwargs.get(name) is not None:
                return f"argument {name}"
        if kwargs.get("past_key_values") is not None:
            return "a caller-supplied past_key_values"
        for name in ("tokenizer", "streamer", "assistant_tokenizer"):
            kwargs.pop(name, None)
        gen, model_kwargs = self.model._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
        model_kwargs.pop("use_cache", None)
        if model_kwargs:
            return f"model inputs {sorted(model_kwargs)}"
        return api._unsupported(gen)

    def _max_in_flight(self) -> int:
        from .. import api

        slots = api.get_engine(self.model).scheduler.config.max_num_seqs
        return max(1, _IN_FLIGHT_PER_SLOT * slots)

    def get_iterator(self, inputs: Any, num_workers: int, batch_size: int, preprocess_params: dict,
                     forward_params: dict, postprocess_params: dict) -> Iterator[Any]:
        """Every input as its own engine request, many in flight, results in input order (``batch_size`` and
        ``num_workers`` are not needed: the engine batches)."""
        reason = self._engine_fallback_reason(forward_params)
        if reason is not None:
            if self.served_by_engine:  # (a model the engine cannot serve had its line when it was wrapped)
                logger.info("hf_paged pipeline: %s -> HF's pipeline iteration", reason)
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        limit = self._max_in_flight()
        window = min(len(inputs), limit) if isinstance(inputs, Sized) else limit
        return self._run_in_flight(iter(inputs), max(window, 1), preprocess_params, forward_params,
                                   postprocess_params)

    def _run_in_flight(self, items: Iterator[Any], window: int, preprocess_params: dict, forward_params: dict,
                       postprocess_params: dict) -> Iterator[Any]:
        # One worker thread per request in flight: each runs HF's own preprocess -> forward (the wrapped generate,
        # which waits on its engine request) -> postprocess, so outputs are exactly the pipeline's.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=window, thread_name_prefix="hf_paged-pipeline")
        pending: list[concurrent.futures.Future] = []
        try:
            for item in items:
                pending.append(pool.submit(self.run_single, item, preprocess_params, forward_params,
                                           postprocess_params))
                while len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _init_text_generation_pipeline(self: TextGenerationPipeline, *args: Any, **kwargs: Any) -> None:
    """``TextGenerationPipeline.__init__`` while installed: a plain instance built with ``backend="hf_paged"`` (or any,
    while ``hf_paged.enable()`` is on) becomes a paged one; else the original."""
    if type(self) is TextGenerationPipeline and (kwargs.get("backend") == BACKEND
                                                 or (_state["all"] and "backend" not in kwargs)):
        self.__class__ = PagedTextGenerationPipeline
        PagedTextGenerationPipeline.__init__(self, *args, **kwargs)
        return
    patch_registry.original(TextGenerationPipeline, "__init__")(self, *args, **kwargs)


def install(all_text_generation: bool = False, engine_options: dict[str, Any] | None = None) -> None:
    """Honour ``backend="hf_paged"`` in ``pipeline(...)``; with ``all_text_generation`` every text-generation pipeline
    built afterwards runs on the engine (``hf_paged.enable()``), with ``engine_options`` as its default options."""
    with _lock:
        if not _state["installed"]:
            patch_registry.install(TextGenerationPipeline, "__init__", _init_text_generation_pipeline)
            _state["installed"] = True
        _state["all"] = all_text_generation
        _state["engine_options"] = dict(engine_options or {})


def uninstall() -> None:
    """Remove what :func:`install` put on ``TextGenerationPipeline``."""
    with _lock:
        if _state["installed"]:
            patch_registry.remove(TextGenerationPipeline, "__init__")
            _state["installed"] = False
        _state["all"] = False
        _state["engine_options"] = {}


def installed() -> bool:
    return _state["installed"]
