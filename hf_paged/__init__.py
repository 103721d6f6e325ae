"""hf_paged: vLLM-style paged KV memory and continuous batching for Hugging Face causal LMs, as a plugin.

    model = hf_paged.wrap(AutoModelForCausalLM.from_pretrained(...))
    model.generate(**inputs)                      # runs on the continuous-batching engine

    engine = hf_paged.LLMEngine(model, tokenizer)  # offline batch API
    engine.generate(prompts, hf_paged.SamplingParams(max_new_tokens=64))

    model.generate(**inputs, past_key_values=hf_paged.PagedCache(model, num_blocks=512))  # HF generate, paged
"""

from .block_pool import BlockPool, BlockTable
from .cache import PagedCache
from .engine import LLMEngine
from .patches.attention import ATTN_IMPLEMENTATION
from .api import get_engine, unwrap, wrap
from .sequence import FinishReason, RequestOutput, SamplingParams

__all__ = ["ATTN_IMPLEMENTATION", "BlockPool", "BlockTable", "FinishReason", "LLMEngine", "PagedCache",
           "RequestOutput", "SamplingParams", "get_engine", "unwrap", "wrap"]
