"""One forward per engine step over a ragged, unpadded batch, through the unmodified HF model.

The runner owns the KV tensors (``KVCache``) and takes each step as the scheduler's plain ``SchedulerOutput``: it
does the step's block copies, builds the inputs (``step_inputs``: one flattened ``[1, T]`` row with the paged
metadata the registered ``hf_paged`` attention reads and writes the K/V through) and runs the forward. A ready 4-D
mask placeholder makes transformers skip building a ``[T, T]`` mask. Logits are computed only for the last token of
the sequences that sample this step (``logits_to_keep``).

The runner owns what its engine's plan adds to the model's forwards (packed weights, fused or compiled layer
forwards, the ``hf_paged`` attention selection) and installs it only for the length of each forward, under a
lock per model (engines on one model take turns): between steps, and for every other caller, the model is exactly
as it was. A ``WeightWatcher`` notices weights changed between calls; ``build`` then re-packs what changed. A model
with recurrent layers has their per-sequence states here too (``recurrent_state``), its mixers' forwards installed
like the rest.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager
from typing import Callable, Collection, Iterator

import torch

from ..admission import layer_windows, temperature_tuned, text_config
from .kernels import cpu_prefill_attention
from .kernels.paged_attention import step_running
from .kv_cache import KVCache
from .patches.attention import EngineDisabled, attention_configs, paged_attention_selected
from .patches.compiled_layers import build_compiled, compile_settings
from .patches.fused_layers import build_fused, fuse_decoder_layers
from .patches.linear import build_packers, packed_linears
from .plan import ExecutionPlan
from .recurrent_state import RecurrentStates
from .step_inputs import build_step_inputs
from ..core.scheduler import SchedulerOutput

_model_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.Lock:
    """The lock that engines on ``model`` hold while their forward-time patches are installed."""
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.Lock()
        return lock


class WeightWatcher:
    """Tells which of a model's parameters changed since the last look. Cheaply: each parameter's storage and version
    counter (bumped by in-place updates through the parameter: foreach optimizers, ``load_state_dict``, ``copy_``).
    Fully, also a sampled fingerprint of each parameter's values (fused optimizers and writes through ``.data`` bump
    no version counter; every element-wise update changes the sampled elements too) and a walk over the modules (a
    parameter replaced or added, PEFT adapters merged). A write through ``.data`` to a few elements only may fall
    between the samples: ``LLMEngine.refresh_weights`` says it explicitly."""

    SAMPLES = 512  # elements per parameter in the fingerprint

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._take()

    def _structure(self) -> list:
        out = []
        for module in self.model.modules():
            out.extend(id(p) for p in module._parameters.values() if p is not None)
            merged = getattr(module, "merged_adapters", None)
            if merged is not None:
                out.append(tuple(merged))
        return out

    @classmethod
    @torch.no_grad()
    def _fingerprint(cls, p: torch.Tensor) -> int:
        local = p.detach()
        if hasattr(local, "to_local"):  # a tensor-parallel shard (DTensor): this rank's part, no collective
            local = local.to_local()
        flat = local.reshape(-1)
        sample = flat[:: max(1, flat.numel() // cls.SAMPLES)]
        bits = sample.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[sample.element_size()])
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        return int((bits.to(torch.int64) * weights).sum())

    def _states(self, full: bool) -> list[tuple]:
        return [(p.data_ptr(), p._version, self._fingerprint(p) if full else None) for p in self.params]

    def _take(self, structure: list | None = None) -> None:
        self.params = list(self.model.parameters())
        self.state = self._states(full=True)
        self.structure = structure if structure is not None else self._structure()

    def changed(self, full: bool) -> list[torch.Tensor] | None:
        """The parameters that changed since the last call (all of them if the model's structure did), or None if
        nothing did; remembers the current state."""
        structure = self._structure() if full else None
        if structure is not None and structure != self.structure:
            self._take(structure)
            return self.params
        state = self._states(full)
        moved = [now[:2] != then[:2] or (full and now[2] != then[2]) for now, then in zip(state, self.state)]
        if not any(moved):
            return None
        # A cheap look did not take fingerprints: those of what changed are taken now, the others kept.
        self.state = [now if full else (*now[:2], self._fingerprint(p) if m else then[2])
                      for p, now, then, m in zip(self.params, state, self.state, moved)]
        return [p for p, m in zip(self.params, moved) if m]


class ModelRunner:
    """Runs steps of one model on the KV tensors it owns, with what its plan adds to the model's forwards."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, plan: ExecutionPlan) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.plan = plan
        self.device = kv_cache.device
        self._lock = model_lock(model)
        self._configs = attention_configs(model)
        self.layer_windows = layer_windows(model)  # the layers that must run paged attention, and their windows
        # Drafts are verified as chunks where the C prefill kernel takes every layer (it reads a sequence's K/V once
        # for all of its tokens; the decode kernel would read them once per token).
        self.drafts_as_chunks = (plan.cpu_kernels and all(w is None for w in self.layer_windows.values())
                                 and not getattr(text_config(model), "attn_logit_softcapping", None)
                                 and cpu_prefill_attention.takes_head_dims(kv_cache.head_dim, kv_cache.head_dim_v))
        # NoPE layers whose query scaling the paged attention computes from the step's positions (EngineDisabled).
        self._tuned = [m for m in model.modules() if temperature_tuned(m)]
        self.forwards: dict[torch.nn.Module, Callable] = {}  # installed on their modules during forwards
        self._packers: dict = {}
        self._fused: dict = {}
        self._packers_by_weight: dict = {}
        self.compiled = False
        self.decode_graphs = None  # a cuda_graphs.DecodeGraphs where the plan has cuda_graphs (set by the engine)
        recurrent = RecurrentStates(model, self.device)
        self.recurrent = recurrent if recurrent.mixers else None
        self.build()
        # transformers returns a 4-D mask unchanged, so no causal mask is built; hf_paged ignores it.
        self._mask_placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.num_forward_tokens = 0

    @property
    def fused(self) -> bool:
        return bool(self._fused)

    @property
    def packed(self) -> bool:
        return bool(self._packers)

    def build(self, changed: Collection[torch.Tensor] | None = None) -> None:
        """(Re)build the plan's forwards for the model as it is now, keeping packed copies of the weights that did not
        change (``changed``: those that did, beyond what their storage and version counter tell; None: all)."""
        plan, model = self.plan, self.model
        stale = {id(p) for p in changed} if changed is not None else None
        previous_fused = {m: f for m, f in self._fused.items()
                          if stale is not None and not any(id(linear.weight) in stale for linear in f.linears)}
        previous_packers = {m: p for m, p in self._packers.items() if stale is not None and id(m.weight) not in stale}
        fused, grouped = build_fused(model, plan.linears, previous_fused) if plan.fused_layers else ({}, [])
        packers = build_packers(model, plan.linears, skip=grouped, previous=previous_packers) \
            if plan.linears != "torch" else {}
        # Recurrent mixers run per group of sequences, which one traced graph per layer cannot.
        compiled = build_compiled(model) if plan.compiled and self.recurrent is None else None
        forwards: dict[torch.nn.Module, Callable] = {}
        if compiled is not None:  # the graphs call packed_linear; the linears get no forward of their own
            forwards.update(compiled)
        else:
            fused.update(fuse_decoder_layers(model, {**fused, **packers}, plan.one_call_layers))
            forwards.update(packers)
            forwards.update(fused)
        if self.recurrent is not None:
            forwards.update(self.recurrent.forwards())
        self._fused = fused
        self._packers = packers
        self._packers_by_weight = {p.source[0]: p for p in packers.values()}
        self.compiled = compiled is not None
        self.forwards = forwards
        if getattr(self, "decode_graphs", None) is not None:  # captured with the old weights and forwards
            self.decode_graphs.reset()

    def sleep(self) -> None:
        """Free the KV tensors and packed weights until :meth:`wake_up` (training holds the memory meanwhile)."""
        self.forwards, self._packers, self._fused, self._packers_by_weight = {}, {}, {}, {}
        self.kv_cache.release()
        if self.recurrent is not None:
            self.recurrent.release()

    def wake_up(self) -> None:
        self.kv_cache.restore()
        self.build()

    def close(self) -> None:
        """Drop everything this runner built (nothing is installed between forwards) and its KV tensors."""
        self.forwards, self._packers, self._fused, self._packers_by_weight = {}, {}, {}, {}
        if self.decode_graphs is not None:
            self.decode_graphs.reset()
        self.kv_cache.release()
        if self.recurrent is not None:
            self.recurrent.release()

    @contextmanager
    def _installed(self) -> Iterator[None]:
        installed = []
        for module, forward in self.forwards.items():
            if "forward" not in module.__dict__:  # a forward somebody else put there since wins
                module.__dict__["forward"] = forward
                installed.append(module)
        flags = [(m, m.__dict__.get("attn_temperature_tuning")) for m in self._tuned]
        for module, flag in flags:
            module.__dict__["attn_temperature_tuning"] = EngineDisabled(flag)
        try:
            with paged_attention_selected(self._configs), packed_linears(self._packers_by_weight):
                yield
        finally:
            for module in installed:
                del module.__dict__["forward"]
            for module, flag in flags:
                module.__dict__["attn_temperature_tuning"] = flag

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Do the step's block copies and run its forward; returns (logits ``[num_sampling, vocab]`` in fp32, the
        indices of the scheduled sequences they belong to)."""
        self.kv_cache.copy_blocks(step.block_copies, self.plan)
        if self.decode_graphs is not None and self.decode_graphs.accepts(step):
            return self.decode_graphs.execute(step)
        inputs = build_step_inputs(step, self.kv_cache, self.plan, self.layer_windows, self.drafts_as_chunks)
        meta = inputs.meta
        if self.recurrent is not None:
            self.recurrent.begin(step)
        with self._lock, self._installed(), step_running(meta), ExitStack() as scope:
            if self.compiled:
                scope.enter_context(compile_settings())
            out = self.model(input_ids=inputs.input_ids, position_ids=inputs.positions,
                             attention_mask=self._mask_placeholder, paged_metadata=meta,
                             logits_to_keep=inputs.logits_rows, use_cache=False)
        meta.check_layer_calls()
        if self.recurrent is not None:
            self.recurrent.commit()
        self.num_forward_tokens += inputs.input_ids.shape[1]
        return out.logits[0].float(), inputs.sample_rows
