"""Pre-packed weights for the model's ``nn.Linear`` layers, used only inside engine forwards (CPU).

``F.linear`` on the CPU re-lays out the weight for the GEMM kernel on every call; for decode steps (a few
dozen rows against a 576 x 1536 weight) that costs as much as the product. oneDNN can keep a weight in its
kernel's layout (``mkldnn._reorder_linear_weight``) and multiply with it directly
(``mkldnn._linear_pointwise``, AMX on CPUs that have it). Measured on SmolLM2 at batch 32: a decode step
53.3 -> 46.4 ms in bf16, 90.6 -> 83.6 ms in fp32, greedy tokens unchanged. (MKL's packed fp32 sgemm,
``mkl._mkl_linear``, is only faster for the one row count it was packed for.)

Paging stays a property of the call: each packed layer gets a ``forward`` that uses the packed weight only
while the calling thread is inside :func:`packed_linears` (the engine's forward) and otherwise runs
``nn.Linear.forward`` itself, so a plain ``model(...)`` computes exactly what it did before. The packed
copy is taken when an engine is built (and kept for the next engine while the weight is unchanged): later
changes to the weights are not seen by engine forwards until :func:`pack_linear_weights` runs again. It costs
one more copy of the linear weights.

Compiled decoder layers (``compiled_layers``) cannot call a layer's own ``forward`` object (the compiler
would specialise the graph on it, one graph a layer); their linears become the ``hf_paged::packed_linear``
op instead, which finds the packed weight from the weight tensor it is given (falling back to ``F.linear``
for a weight that has none or has changed since it was packed).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

_active = threading.local()
_PACKER = "_hf_paged_packed_linear"  # the module attribute that keeps a layer's packer alive
# weight.data_ptr() -> its packer (alive while its module holds it).
_packers: "weakref.WeakValueDictionary[int, _PackedLinearForward]" = weakref.WeakValueDictionary()


class _PackedLinearForward:
    """One ``nn.Linear``'s packed weight and the ``forward`` that uses it (an instance attribute, except in compiled
    layers); the module keeps it under ``_PACKER`` until ``unpack``."""

    def __init__(self, module: torch.nn.Linear) -> None:
        self.module = module
        self.source = self.weight_state(module.weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
        _packers[self.source[0]] = self

    @staticmethod
    def weight_state(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
        """What changes when the weight is replaced or modified in place."""
        return weight.data_ptr(), weight._version, weight.dtype

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if in_packed_call() and x.dtype == module.weight.dtype:
            return self.matmul(x, module.bias)
        return torch.nn.Linear.forward(module, x)


class PackedGroup:
    """Several ``nn.Linear`` of one input (q/k/v, gate/up) as one packed weight: one GEMM instead of several,
    its output their outputs side by side. Fewer, larger GEMMs stream the weights faster (measured on a
    [32, 576] input in bf16: three of 576/192/192 outputs 114 us, one of 960 outputs 74 us)."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        self.sources = [_PackedLinearForward.weight_state(m.weight) for m in linears]
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("a packed group needs a bias on all of its layers or on none")
        self.bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.dtype = weight.dtype

    def current(self, linears: list[torch.nn.Linear]) -> bool:
        """Whether it still holds these layers' weights."""
        return self.sources == [_PackedLinearForward.weight_state(m.weight) for m in linears]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    packer = _packers.get(weight.data_ptr())
    if packer is not None and x.dtype == weight.dtype and packer.source == packer.weight_state(weight):
        return packer.matmul(x, bias)
    return F.linear(x, weight, bias)


# A plain library op (not torch.library.custom_op): half the per-call overhead, and it is called 7 times a layer.
_lib = torch.library.Library("hf_paged", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("hf_paged::packed_linear", lib=_lib)
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and w is not None and w.device.type == "cpu"
            and w.dtype in (torch.float32, torch.bfloat16))


def pack_linear_weights(model: torch.nn.Module, skip: Iterable[torch.nn.Module] = ()) -> int:
    """Give every plain CPU ``nn.Linear`` of ``model`` but those in ``skip`` (computed through a
    :class:`PackedGroup`) a packed weight (kept if it is still the current weight's, re-packed otherwise);
    returns how many layers are packed. Does nothing where this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    skipped = {id(m) for m in skip}
    with torch.inference_mode():
        for module in model.modules():
            if id(module) in skipped:
                if isinstance(module.__dict__.get("forward"), _PackedLinearForward):
                    del module.forward
                module.__dict__.pop(_PACKER, None)
            elif _packable(module):
                packer = module.__dict__.get(_PACKER)
                if not (packer is not None and packer.source == _PackedLinearForward.weight_state(module.weight)):
                    packer = _PackedLinearForward(module)
                    module.__dict__[_PACKER] = packer
                module.forward = packer
                count += 1
    return count


def unpack_linear_weights(model: torch.nn.Module) -> None:
    """Remove the packed weights: every layer back to plain ``nn.Linear.forward``."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _PackedLinearForward):
            del module.forward
        module.__dict__.pop(_PACKER, None)


def in_packed_call() -> bool:
    """Whether this thread is inside :func:`packed_linears` (an engine forward)."""
    return getattr(_active, "on", False)


@contextmanager
def packed_linears() -> Iterator[None]:
    """Packed layers use their packed weights (and compiled layers their graph) in this thread while inside."""
    previous = getattr(_active, "on", False)
    _active.on = True
    try:
        yield
    finally:
        _active.on = previous
