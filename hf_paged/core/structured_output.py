"""Structured output: what a request's text must match (a JSON schema, any JSON object, a regex, one of several
strings, a Lark / GBNF grammar), kept per sequence as a grammar matcher that follows its tokens, and the token masks
the sampler applies to the constrained rows of a step in one batched call.

The grammar engine is llguidance (one of vLLM's backends): it computes a mask from the grammar's state lazily, so a
new schema costs no ahead-of-time compilation over the vocabulary, and it ships wheels for x86-64 and AArch64. It is
imported when the first constrained request arrives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint (vLLM's ``StructuredOutputsParams`` names): ``json`` a JSON schema (dict or string),
    ``json_object`` any JSON object, ``regex``, ``choice`` a list of strings, ``grammar`` Lark or GBNF text."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def validate(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one of json, json_object, regex, choice, grammar "
                             f"(got {', '.join(given) or 'none'})")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs: choice must be a non-empty list of strings")

    def grammar_text(self) -> str:
        import llguidance

        if self.json_object:
            return llguidance.grammar_from("json_schema", '{"type": "object"}')
        if self.json is not None:
            schema = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return llguidance.grammar_from("json_schema", schema)
        if self.regex is not None:
            return llguidance.grammar_from("regex", self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(self.choice))
        return llguidance.grammar_from("grammar", self.grammar)


class GrammarCompiler:
    """One engine's grammar side: the tokenizer as llguidance sees it (built once), a matcher per constrained
    sequence, and batched masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError as exc:
            raise ValueError("structured_outputs: needs llguidance (pip install llguidance)") from exc
        if tokenizer is None:
            raise ValueError("structured_outputs: needs the engine to have a tokenizer")
        self._llguidance = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=eos_token_ids[0] if eos_token_ids else None)
        self.executor = llguidance.LLExecutor()

    def matcher(self, spec: StructuredOutputs) -> Any:
        """A matcher at the start of ``spec``'s grammar (ValueError naming ``structured_outputs`` if it is bad)."""
        spec.validate()
        try:
            grammar = spec.grammar_text()
        except Exception as exc:  # llguidance's own parse errors
            raise ValueError(f"structured_outputs: {exc}") from None
        matcher = self._llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(f"structured_outputs: {matcher.get_error()}")
        return matcher

    def mask_rows(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Set to -inf, in ``logits[rows]``, every token each row's matcher does not allow next (one call fills all
        the rows' masks); other rows are untouched."""
        from llguidance.torch import (allocate_token_bitmask, apply_token_bitmask_inplace,
                                      fill_next_token_bitmask_par)

        mask = allocate_token_bitmask(len(rows), self.vocab_size)
        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], mask)
        index = torch.tensor(rows, device=logits.device)
        constrained = logits[index]
        apply_token_bitmask_inplace(constrained, mask.to(logits.device))
        logits[index] = constrained
