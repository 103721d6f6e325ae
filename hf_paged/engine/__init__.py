"""The engine: one continuous-batching loop over the scheduler and an executor, and what it hands back."""

from .llm_engine import LLMEngine

__all__ = ["LLMEngine"]
