"""One line for an existing script: ``import hf_paged.auto`` at its top.

Every causal LM the script loads afterwards through ``from_pretrained`` (``AutoModelForCausalLM`` or a concrete class
such as ``LlamaForCausalLM``) or ``pipeline(...)`` generates through hf_paged's continuous-batching engine; nothing else
in the script changes. It is ``hf_paged.enable()`` (``hf_paged.disable()`` undoes it), with the engine options found
in the environment variable ``HF_PAGED_ENGINE_OPTIONS`` as a JSON object (e.g. ``{"memory_bytes": 536870912}``), else
the engine's defaults. A model the engine cannot serve keeps plain HF behaviour, with one logged line saying why.
"""

import json

from . import envs
from .integrations.auto_model import enable

ENV_OPTIONS = "HF_PAGED_ENGINE_OPTIONS"


def options_from_environment() -> dict:
    text = envs.engine_options()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_OPTIONS}: not a JSON object of engine options ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_OPTIONS}: expected a JSON object of engine options, got {text!r}")
    return options


enable(**options_from_environment())
