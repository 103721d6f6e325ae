"""``hf_paged.enable()`` / ``hf_paged.disable()``: every causal LM loaded afterwards generates on the engine.

``enable`` replaces ``AutoModelForCausalLM.from_pretrained`` and ``PreTrainedModel.from_pretrained`` (which every
concrete class's, ``LlamaForCausalLM.from_pretrained`` included, is) with functions that call the original and wrap
the causal LM it returns (``hf_paged.wrap``; a model the engine cannot page keeps HF ``generate``, with one logged line
saying why), and makes every text-generation ``pipeline(...)`` a
:class:`~hf_paged.integrations.pipeline.PagedTextGenerationPipeline` (which also wraps a model object handed to it).
``disable`` restores ``from_pretrained``, removes the pipeline hook (the ``backend="hf_paged"`` flag included) and
unwraps every model wrapped while enabled. ``import hf_paged.auto`` calls ``enable()``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from . import patch_registry
from . import pipeline as pipeline_patch

logger = logging.getLogger("hf_paged")

_lock = threading.Lock()
_state: dict[str, Any] = {"enabled": False, "installed": False, "engine_options": {}}
_wrapped = pipeline_patch.wrapped_while_enabled  # models wrapped while enabled, for disable() to unwrap


_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _auto_from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
    original = patch_registry.original(AutoModelForCausalLM, "from_pretrained")  # a classmethod
    model = original.__get__(None, cls)(*args, **kwargs)
    if _state["enabled"]:  # a causal LM by construction, remote code included
        wrap_loaded_model(model)
    return model


def _from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
    original = patch_registry.original(PreTrainedModel, "from_pretrained")  # a classmethod
    model = original.__get__(None, cls)(*args, **kwargs)
    if _state["enabled"] and type(model).__name__ in _CAUSAL_LM_CLASSES:  # a concrete class of transformers'
        wrap_loaded_model(model)
    return model


def wrap_loaded_model(model: Any) -> Any:
    """Wrap a freshly loaded model for the engine (remembered for ``disable``); returns it."""
    from .. import api

    if api.is_wrapped(model):
        return model
    api.wrap(model, None, **_state["engine_options"])
    if api.is_wrapped(model):
        _wrapped.add(model)
        logger.info("hf_paged: %s generates on the engine", type(model).__name__)
    return model


def enable(**engine_options: Any) -> None:
    """Make every causal LM loaded from now on through ``from_pretrained`` (auto or concrete class) or ``pipeline(...)``
    generate through the engine. ``engine_options`` go to each model's ``LLMEngine`` (``memory_bytes``,
    ``num_blocks``, ``max_num_seqs``, ...). Calling it again replaces the options for later loads."""
    options = pipeline_patch.check_engine_options(engine_options, "enable")
    with _lock:
        _state["engine_options"] = options
        if not _state["installed"]:
            patch_registry.install(AutoModelForCausalLM, "from_pretrained", classmethod(_auto_from_pretrained))
            patch_registry.install(PreTrainedModel, "from_pretrained", classmethod(_from_pretrained))
        _state.update(enabled=True, installed=True)
    pipeline_patch.install(all_text_generation=True, engine_options=options)


def disable() -> None:
    """Undo :func:`enable` and the ``backend="hf_paged"`` pipeline flag: ``from_pretrained`` and
    ``TextGenerationPipeline`` as transformers defines them, and every model wrapped while enabled unwrapped.
    (``hf_paged.integrations.pipeline.install()`` brings the flag alone back.)"""
    from .. import api

    with _lock:
        if _state["installed"]:
            patch_registry.remove(AutoModelForCausalLM, "from_pretrained")
            patch_registry.remove(PreTrainedModel, "from_pretrained")
        _state.update(enabled=False, installed=False, engine_options={})
        models = list(_wrapped)
        _wrapped.clear()
    pipeline_patch.uninstall()
    for model in models:
        api.unwrap(model)


def enabled() -> bool:
    return _state["enabled"]
