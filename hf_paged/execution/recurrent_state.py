"""Recurrent layers on ragged steps: the per-sequence states of a model's state-space / linear-attention /
short-convolution layers, and the forwards that run the model's own mixer code over a flattened step.

A mixer (``admission.recurrent_mixers``) computes over ``[batch, length, hidden]`` with its state in a transformers
``Cache``. The engine's step is one flattened row of many sequences, so during an engine forward each mixer runs once
for the step's decodes that continue a state (a batch of one-token rows) and once for every other sequence (a prefill
chunk, or a decode starting from nothing), each time with a ``Cache`` whose layer holds the states of those sequences,
gathered from their slots (a sequence starting at position 0 starts from no state, as HF's own prefill does). The
states the mixers leave are written back to the slots only after the whole forward succeeded (a failed step changes
no state, so it can be run again). The tensors have one row per state slot (``core.block_pool.StateSlots``), are
created with the shapes and dtypes the mixer first produces, and grow with the slots.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer, get_layer_types_and_kwargs

from ..admission import UnsupportedModel, mixer_cache_argument, recurrent_mixers, text_config
from ..core.scheduler import SchedulerOutput

_KINDS = ("conv_states", "recurrent_states")
# Per-token arguments of the flattened step, meaningless for a mixer's own rows.
_STEP_ARGUMENTS = ("paged_metadata", "position_ids", "cache_position", "position_embeddings", "cu_seq_lens_q",
                   "cu_seq_lens_k", "max_length_q", "max_length_k")


class RecurrentStates:
    """The states of one model's recurrent layers, one row per state slot, and the step being run."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.mixers = recurrent_mixers(model)
        self.device = device
        # How many states each layer keeps (what transformers' own DynamicCache would give it).
        self.num_states: dict[int, int] = {layer: 1 for layer in self.mixers}
        try:
            _, per_layer = get_layer_types_and_kwargs(text_config(model))
            for layer in self.mixers:
                if layer < len(per_layer):
                    self.num_states[layer] = per_layer[layer].get("number_of_states", 1) or 1
        except Exception:  # configs without layer information: one state per layer
            pass
        self.tensors: dict[tuple[int, str, int], torch.Tensor] = {}
        self.capacity = 0  # rows of every tensor
        # Continue a state one token at a time (mixers whose multi-token path starts from zeros whatever state they
        # are given: the engine sets it when its probe finds a continued prefill differs).
        self.stepwise = False
        self._groups: list[tuple[int, int, torch.Tensor, bool]] = []  # (first token, tokens per row, slots, continues)
        self._pending: list[tuple[tuple[int, str, int], torch.Tensor, torch.Tensor]] = []

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.mixers))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def forwards(self) -> dict[torch.nn.Module, Callable]:
        """The forwards the runner installs on the mixers for its forwards."""
        return {m: functools.partial(self._mixer_forward, m, type(m).forward.__get__(m), mixer_cache_argument(m))
                for m in self.mixers.values()}

    def release(self) -> None:
        self.tensors, self.capacity = {}, 0

    # ---- around one step -------------------------------------------------------------------------
    def begin(self, step: SchedulerOutput) -> None:
        """Do the step's state copies (forks) and split its rows into the mixers' calls."""
        self._grow(max([max(pair) for pair in step.state_copies] + [s.state_slot or 0 for s in step.seqs]) + 1)
        if step.state_copies:
            src, dst = (torch.tensor(side, dtype=torch.long, device=self.device) for side in zip(*step.state_copies))
            for tensor in self.tensors.values():
                tensor[dst] = tensor[src]  # every source read before any destination is written
        groups, start, decodes = [], 0, []
        for seq in step.seqs:
            if seq.state_slot is None:
                raise UnsupportedModel("a step of a model with recurrent layers without a state slot")
            n = len(seq.token_ids)
            if n == 1 and seq.first_position > 0 and start == len(decodes):
                decodes.append(seq.state_slot)
            else:
                groups.append((start, n, [seq.state_slot], seq.first_position > 0))
            start += n
        if decodes:
            groups.insert(0, (0, 1, decodes, True))
        self._groups = [(first, n, torch.tensor(slots, dtype=torch.long, device=self.device), continues)
                        for first, n, slots, continues in groups]
        self._pending = []

    def commit(self) -> None:
        """Write the states the step's forward left into their slots."""
        for key, slots, state in self._pending:
            tensor = self.tensors.get(key)
            if tensor is None:
                tensor = self.tensors[key] = state.new_zeros((self.capacity, *state.shape[1:]))
            tensor[slots] = state
        self._pending = []

    def _grow(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        self.capacity = max(rows, self.capacity + self.capacity // 4, 4)
        for key, tensor in self.tensors.items():
            grown = tensor.new_zeros((self.capacity, *tensor.shape[1:]))
            grown[: tensor.shape[0]] = tensor
            self.tensors[key] = grown

    # ---- inside the forward ----------------------------------------------------------------------
    def _mixer_forward(self, module: torch.nn.Module, forward: Callable, cache_argument: str,
                       hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise UnsupportedModel(f"{type(module).__name__} called with positional arguments the engine cannot split")
        layer = module.layer_idx
        for name in _STEP_ARGUMENTS + ("attention_mask", "cache_params", "past_key_values"):
            kwargs.pop(name, None)
        outputs = []
        for first, n, slots, continues in self._groups:
            rows = hidden_states[0, first:first + n * len(slots)].reshape(len(slots), n, -1)
            cache_layer = self._cache_layer(layer, slots, continues)
            cache = Cache(layers=[None] * layer + [cache_layer])
            for piece in rows.split(1, dim=1) if continues and self.stepwise and n > 1 else (rows,):
                out = forward(piece, attention_mask=None, **{cache_argument: cache}, **kwargs)
                if not isinstance(out, torch.Tensor):
                    raise UnsupportedModel(f"{type(module).__name__} returns {type(out).__name__}, not a tensor")
                outputs.append(out)
            for kind in _KINDS:
                for index, state in getattr(cache_layer, kind).items():
                    if state is not None:
                        self._pending.append(((layer, kind, index), slots, state))
        outputs = [out.reshape(1, -1, out.shape[-1]) for out in outputs]  # batched decodes: a token per row
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _cache_layer(self, layer: int, slots: torch.Tensor, continues: bool) -> LinearAttentionLayer:
        """A transformers cache layer holding the states of ``slots`` (empty for sequences starting from nothing)."""
        cache_layer = LinearAttentionLayer(number_of_states=self.num_states[layer])
        if not continues:
            return cache_layer
        for index in range(cache_layer.number_of_states):
            for kind, flag in zip(_KINDS, ("is_conv_states_initialized", "is_recurrent_states_initialized")):
                tensor = self.tensors.get((layer, kind, index))
                if tensor is None:
                    continue
                state = tensor[slots]
                getattr(cache_layer, kind)[index] = state
                getattr(cache_layer, flag)[index] = True
                cache_layer.has_previous_state[index] = True
                cache_layer.dtype, cache_layer.device = state.dtype, state.device
                if kind == "conv_states":
                    cache_layer.conv_kernel_size[index] = state.shape[-1]
        return cache_layer
