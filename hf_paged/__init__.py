"""hf_paged: vLLM-style paged KV memory and continuous batching for Hugging Face causal LMs, as a plugin.

    model = hf_paged.wrap(AutoModelForCausalLM.from_pretrained(...))
    model.generate(**inputs)                      # runs on the continuous-batching engine

    engine = hf_paged.LLMEngine(model, tokenizer)  # offline batch API
    engine.generate(prompts, hf_paged.SamplingParams(max_new_tokens=64))

    model.generate(**inputs, past_key_values=hf_paged.PagedCache(model, num_blocks=512))  # HF generate, paged

    pipeline("text-generation", model=path, backend="hf_paged")   # HF's pipeline on the engine
    import hf_paged.auto                          # (or hf_paged.enable()) every causal LM loaded afterwards
"""

from .core.block_pool import BlockPool, BlockTable
from .config import EngineConfig
from .execution.kv_cache import KVCache
from .execution.paged_cache import PagedCache
from .engine.llm_engine import LLMEngine
from .execution.patches.attention import ATTN_IMPLEMENTATION
from .admission import UnsupportedModel
from .api import astream_text, fallback_reason, get_engine, stream_text, unwrap, wrap
from .execution.plan import ExecutionPlan
from .core.sequence import FinishReason, RequestOutput, SamplingParams, StreamDelta
from .core.structured_output import StructuredOutputs
from .integrations import pipeline as _pipeline_patch
from .integrations.auto_model import disable, enable
from .integrations.pipeline import PagedTextGenerationPipeline

_pipeline_patch.install()  # pipeline(..., backend="hf_paged"); calls without the flag are untouched

__all__ = ["ATTN_IMPLEMENTATION", "BlockPool", "BlockTable", "EngineConfig", "ExecutionPlan", "FinishReason", "KVCache",
           "LLMEngine", "PagedCache", "PagedTextGenerationPipeline", "RequestOutput", "SamplingParams", "StreamDelta",
           "StructuredOutputs", "UnsupportedModel", "astream_text", "disable", "enable", "fallback_reason",
           "get_engine", "stream_text", "unwrap", "wrap"]
