"""The front door both command lines share (``hf-paged`` and ``python -m hf_paged.serve``): the model and engine
flags, declared once here, and what they load: a model (the embedded default, a model folder, a GGUF file, or
tensor-parallel shards under torchrun) and the ``LLMEngine`` the flags describe.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
               "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2GiB"``, ``"1e9"``, ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    try:
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    except ValueError:  # e.g. "1.2.3"
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """What to load and how the engine runs it: ``--model``, ``--dtype`` and the engine's memory and batch sizes."""
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default=None,
                       help=f"a local Hugging Face model folder or a .gguf file (default: the embedded "
                            f"{DEFAULT_MODEL_NAME})")
    group.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="float32 (HF's greedy tokens exactly) or bfloat16 (faster on CPUs with AMX)")
    group.add_argument("--kv-memory", type=parse_size, default=None,
                       help="size of the KV-cache pool, e.g. 512MiB (default: the engine's, 2GiB)")
    group.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                       help="auto: K/V in the model's dtype; int8: int8 with a scale per token and head (a quarter of "
                            "fp32's KV memory, faster decode attention, small rounding error)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one engine step")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one engine step")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    group.add_argument("--speculative", type=_speculative_json, default=None,
                       help='speculative decoding, as JSON: {"method": "ngram", "num_tokens": 4} (prompt lookup) or '
                            '{"method": "draft", "num_tokens": 4, "draft_model": "PATH"} (a smaller model with the '
                            'same tokenizer: a folder or a .gguf file, loaded in --dtype); also "adaptive", '
                            '"prompt_lookup_min", "prompt_lookup_max"')


def _speculative_json(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def load_model(path: str | None, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) for ``--model``: the embedded default, a model folder or a GGUF file; under torchrun
    (``WORLD_SIZE`` > 1) the folder's tensor-parallel shards."""
    import torch

    from .distributed import cli_load

    sharded = cli_load(path, dtype)
    if sharded is not None:
        return sharded
    torch_dtype = getattr(torch, dtype)
    if path is None:
        from .models import load_default_model

        return (*load_default_model(torch_dtype), DEFAULT_MODEL_NAME)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch_dtype).eval()
        return model, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name), p.stem
    if not p.is_dir():
        raise SystemExit(f"--model: {path} is neither a model folder nor a .gguf file")
    return AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype).eval(), AutoTokenizer.from_pretrained(p), p.name


def build_engine(args: argparse.Namespace) -> tuple[Any, str]:
    """(engine, the model's name) for the flags (unset ones keep the engine's defaults); the engine holds the
    tokenizer (``engine.tokenizer``)."""
    from .engine import LLMEngine

    options: dict[str, Any] = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                               "kv_cache_dtype": args.kv_cache_dtype}
    if args.kv_memory is not None:
        options["memory_bytes"] = args.kv_memory
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    speculative = getattr(args, "speculative", None)
    if speculative is not None:
        speculative = dict(speculative)
        if isinstance(speculative.get("draft_model"), str):
            speculative["draft_model"] = load_model(speculative["draft_model"], args.dtype)[0]
        options["speculative"] = speculative
    model, tokenizer, name = load_model(args.model, args.dtype)
    return LLMEngine(model, tokenizer, **options), name
