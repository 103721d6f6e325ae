"""Decoder layers compiled with inductor for engine forwards only (regional compilation).

The engine's ``compile=True`` compiles one decoder layer, not the whole model: the layers of a model share
their code, so one graph (token and sequence counts symbolic, the layer index an ordinary int input) serves
every layer and every step shape. That takes seconds where a whole-model graph took a minute, and inductor
fuses what eager runs as ~40 small ops a layer (norms, rotary, activation, residuals). The linears become
``hf_paged::packed_linear`` (packed oneDNN weights, see ``patches.linear``) through a pass over the captured
graph, and attention stays whole as the ``hf_paged::paged_attention`` op.

Call-scoped like everything in ``patches``: the engine's runner installs the compiled forwards on the layers for
the length of its own forwards, and a compiled layer runs its graph only while the calling thread is inside the
engine's forward (``packed_linears``); any other call runs the layer's own ``forward``, so a plain ``model(...)``
computes exactly what it did before.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.fx.experimental._config as fx_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from .linear import in_packed_call

logger = logging.getLogger(__name__)


class _LinearsToPackedLinear(CustomGraphPass):
    """Inductor pre-grad pass: every ``F.linear`` of the captured layer becomes ``hf_paged::packed_linear``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch._C._nn.linear:
                x, weight, *rest = node.args
                bias = rest[0] if rest else node.kwargs.get("bias")
                node.target = torch.ops.hf_paged.packed_linear.default
                node.args, node.kwargs = (x, weight, bias), {}

    def uuid(self) -> str:
        return "hf_paged.packed_linear.v1"


def _layer_forward(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(layer).forward(layer, *args, **kwargs)


class _CompiledLayerForward:
    """A decoder layer's ``forward`` while the engine's runner has it installed."""

    def __init__(self, layer: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        self.layer = layer
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if in_packed_call():
            return self.compiled(self.layer, *args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: the ModuleList of ``num_hidden_layers`` modules of one class."""
    config = model.config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) == count and count
                and len({type(layer) for layer in module}) == 1):
            return module
    return None


def build_compiled(model: torch.nn.Module) -> dict[torch.nn.Module, _CompiledLayerForward] | None:
    """A compiled forward for every decoder layer (one graph for all of them); None, with the reason logged, where
    the model has no recognisable layer stack or its layers carry hooks or forwards of their own. Nothing is
    installed on the model; the linears inside the layers must not get forwards of their own either (the graph
    calls ``packed_linear`` itself; a forward object would specialise the graph per layer)."""
    layers = decoder_layers(model)
    if layers is None:
        logger.warning("compile: no stack of %s decoder layers found; running eager",
                       getattr(model.config, "num_hidden_layers", "?"))
        return None
    for layer in layers:
        if "forward" in layer.__dict__ or layer._forward_hooks or layer._forward_pre_hooks:
            logger.warning("compile: %s has hooks or a forward of its own; running eager", type(layer).__name__)
            return None
    compiled = torch.compile(_layer_forward, dynamic=True, options={"pre_grad_custom_pass": _LinearsToPackedLinear()})
    return {layer: _CompiledLayerForward(layer, compiled) for layer in layers}


@contextmanager
def compile_settings() -> Iterator[None]:
    """Around a forward through compiled layers: trace so that one graph serves every step and layer."""
    # No 0/1 specialisation and no "same size now, same size always" equalities between inputs (else a step with
    # as many sampled rows as tokens would compile another graph); the layer index (attention's cache slot) is an
    # input, not a constant, so one graph serves all layers.
    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False), \
            torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        yield
