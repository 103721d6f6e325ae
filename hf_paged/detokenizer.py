"""Incremental detokenization: the text a sequence gained with each new token, in time linear in its length.

Decoding the whole output again after every token is quadratic; decoding each token on its own breaks
multi-byte characters (a byte-level BPE token can hold half of an emoji) and drops the spaces that
SentencePiece tokenizers attach to the next word. As in vLLM, only a short window is decoded per token:
the tokens from ``prefix_offset`` (a few tokens back, for context) to the end, minus the text of the window
up to ``read_offset`` (what was already emitted). A window whose text ends in an incomplete character
(U+FFFD) emits nothing yet; the bytes come out whole with a later token.
"""

from __future__ import annotations

from typing import Any

# How many already-emitted tokens each window starts with: enough context for tokenizers whose decoding of a
# token depends on its neighbours (leading spaces, byte fallback).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed output tokens one at a time with :meth:`add`; each call returns the new text (possibly "")."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids or [])[-_CONTEXT_TOKENS:]
        self.token_ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._pieces: list[str] = []  # the text emitted so far, one piece per add (joined only when asked for)
        self.length = 0  # its length in characters

    @property
    def text(self) -> str:
        """All text emitted so far (of the output tokens only)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def text_from(self, position: int) -> str:
        """The emitted text from character ``position`` on (cost: the pieces after it, not the whole text)."""
        need, parts = self.length - position, []
        for piece in reversed(self._pieces):
            if need <= 0:
                break
            parts.append(piece)
            need -= len(piece)
        tail = "".join(reversed(parts))
        return tail[len(tail) - (self.length - position):] if position < self.length else ""

    def _emit(self, delta: str) -> str:
        self._pieces.append(delta)
        self.length += len(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes."""
        self.token_ids.append(int(token_id))
        emitted = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(emitted) or full.endswith("\ufffd"):
            return ""  # nothing visible yet (a special token skipped, or an incomplete character)
        delta = full[len(emitted):]
        self.prefix_offset = max(0, len(self.token_ids) - _CONTEXT_TOKENS)
        self.read_offset = len(self.token_ids)
        # Keep the decode window short: drop what no later window reads.
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:
            cut = self.prefix_offset
            del self.token_ids[:cut]
            self.prefix_offset -= cut
            self.read_offset -= cut
        return self._emit(delta)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back (an incomplete character as U+FFFD)."""
        pending = self.token_ids[self.read_offset:]
        if not pending:
            return ""
        emitted = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        delta = full[len(emitted):]
        self.read_offset = len(self.token_ids)
        return self._emit(delta)
