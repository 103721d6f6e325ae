"""``EngineConfig``: every engine option in one dataclass, validated in one place.

``LLMEngine(model, tokenizer, **options)``, ``hf_paged.wrap(model, **options)``, the pipeline's ``engine_config``,
``HF_PAGED_ENGINE_OPTIONS`` and the CLIs' flags all become one ``EngineConfig``; a bad option raises ``ValueError``
naming it before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

KV_CACHE_DTYPES = ("auto", "int8")
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: per step, a drafter proposes up to ``num_tokens`` tokens a sequence, one forward
    verifies them. ``method``: ``"ngram"`` (prompt lookup: the continuation of the latest earlier occurrence of the
    sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens in its own prompt and output) or
    ``"draft"`` (``draft_model``: a smaller causal LM with the target's vocabulary, run on its own paged KV).
    ``adaptive``: speculation only where measured steps with drafts beat plain decode steps of that batch size, each
    request drafting as far as its acceptance pays for verifying; else always ``num_tokens``."""

    method: str = "ngram"
    num_tokens: int = 4
    draft_model: Any = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative.method: must be one of {', '.join(map(repr, SPECULATIVE_METHODS))} "
                             f"(got {self.method!r})")
        for name in ("num_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_tokens" else 1):
                raise ValueError(f"speculative.{name}: must be a {'non-negative' if name == 'num_tokens' else 'positive'}"
                                 f" integer (got {value!r})")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative.prompt_lookup_min: must be <= prompt_lookup_max "
                             f"(got {self.prompt_lookup_min!r} > {self.prompt_lookup_max!r})")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("speculative.draft_model: " + ("required by method 'draft'" if self.method == "draft"
                                                            else "only with method 'draft'"))
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative.adaptive: must be True or False (got {self.adaptive!r})")

    @classmethod
    def of(cls, value: "SpeculativeConfig | dict | None") -> "SpeculativeConfig | None":
        """A config from a dict of its fields (unknown keys: ValueError naming them), or as given."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative: must be a dict or a SpeculativeConfig (got {type(value).__name__})")
        known = [f.name for f in dataclasses.fields(cls)]
        for name in value:
            if name not in known:
                raise ValueError(f"speculative.{name}: not a speculative option (known: {', '.join(known)})")
        return cls(**value)

DEFAULT_KV_MEMORY_BYTES = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    """The KV pool takes ``num_blocks`` blocks of ``block_size`` tokens, or as many as fit in ``memory_bytes`` (2 GiB
    by default), in the model's dtype; ``kv_cache_dtype="int8"`` stores K/V as int8 with one fp32 scale per token
    and KV head (about a quarter of fp32's bytes, so that many more blocks; a small rounding error in attention).
    ``max_num_seqs`` / ``max_num_batched_tokens`` bound a step; ``share_blocks=False`` copies blocks for ``n``
    samples and beams instead of sharing them. The plan's switches (None: its default, see
    :mod:`hf_paged.execution.plan`): ``compile`` (decoder layers through ``torch.compile``), ``pack_weights``
    (pre-packed CPU linears; on for CPU models), ``fuse_layers`` (fused Llama-style layers; as ``pack_weights``),
    ``cpu_kernels`` / ``amx`` / ``triton`` (those kernels on or off), ``cuda_graphs`` (decode-only steps replayed
    from CUDA graphs; on for CUDA with Triton). ``speculative``: a :class:`SpeculativeConfig` (or a dict of its
    fields) for every request that does not set its own (``SamplingParams.speculative``)."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    share_blocks: bool = True
    compile: bool = False
    pack_weights: bool | None = None
    fuse_layers: bool | None = None
    cpu_kernels: bool | None = None
    amx: bool | None = None
    triton: bool | None = None
    cuda_graphs: bool | None = None
    kv_cache_dtype: str = "auto"
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", SpeculativeConfig.of(self.speculative))
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EngineConfig":
        """The config of ``options`` (engine keyword arguments); ``ValueError`` names an unknown option."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in options:
            if name not in known:
                raise ValueError(f"{name}: not an engine option (known: {', '.join(known)})")
        return cls(**options)

    def plan_options(self) -> dict[str, Any]:
        """The options ``execution.plan.build_plan`` takes."""
        names = ("compile", "pack_weights", "fuse_layers", "cpu_kernels", "amx", "triton", "cuda_graphs",
                 "kv_cache_dtype")
        return {name: getattr(self, name) for name in names}

    @property
    def kv_memory_bytes(self) -> int | None:
        """The pool's size in bytes where no block count is given."""
        return self.memory_bytes if self.num_blocks is not None or self.memory_bytes is not None \
            else DEFAULT_KV_MEMORY_BYTES


def _check(name: str, value: Any) -> None:
    if name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_blocks", "memory_bytes",
                "max_model_len"):
        optional = name in ("num_blocks", "memory_bytes", "max_model_len")
        if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: must be a positive integer{' or None' if optional else ''} (got {value!r})")
    elif name in ("enable_prefix_caching", "share_blocks", "compile"):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: must be True or False (got {value!r})")
    elif name == "speculative":
        pass  # validated by SpeculativeConfig
    elif name == "kv_cache_dtype":
        if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
            raise ValueError(f"{name}: must be one of {', '.join(map(repr, KV_CACHE_DTYPES))} (got {value!r})")
    elif value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}: must be True, False or None for the default (got {value!r})")
